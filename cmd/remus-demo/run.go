package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/internal/stats"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/testvm/counter"
	"github.com/remus-kvm/remus/witness"
)

// config is what the command line sets.
type config struct {
	QEMU             string
	Accel            string        // kvm, tcg or auto (probe)
	Remusd           string        // empty: build cmd/remusd
	ProtectFor       time.Duration // protected run before the kill
	DirtyPerSec      int
	Epoch            time.Duration
	HeartbeatTimeout time.Duration
}

// errInterrupted is returned when the demo was stopped by a signal.
var errInterrupted = errors.New("interrupted")

// Time limits for the stages that wait on the guest or the agents.
const (
	bootTimeout     = 3 * time.Minute
	firstCommitWait = 3 * time.Minute
	failoverWait    = time.Minute
	requestTimeout  = 20 * time.Second
)

// check refuses settings the demo cannot run with, and finds what it needs
// on the host, saying how to get what is missing.
func (c *config) check() error {
	switch {
	case c.ProtectFor <= 0:
		return errors.New("--protect-for must be positive")
	case c.DirtyPerSec < 0:
		return errors.New("--dirty must not be negative")
	case c.Epoch <= 0:
		return errors.New("--epoch must be positive")
	case c.HeartbeatTimeout <= 0:
		return errors.New("--heartbeat-timeout must be positive")
	}
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root for a network namespace and a tap device: run `sudo make demo`")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return fmt.Errorf("the demo needs /dev/net/tun for its tap device (try `modprobe tun`): %w", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("iproute2's ip command is missing: run `make setup`")
	}
	qemu, err := exec.LookPath(c.QEMU)
	if err != nil {
		return fmt.Errorf("QEMU %q not found: run `make setup`, or point --qemu or %s at a %s", c.QEMU, testvm.QEMUEnv, testvm.DefaultQEMU)
	}
	c.QEMU = qemu
	if c.Remusd != "" {
		if c.Remusd, err = exec.LookPath(c.Remusd); err != nil {
			return fmt.Errorf("--remusd: %w", err)
		}
	}
	if _, err := testvm.FindKernel(); err != nil {
		if errors.Is(err, testvm.ErrNoKernel) {
			return fmt.Errorf("cannot boot the test guest: %w", err)
		}
		return err
	}
	return nil
}

// demo is one run: the lab and what was learned along the way.
type demo struct {
	cfg config
	out *printer
	l   *lab.Lab

	prim, back      testvm.Config
	vm              *testvm.VM
	ready           testvm.Ready
	p               *lab.Protection
	c               *client // the client's connection until the kill
	got             []seen  // replies under protection
	killedAt        time.Time
	lastAcked       agent.EpochRecord
	epochsCommitted int
}

// seen is one reply the client received, and when.
type seen struct {
	counter.Reply
	at time.Time
}

func run(ctx context.Context, cfg config, w io.Writer) (err error) {
	if err := cfg.check(); err != nil {
		return err
	}
	d := &demo{cfg: cfg, out: newPrinter(w)}
	defer func() {
		if err != nil && ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", errInterrupted, err)
		}
	}()
	if err := d.banner(ctx); err != nil {
		return err
	}

	d.out.step("setting up: building the guest's initramfs%s, creating its outside network",
		map[bool]string{true: " and remusd", false: ""}[cfg.Remusd == ""])
	d.l, err = lab.New(ctx, lab.Options{QEMU: cfg.QEMU, Remusd: cfg.Remusd, Accel: cfg.Accel})
	if err != nil {
		return fmt.Errorf("setting up: %w", err)
	}
	defer func() {
		if d.c != nil {
			d.c.close()
		}
		if err != nil && ctx.Err() == nil {
			d.diagnose()
		}
		d.out.step("cleaning up: QEMU, the agents, the network namespace with its bridge and taps, and %s", d.l.Dir)
		d.l.Close()
		if err == nil {
			d.out.step("done")
		}
	}()
	d.out.info("network namespace %s: bridge br0 with the client at %s, taps %s (primary) and %s (backup); the guest will be %s",
		d.l.Net.NS.Name(), lab.ClientAddr, d.l.Net.TapPrimary, d.l.Net.TapBackup, lab.GuestAddr)

	for _, stage := range []func(context.Context) error{d.boot, d.serve, d.protect, d.pullThePlug, d.failover} {
		if err := stage(ctx); err != nil {
			return err
		}
	}
	return nil
}

// banner says what the demo runs, including the accelerator and why: the
// probe (or --accel) decides, and a fallback to TCG gives QEMU's reason.
func (d *demo) banner(ctx context.Context) error {
	choice, err := testvm.ChooseAccel(ctx, d.cfg.QEMU, d.cfg.Accel)
	if err != nil {
		return err
	}
	accel := "KVM"
	if choice.Accel == testvm.AccelTCG {
		accel = "TCG, so the guest is emulated and everything is slower"
	}
	d.out.plain("remus-kvm demo: a protected VM keeps running through the death of its host")
	d.out.plain("  QEMU     %s, %s", d.cfg.QEMU, accel)
	d.out.plain("  accel    %s", choice.Reason)
	d.out.plain("  guest    256 MiB, counter service on %s, page dirtier at %d pages/s", lab.GuestSvc, d.cfg.DirtyPerSec)
	d.out.plain("  remus    %v epochs, backup declares the primary dead after %v of silence", d.cfg.Epoch, d.cfg.HeartbeatTimeout)
	d.out.plain("")
	return nil
}

// boot starts the guest on the primary and the primary remusd, which
// relays the guest's NIC to the primary's tap on the outside network:
// unprotected until the backup is up.
func (d *demo) boot(ctx context.Context) error {
	d.out.step("1. booting the test guest on the primary")
	d.prim = d.l.GuestConfig("primary", d.cfg.DirtyPerSec)
	d.back = d.l.GuestConfig("backup", d.cfg.DirtyPerSec)
	d.back.RAMPath = filepath.Join(d.l.Dir, "backup-image.ram")
	// A disk the counter service appends a record to (fsync'd) per
	// request; remusd mirrors it to the backup's copy with the epochs.
	if err := d.l.AddDisk(&d.prim, &d.back, 64); err != nil {
		return err
	}
	var err error
	if d.vm, err = d.l.StartVM(ctx, d.prim); err != nil {
		return err
	}
	d.out.info("QEMU pid %d", d.vm.PID())
	bctx, cancel := context.WithTimeout(ctx, bootTimeout)
	defer cancel()
	if d.ready, err = d.vm.WaitReady(bctx); err != nil {
		return fmt.Errorf("the guest did not come up: %w", err)
	}
	d.out.info("guest is up: boot id %s", d.ready.BootID)
	// The witness: which side runs the guest, in etcd. A real pair uses
	// an etcd cluster on a third failure domain; here one etcd on this
	// machine.
	wit, err := d.l.StartWitness(ctx)
	if err != nil {
		return err
	}
	d.out.info("witness: etcd at %s (lease TTL %v): the backup resumes the guest only once the primary's lease expired", wit.Endpoint, witness.DefaultTTL)
	d.p, err = d.l.Protect(d.prim, d.back, lab.ProtectOptions{Epoch: d.cfg.Epoch, HeartbeatTimeout: d.cfg.HeartbeatTimeout,
		Echo: agentLog{d.out}, BackupLater: true, Witness: wit.Endpoint})
	if err != nil {
		return err
	}
	d.out.info("the primary remusd relays the guest's NIC to tap %s on the outside bridge (unprotected: no backup yet)", d.l.Net.TapPrimary)
	return nil
}

// client is a connection to the counter service that ctx closes.
type client struct {
	conn net.Conn
	cl   *counter.Client
	stop func() bool
}

func (d *demo) dial(ctx context.Context) (*client, error) {
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := d.l.Dial(dctx)
	if err != nil {
		return nil, fmt.Errorf("connect to the guest's counter service at %s: %w", lab.GuestSvc, err)
	}
	return &client{conn: conn, cl: counter.NewClient(conn), stop: context.AfterFunc(ctx, func() { conn.Close() })}, nil
}

func (c *client) close() {
	c.stop()
	c.conn.Close()
}

func (c *client) do(cmd string) (counter.Reply, error) {
	c.conn.SetDeadline(time.Now().Add(requestTimeout))
	if cmd == counter.CmdGet {
		return c.cl.Get()
	}
	return c.cl.Inc()
}

// serve shows the counter service answering, unprotected, on a connection
// that the protected run goes on using.
func (d *demo) serve(ctx context.Context) error {
	d.out.step("2. the counter service, over TCP from the client's namespace (%s -> %s)",
		strings.Split(lab.ClientAddr, "/")[0], lab.GuestSvc)
	c, err := d.dial(ctx)
	if err != nil {
		return err
	}
	d.c = c
	for range 3 {
		r, err := c.do(counter.CmdInc)
		if err != nil {
			return fmt.Errorf("INC: %w", err)
		}
		d.out.info("INC -> %d   (guest uptime %s)", r.Value, fmtUptime(r.Uptime))
	}
	return nil
}

// protect starts the agents, waits for the first checkpoint and runs the
// client under protection, reporting once a second.
func (d *demo) protect(ctx context.Context) (err error) {
	d.out.step("3. protecting the guest: the backup remusd starts, the primary connects to it over loopback")
	if err := d.p.StartBackup(); err != nil {
		return err
	}
	d.out.info("waiting for the first checkpoint: all 256 MiB of guest RAM go to the backup once")
	wctx, cancel := context.WithTimeout(ctx, firstCommitWait)
	eps, err := d.p.WaitCommitted(wctx, 1)
	cancel()
	if err != nil {
		return fmt.Errorf("no checkpoint committed: %w", err)
	}
	first := eps[0]
	d.out.info("epoch %d committed: %d pages, %s to the backup, guest paused %s, acknowledged %s after it started",
		first.Epoch, first.DirtyPages, fmtBytes(first.WireBytes), fmtUS(first.PauseUS), first.Acked.Sub(first.Start).Round(100*time.Millisecond))
	d.out.info("from now on only the pages dirtied in each epoch are copied, and the guest's packets leave only once")
	d.out.info("the epoch that sent them is on the backup; the client keeps sending INC on its connection:")

	c := d.c
	start := time.Now()
	next := start.Add(time.Second)
	shown := len(eps)
	for {
		r, err := c.do(counter.CmdInc)
		if err != nil {
			return fmt.Errorf("INC under protection: %w", err)
		}
		now := time.Now()
		d.got = append(d.got, seen{r, now})
		select {
		case <-d.p.Backup.Done():
			return errors.New("the backup remusd ended while the primary was alive (a loaded machine can miss heartbeats: try a longer --heartbeat-timeout)")
		case <-d.p.Primary.Done():
			return errors.New("the primary remusd ended by itself")
		default:
		}
		if now.Before(next) {
			continue
		}
		next = next.Add(time.Second)
		if eps, err = d.p.Epochs(); err != nil {
			return err
		}
		win := eps[shown:]
		shown = len(eps)
		d.out.info("t+%ds  counter %-6d epochs committed %-5d  last second: %3d epochs, pause p50 %s, dirty p50 %s pages, %s to the backup",
			int(now.Sub(start).Round(time.Second)/time.Second), r.Value, len(eps), len(win),
			fmtUS(p50(win, func(e agent.EpochRecord) int64 { return e.PauseUS })),
			strconv.FormatInt(p50(win, func(e agent.EpochRecord) int64 { return int64(e.DirtyPages) }), 10),
			fmtBytes(sum(win, func(e agent.EpochRecord) int64 { return e.WireBytes })))
		if now.Sub(start) >= d.cfg.ProtectFor {
			return nil
		}
	}
}

// pullThePlug kills the primary QEMU and the primary remusd at once, as a
// host that loses power would lose both.
func (d *demo) pullThePlug(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d.out.step("4. pulling the plug on the primary host: SIGKILL to the primary QEMU and the primary remusd together")
	d.killedAt = time.Now()
	var wg sync.WaitGroup
	wg.Go(d.vm.Kill)
	wg.Go(d.p.Primary.Kill)
	wg.Wait()
	d.out.info("killed at %s; the client keeps its TCP connection open", d.killedAt.Format("15:04:05.000"))
	eps, err := d.p.Epochs()
	if err != nil {
		return err
	}
	if len(eps) == 0 {
		return errors.New("the primary logged no committed epoch")
	}
	d.epochsCommitted = len(eps)
	d.lastAcked = eps[len(eps)-1]
	last := d.got[len(d.got)-1]
	d.out.info("the client's last reply: counter %d; the primary's last acknowledged checkpoint: epoch %d, taken %s before the kill",
		last.Value, d.lastAcked.Epoch, d.killedAt.Sub(d.lastAcked.Start).Round(time.Millisecond))
	return nil
}

// failover waits for the backup to resume the guest, puts the backup's
// guest on the outside network and shows the counter going on.
func (d *demo) failover(ctx context.Context) error {
	d.out.step("5. the backup takes over")
	wctx, cancel := context.WithTimeout(ctx, failoverWait)
	r, err := d.p.WaitReport(wctx)
	cancel()
	if err != nil {
		return err
	}
	d.out.info("primary declared dead %.0f ms after it was last heard; witness claimed %.0f ms later (the primary's lease expired); guest resumed %.0f ms after that (device state load %.1f ms)",
		r.DetectionMS, r.ClearMS, r.RestoreMS, r.LoadMS)
	d.out.info("resumed epoch %d's checkpoint in a new QEMU (pid %d), running %s after the plug was pulled",
		r.Epoch, r.QEMUPID, r.Running.Sub(d.killedAt).Round(time.Millisecond))
	if r.Epoch < d.lastAcked.Epoch {
		return fmt.Errorf("the backup resumed epoch %d, older than epoch %d which the primary saw acknowledged", r.Epoch, d.lastAcked.Epoch)
	}
	d.out.info("the backup remusd relays the new QEMU's NIC to tap %s; the guest announced its MAC address there", d.l.Net.TapBackup)
	d.out.info("the client sends INC on the connection it had before the kill:")
	c := d.c
	last := d.got[len(d.got)-1]
	sent := time.Now()
	now, err := c.do(counter.CmdInc)
	if err != nil {
		return fmt.Errorf("INC on the same connection after the failover: %w", err)
	}
	d.out.info("INC -> %d   (guest uptime %s, boot id %s; answered %s after it was sent)",
		now.Value, fmtUptime(now.Uptime), now.BootID, time.Since(sent).Round(time.Millisecond))
	prev := now.Value
	for range 3 {
		r, err := c.do(counter.CmdInc)
		if err != nil {
			return fmt.Errorf("INC on the resumed guest: %w", err)
		}
		if r.Value != prev+1 {
			return fmt.Errorf("INC on the resumed guest returned %d after %d", r.Value, prev)
		}
		prev = r.Value
		d.out.info("INC -> %d   (guest uptime %s)", r.Value, fmtUptime(r.Uptime))
	}

	// Output commit: every reply the client saw came from a committed
	// epoch, so the resumed guest goes on exactly after the last one.
	if now.BootID != d.ready.BootID {
		return fmt.Errorf("the resumed guest has boot id %s, not %s: it rebooted", now.BootID, d.ready.BootID)
	}
	if now.Uptime < last.Uptime {
		return fmt.Errorf("the resumed guest's uptime %s is below the %s seen before: it rebooted", fmtUptime(now.Uptime), fmtUptime(last.Uptime))
	}
	if now.Value != last.Value+1 {
		return fmt.Errorf("the first reply after the failover is %d; the last before it was %d: a reply was lost or repeated", now.Value, last.Value)
	}
	d.out.step("result: the same guest went on, on the same TCP connection, with nothing the client saw lost")
	d.out.info("same boot id %s: the guest did not reboot", now.BootID)
	d.out.info("uptime went on: %s at the last reply before the kill, %s on the backup", fmtUptime(last.Uptime), fmtUptime(now.Uptime))
	d.out.info("the client's last reply before the kill was %d, its first after the failover %d (the backup resumed epoch %d)", last.Value, now.Value, r.Epoch)
	img, err := os.Open(d.back.Disk)
	if err != nil {
		return err
	}
	defer img.Close()
	st, err := img.Stat()
	if err != nil {
		return err
	}
	recs, err := counter.ReadRecords(img, st.Size())
	if err != nil {
		return fmt.Errorf("the backup's disk: %w", err)
	}
	if uint64(len(recs)) != prev {
		return fmt.Errorf("the backup's disk holds records 1..%d; the counter is at %d", len(recs), prev)
	}
	d.out.info("the disk the backup's guest runs on holds records 1..%d, one per reply, fsync'd by the guest and mirrored with the epochs", len(recs))
	all, _ := d.p.Epochs()
	d.out.info("%d epochs committed under protection; guest pause p50 %s, p99 %s; failover %.0f ms detection + %.0f ms witness + %.0f ms restore",
		d.epochsCommitted, fmtUS(p50(all[min(1, len(all)):], pauseUS)), fmtUS(pct(all[min(1, len(all)):], pauseUS, 0.99)),
		r.DetectionMS, r.ClearMS, r.RestoreMS)
	return nil
}

// diagnose prints what helps to see why a run failed: the agents' last log
// lines and the guests' consoles.
func (d *demo) diagnose() {
	tail := func(s string, n int) string {
		lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		return strings.Join(lines, "\n")
	}
	if d.p != nil {
		for _, pr := range []*lab.Proc{d.p.Primary, d.p.Backup} {
			if pr != nil && pr.Output() != "" {
				d.out.step("%s, last lines:\n%s", pr.Name, tail(pr.Output(), 15))
			}
		}
	}
	for _, role := range []string{"primary", "backup"} {
		if b, err := os.ReadFile(filepath.Join(d.l.Dir, role+"-console.log")); err == nil && len(b) > 0 {
			d.out.step("%s guest console, last lines:\n%s", role, tail(string(b), 10))
		}
	}
}

func pauseUS(e agent.EpochRecord) int64 { return e.PauseUS }

func p50(eps []agent.EpochRecord, f func(agent.EpochRecord) int64) int64 { return pct(eps, f, 0.5) }

// pct is the q quantile of f over eps (nearest rank), -1 when eps is empty.
func pct(eps []agent.EpochRecord, f func(agent.EpochRecord) int64, q float64) int64 {
	if len(eps) == 0 {
		return -1
	}
	v := make([]int64, len(eps))
	for i, e := range eps {
		v[i] = f(e)
	}
	return stats.Quantile(v, q)
}

func sum(eps []agent.EpochRecord, f func(agent.EpochRecord) int64) int64 {
	var s int64
	for _, e := range eps {
		s += f(e)
	}
	return s
}

func fmtUS(us int64) string {
	if us < 0 {
		return "-"
	}
	return strconv.FormatFloat(float64(us)/1000, 'f', 1, 64) + " ms"
}

func fmtBytes(b int64) string {
	switch {
	case b >= 1<<20:
		return strconv.FormatFloat(float64(b)/(1<<20), 'f', 1, 64) + " MiB"
	case b >= 1<<10:
		return strconv.FormatFloat(float64(b)/(1<<10), 'f', 0, 64) + " KiB"
	}
	return strconv.FormatInt(b, 10) + " B"
}

func fmtUptime(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', 3, 64) + " s"
}

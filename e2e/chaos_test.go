package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/internal/netns"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/testvm/counter"
	"github.com/remus-kvm/remus/witness"
)

var (
	chaosN    = flag.Int("chaos.n", 0, "TestChaos: iterations to run (0: skip; make chaos sets it)")
	chaosSeed = flag.Uint64("chaos.seed", 0, "TestChaos: seed of the first iteration, iteration i runs seed+i (0: from the clock)")
	chaosOnly = flag.String("chaos.fault", "", "TestChaos: run only this fault")
	chaosJSON = flag.String("chaos.json", "", "TestChaos: write the results as JSON to this file")
	chaosEcho = flag.Bool("chaos.echo", false, "TestChaos: copy the agents' logs to the test's output as they run")
)

// chaosFault is one kind of failure the suite injects into a protected
// guest, with its weight in the draw and whether the backup must resume
// the guest afterwards (true), must not (false), or may (nil: it depends
// on timing, as with a partition that may outlast the witness lease).
type chaosFault struct {
	name     string
	weight   int
	failover *bool
	// alone: the guest may end unprotected (its backup is gone for good);
	// the primary must then say so, and go on serving.
	alone bool
	// link: the agents' link runs through a LinkProxy (r.proxy).
	link bool
	// early: injected during the initial sync, before the first commit.
	early bool
	// before prepares the lab before protection starts.
	before func(r *chaosRun) error
	inject func(r *chaosRun) error
}

var (
	yes, no = func() *bool { b := true; return &b }(), func() *bool { b := false; return &b }()
)

// chaosFaults are the faults drawn, the riskiest first (the order the
// short mode takes them in).
var chaosFaults = []chaosFault{
	{name: "host-death", weight: 3, failover: yes, inject: func(r *chaosRun) error {
		// QEMU and the agent die together, as with their host.
		r.g.vm.Kill()
		r.p.Primary.Kill()
		return nil
	}},
	{name: "primary-agent-kill-restart", weight: 3, failover: nil, inject: func(r *chaosRun) error {
		// remusd crashes and systemd starts it again; the guest's QEMU
		// runs on meanwhile.
		r.p.Primary.Kill()
		r.sleep(0, 3*time.Second)
		return r.restartPrimary()
	}},
	{name: "primary-agent-kill", weight: 1, failover: yes, inject: func(r *chaosRun) error {
		// remusd crashes for good: its guest has lost its network relay
		// and its protector; the backup must take over, and the copy
		// left on the primary must not run on.
		r.p.Primary.Kill()
		return nil
	}},
	{name: "agent-sigterm-restart", weight: 3, failover: no, inject: func(r *chaosRun) error {
		if err := r.p.Primary.Stop(30 * time.Second); err != nil {
			return err
		}
		r.sleep(0, 2*time.Second)
		return r.restartPrimary()
	}},
	{name: "primary-isolated", weight: 2, failover: yes, inject: func(r *chaosRun) error {
		// The primary's host loses the network (backup, witness,
		// clients) and never comes back.
		if err := r.h.Isolate(r.h.A); err != nil {
			return err
		}
		return r.l.Net.NS.Exec("link", "set", "dev", r.l.Net.TapPrimary, "down")
	}},
	{name: "partition", weight: 2, failover: nil, inject: func(r *chaosRun) error {
		// The hosts lose each other for a while; each still reaches the
		// witness and the clients.
		return r.cutFor(r.h.A, r.h.B, 200*time.Millisecond, 4*time.Second)
	}},
	{name: "qemu-crash", weight: 2, failover: yes, inject: func(r *chaosRun) error {
		r.g.vm.Kill()
		return nil
	}},
	{name: "link-corrupt", weight: 1, failover: no, link: true, inject: func(r *chaosRun) error {
		return r.damage(lab.Corrupt)
	}},
	{name: "backup-disk-full", weight: 1, failover: no, before: mountSmallBackupState, inject: func(r *chaosRun) error {
		// The backup's state directory fills up for a while: committing
		// an epoch (its device state, its disk journal) fails there.
		full := filepath.Join(r.l.Dir, "backup-state", "filler")
		err := exec.Command("dd", "if=/dev/zero", "of="+full, "bs=1M", "count=64").Run()
		if err == nil {
			return errors.New("the backup's state directory did not fill up")
		}
		r.sleep(500*time.Millisecond, 4*time.Second)
		return os.Remove(full)
	}},
	{name: "switchover-lossy-link", weight: 1, failover: yes, link: true, inject: func(r *chaosRun) error {
		// An administrator moves the guest while the link drops
		// packets: the switchover either completes or is refused, and
		// the guest stays one guest.
		r.proxy.Lossy(time.Duration(r.rng.IntN(20))*time.Millisecond, 0.02, 200*time.Millisecond)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := r.p.Switchover(ctx); err != nil {
			return fmt.Errorf("switchover: %w", err)
		}
		r.proxy.Lossy(0, 0, 0)
		return nil
	}},
	{name: "sigterm-during-sync", weight: 1, failover: no, early: true, inject: func(r *chaosRun) error {
		// Protection is ended (and started again) before the first
		// checkpoint committed.
		if err := r.p.Primary.Stop(30 * time.Second); err != nil {
			return err
		}
		r.sleep(0, time.Second)
		return r.restartPrimary()
	}},
	{name: "backup-agent-kill-restart", weight: 2, failover: no, inject: func(r *chaosRun) error {
		r.p.Backup.Kill()
		r.sleep(0, 2*time.Second)
		return r.restartBackup()
	}},
	{name: "backup-agent-sigterm-restart", weight: 1, failover: no, inject: func(r *chaosRun) error {
		if err := r.p.Backup.Stop(30 * time.Second); err != nil {
			return err
		}
		r.sleep(0, 2*time.Second)
		return r.restartBackup()
	}},
	{name: "backup-agent-kill", weight: 1, failover: no, alone: true, inject: func(r *chaosRun) error {
		r.p.Backup.Kill()
		return nil
	}},
	{name: "witness-death", weight: 1, failover: no, inject: func(r *chaosRun) error {
		// etcd dies and comes back (its data kept) after a while.
		r.wit.Stop()
		r.sleep(500*time.Millisecond, 5*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		var err error
		r.wit, err = r.h.StartWitness(ctx)
		return err
	}},
	{name: "witness-hang", weight: 1, failover: no, inject: func(r *chaosRun) error {
		if err := r.wit.Pause(); err != nil {
			return err
		}
		r.sleep(500*time.Millisecond, 5*time.Second)
		return r.wit.Resume()
	}},
	{name: "primary-witness-cut", weight: 1, failover: no, inject: func(r *chaosRun) error {
		return r.cutFor(r.h.A, r.h.W, 500*time.Millisecond, 5*time.Second)
	}},
	{name: "backup-witness-cut", weight: 1, failover: no, inject: func(r *chaosRun) error {
		return r.cutFor(r.h.B, r.h.W, 500*time.Millisecond, 5*time.Second)
	}},
	{name: "lossy-link", weight: 1, failover: no, link: true, inject: func(r *chaosRun) error {
		r.proxy.Lossy(time.Duration(r.rng.IntN(30))*time.Millisecond, 0.01+r.rng.Float64()*0.04, 200*time.Millisecond)
		r.sleep(time.Second, 6*time.Second)
		r.proxy.Lossy(0, 0, 0)
		return nil
	}},
	{name: "slow-backup-link", weight: 1, failover: no, link: true, inject: func(r *chaosRun) error {
		// A bandwidth-limited link: epochs take longer, the guest slows,
		// nothing is dropped.
		r.proxy.Limit(float64((1 + r.rng.IntN(4)) << 20))
		r.sleep(2*time.Second, 6*time.Second)
		r.proxy.Limit(0)
		return nil
	}},
	{name: "link-drop-frame", weight: 1, failover: no, link: true, inject: func(r *chaosRun) error {
		return r.damage(lab.Drop)
	}},
	{name: "link-duplicate-frame", weight: 1, failover: no, link: true, inject: func(r *chaosRun) error {
		return r.damage(lab.Duplicate)
	}},
}

// chaosShortN is how many iterations the short mode (TestChaos without
// -chaos.n, in make test) runs: the first faults of chaosFaults, in order.
const chaosShortN = 10

// mountSmallBackupState puts the backup's state directory on a 16 MiB
// tmpfs of its own, which the fault can fill.
func mountSmallBackupState(r *chaosRun) error {
	dir := filepath.Join(r.l.Dir, "backup-state")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16m", "remus-chaos", dir).CombinedOutput(); err != nil {
		return fmt.Errorf("mount a tmpfs on %s: %w: %s", dir, err, out)
	}
	r.t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return nil
}

// chaosResult is one iteration's outcome.
type chaosResult struct {
	Seed       uint64   `json:"seed"`
	Fault      string   `json:"fault"`
	At         string   `json:"injected_at"` // after how long protected
	Passed     bool     `json:"passed"`
	FailedOver bool     `json:"failed_over"`
	FailoverMS float64  `json:"failover_ms,omitempty"` // fault -> guest running on the backup
	MaxGapMS   float64  `json:"client_max_gap_ms"`     // longest wait for a reply
	ReprotMS   float64  `json:"reprotect_ms,omitempty"`
	Replies    int      `json:"replies"`
	Short      int      `json:"short_connections"` // answered on short connections
	Records    uint64   `json:"disk_records"`
	Violations []string `json:"violations,omitempty"`
	labDir     string
}

// chaosRun is the state of one iteration.
type chaosRun struct {
	t     *testing.T
	rng   *rand.Rand
	l     *lab.Lab
	h     *lab.Hosts
	wit   *witness.Local
	g     *protectedGuest
	p     *lab.Protection
	proxy *lab.LinkProxy
	res   *chaosResult
	old   []*lab.Proc // agents replaced by a restart, for their logs
}

func (r *chaosRun) sleep(min, max time.Duration) {
	time.Sleep(min + time.Duration(r.rng.Int64N(int64(max-min)+1)))
}

func (r *chaosRun) violate(format string, args ...any) {
	r.res.Violations = append(r.res.Violations, fmt.Sprintf(format, args...))
}

// restartPrimary starts the primary agent again once it exited.
func (r *chaosRun) restartPrimary() error {
	r.old = append(r.old, r.p.Primary)
	return r.p.RestartPrimary()
}

// restartBackup starts the backup agent again once it exited.
func (r *chaosRun) restartBackup() error {
	<-r.p.Backup.Done()
	r.old = append(r.old, r.p.Backup)
	r.p.Backup = nil
	return r.p.StartBackup()
}

// cutFor cuts x from y for a random time in [min, max], then heals.
func (r *chaosRun) cutFor(x, y *netns.Namespace, min, max time.Duration) error {
	if err := r.h.Cut(x, y); err != nil {
		return err
	}
	r.sleep(min, max)
	return r.h.Heal(x, y)
}

// damage arms d on the link and waits until a frame took it.
func (r *chaosRun) damage(d lab.FrameDamage) error {
	r.proxy.Damage(d)
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if len(r.proxy.Damaged()) > 0 {
			return nil
		}
	}
	return fmt.Errorf("no RAM frame crossed the link to %s within 30 s", d)
}

// TestChaos injects one randomly drawn fault per iteration into a protected
// guest (witness on, each agent and the witness in a host namespace of its
// own, the guest with a disk) at a random moment, with a client holding one
// TCP connection that increments the guest's counter throughout (each
// increment a record the guest fsyncs to its disk) and another reading it
// on short connections, and checks from outside: every reply follows the
// one before on the long connection (nothing taken back, the connection
// never reset), no short connection ever reads less than what was already
// acknowledged, at most one guest's QEMU runs (sampled every 100 ms from
// the fault on), the backup resumed the guest exactly when the fault calls
// for it, the guest that runs is the same boot with its memory consistent
// (the dirtier's pages in order) and its disk holding exactly the records
// up to its counter, a guest left on the primary is protected again (or,
// its backup gone for good, says it runs unprotected), no agent panicked,
// and once the iteration is torn down nothing of it runs or stays mounted.
//
// With -chaos.n N it runs N iterations drawn by weight (make chaos); every
// iteration logs its seed, and -chaos.seed with -chaos.n 1 replays one.
// Without, it runs the short mode: the first chaosShortN faults, riskiest
// first, one iteration each.
func TestChaos(t *testing.T) {
	n := *chaosN
	short := n <= 0
	if short {
		n = chaosShortN
	}
	seed := *chaosSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	var results []chaosResult
	for i := range n {
		s := seed + uint64(i)
		f := drawFault(s, i, short)
		results = append(results, chaosIteration(t, s, f))
	}
	t.Log("\n" + chaosTable(results))
	if *chaosJSON != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		if err := os.WriteFile(*chaosJSON, append(b, '\n'), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// chaosIteration runs one iteration as a subtest and reports it failed,
// with the command that replays it, on any violation.
func chaosIteration(t *testing.T, seed uint64, f chaosFault) chaosResult {
	res := chaosResult{Seed: seed, Fault: f.name}
	ok := t.Run(fmt.Sprintf("seed=%d/%s", seed, f.name), func(t *testing.T) { runChaos(t, f, &res) })
	// After the iteration's teardown nothing of it may be left.
	for _, leak := range leftovers(res.labDir) {
		res.Violations = append(res.Violations, "leaked after teardown: "+leak)
	}
	if !ok && len(res.Violations) == 0 {
		res.Violations = append(res.Violations, "the iteration failed (its log says why)")
	}
	res.Passed = len(res.Violations) == 0
	if !res.Passed {
		t.Errorf("seed %d (%s): %s; replay: go test ./e2e -run 'TestChaos' -chaos.n 1 -chaos.seed %d -chaos.fault %s -v",
			seed, f.name, strings.Join(res.Violations, "; "), seed, f.name)
	}
	return res
}

// faultNamed is the fault called name.
func faultNamed(name string) chaosFault {
	for _, f := range chaosFaults {
		if f.name == name {
			return f
		}
	}
	panic("unknown chaos fault " + name)
}

// Regressions: iterations that once failed, replayed with their seed and
// fault on every make test.

// TestChaosSeed600 found two live guests: remusd primary killed (SIGKILL)
// with its QEMU left running, the backup resumed the guest after the lease
// ran out while the old copy ran on, unguarded. The primary's deadman now
// stops that copy as soon as its agent is gone.
func TestChaosSeed600(t *testing.T) { chaosIteration(t, 600, faultNamed("primary-agent-kill")) }

// drawFault picks iteration i's fault: -chaos.fault if given, in the
// short mode the i-th, else drawn by weight from the seed.
func drawFault(seed uint64, i int, short bool) chaosFault {
	if *chaosOnly != "" {
		return faultNamed(*chaosOnly)
	}
	if short {
		return chaosFaults[i%len(chaosFaults)]
	}
	total := 0
	for _, f := range chaosFaults {
		total += f.weight
	}
	n := rand.New(rand.NewPCG(seed, 0x5eed)).IntN(total)
	for _, f := range chaosFaults {
		if n -= f.weight; n < 0 {
			return f
		}
	}
	return chaosFaults[0]
}

// leftovers lists what still runs or is mounted from the lab in dir.
func leftovers(dir string) []string {
	if dir == "" {
		return nil
	}
	var out []string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out = out[:0]
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			b, err := os.ReadFile(p)
			if err == nil && strings.Contains(string(b), dir+"/") {
				out = append(out, fmt.Sprintf("process %s: %s", filepath.Base(filepath.Dir(p)), strings.ReplaceAll(string(b), "\x00", " ")))
			}
		}
		if m, err := os.ReadFile("/proc/self/mounts"); err == nil && strings.Contains(string(m), dir+"/") {
			out = append(out, "a mount under "+dir)
		}
		if _, err := os.Stat(dir); err == nil {
			out = append(out, "the lab directory "+dir)
		}
		if len(out) == 0 || time.Now().After(deadline) {
			return out
		}
	}
}

// runChaos runs one iteration of fault f, its outcome in res (whose Seed
// is set); the checks that need the agents' whole logs run at its
// cleanup, and add to res then.
func runChaos(t *testing.T, f chaosFault, res *chaosResult) {
	seed := res.Seed
	t.Logf("seed %d, fault %s", seed, f.name)
	r := &chaosRun{t: t, rng: rand.New(rand.NewPCG(seed, 1)), res: res}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r.l = newLab(t)
	res.labDir = r.l.Dir
	var err error
	if r.h, err = r.l.NewHosts(); err != nil {
		t.Fatal(err)
	}
	if r.wit, err = r.h.StartWitness(ctx); err != nil {
		t.Fatal(err)
	}
	if f.before != nil {
		if err := f.before(r); err != nil {
			t.Fatal(err)
		}
	}
	o := lab.ProtectOptions{Witness: r.wit.Endpoint, Hosts: r.h, HeartbeatTimeout: heartbeatTimeout}
	if *chaosEcho {
		o.Echo = os.Stderr
	}
	if f.link {
		o.Via = func(backup string) (string, error) {
			var err error
			r.proxy, err = r.h.NewLinkProxy(backup, seed)
			if err != nil {
				return "", err
			}
			return r.proxy.Addr(), nil
		}
	}
	r.g = bootPrimary(t, r.l, ctx, 4000, withDisk(r.l, 64))
	if r.p, err = r.l.Protect(r.g.prim, r.g.back, o); err != nil {
		t.Fatal(err)
	}
	dump(t, r.l, r.p)
	t.Cleanup(func() {
		// Before the lab's teardown (registered earlier, run later).
		for _, p := range append(r.old, r.p.Primary, r.p.Backup) {
			if p == nil {
				continue
			}
			if out := p.Output(); strings.Contains(out, "panic:") || strings.Contains(out, "fatal error:") || strings.Contains(out, "DATA RACE") {
				res.Violations = append(res.Violations, p.Name+" panicked:\n"+out)
			}
		}
		if t.Failed() {
			for _, p := range r.old {
				t.Logf("%s (replaced) output:\n%s", p.Name, p.Output())
			}
		}
	})
	var before []agent.EpochRecord
	faultAt := time.Now()
	if f.early {
		// During the initial sync (a live sync of 256 MiB takes seconds).
		r.sleep(0, time.Second)
		res.At = "sync"
		faultAt = time.Now()
		if err := f.inject(r); err != nil {
			t.Fatalf("inject %s: %v", f.name, err)
		}
	}
	if _, err := r.p.WaitCommitted(ctx, 3); err != nil {
		t.Fatal(err)
	}
	c := newConsecutiveClient(t, ctx, r.l)

	// The clients run beside the fault; each stops at its first bad reply.
	stop := make(chan struct{})
	var cerr, serr error
	var acked atomic.Uint64 // the last value the long connection got
	var wg sync.WaitGroup
	wg.Go(func() { cerr = c.run(stop, &acked) })
	wg.Go(func() { res.Short, serr = r.shortReads(ctx, stop, &acked) })
	if !f.early {
		protectedAt := time.Now()
		r.sleep(200*time.Millisecond, 3*time.Second)
		res.At = time.Since(protectedAt).Round(time.Millisecond).String()
		before, _ = r.p.Epochs()
		faultAt = time.Now()
		if err := f.inject(r); err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("inject %s: %v", f.name, err)
		}
	}
	injected := time.Now()

	// Watch the guests until things settle: a failover reported, or the
	// primary protecting again.
	alive := func() (n int, who []string) {
		for _, g := range []testvm.Config{r.g.prim, r.g.back} {
			if guestRuns(ctx, g.QMP[0]) {
				n, who = n+1, append(who, g.SerialLog)
			}
		}
		return n, who
	}
	// At the end, a checkpoint's pause must not hide a guest: the most
	// seen running over a few samples.
	aliveAtEnd := func() (n int, who []string) {
		for range 5 {
			if m, w := alive(); m > n {
				n, who = m, w
			}
			time.Sleep(50 * time.Millisecond)
		}
		return n, who
	}
	// reprotected is the first epoch committed after the fault ended.
	reprotected := func() *agent.EpochRecord {
		eps, _ := r.p.Epochs()
		for i := len(before); i < len(eps); i++ {
			if eps[i].Acked.After(injected) {
				return &eps[i]
			}
		}
		return nil
	}
	settle := time.Now().Add(30 * time.Second)
	var report *agent.FailoverReport
	for time.Now().Before(settle) {
		if n, who := alive(); n > 1 {
			r.violate("two guests run %v after the fault: %s", time.Since(faultAt).Round(time.Millisecond), strings.Join(who, ", "))
			break
		}
		if report == nil {
			report, _ = lab.ReadReport(r.p.Report)
		}
		if time.Since(injected) > 3*time.Second {
			if report != nil || (f.alone && f.failover != yes) {
				break
			}
			if eps, _ := r.p.Epochs(); f.failover != yes && len(eps) > len(before)+5 && reprotected() != nil {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Two more seconds of service after things settled.
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	res.MaxGapMS = float64(c.maxGap.Microseconds()) / 1000
	res.Replies = c.n
	if report == nil {
		report, _ = lab.ReadReport(r.p.Report)
	}
	res.FailedOver = report != nil
	if report != nil {
		res.FailoverMS = float64(report.Running.Sub(faultAt).Milliseconds())
	} else if e := reprotected(); e != nil {
		res.ReprotMS = float64(e.Acked.Sub(faultAt).Milliseconds())
	}
	if cerr != nil {
		r.violate("long connection: %v", cerr)
	}
	if serr != nil {
		r.violate("short connections: %v", serr)
	}
	switch {
	case f.failover == yes && report == nil:
		r.violate("no failover after %s", f.name)
	case f.failover == no && report != nil:
		r.violate("the backup resumed the guest (epoch %d) after %s", report.Epoch, f.name)
	}
	if n, who := aliveAtEnd(); n != 1 {
		r.violate("%d guests run at the end: %s", n, strings.Join(who, ", "))
	}
	if report == nil {
		if f.alone {
			st, err := r.p.Status(ctx)
			if err != nil || st.State != "unprotected" {
				r.violate("with its backup gone the primary says %q (%v), want unprotected", st.State, err)
			}
			if jobs, err := blockJobsAt(ctx, r.g.prim.QMP[0]); err != nil || len(jobs) > 0 {
				r.violate("with its backup gone the guest's QEMU runs block jobs %v (%v), want none (the mirror removed)", jobs, err)
			}
		} else if reprotected() == nil {
			r.violate("the guest on the primary is not protected again")
		}
	}
	// The guest that runs: same boot, memory consistent, counter at
	// least the last reply, its disk holding exactly the records up to
	// its counter.
	disk := r.g.prim.Disk
	if report != nil {
		disk = r.g.back.Disk
	}
	r.checkGuest(ctx, c.last.Value, disk)
	t.Logf("%s injected %s after protection; failover %v (%.0f ms); %d replies, longest wait %.0f ms; %d short reads; re-protected after %.0f ms; %d disk records; link damage %v",
		f.name, res.At, res.FailedOver, res.FailoverMS, c.n, res.MaxGapMS, res.Short, res.ReprotMS, res.Records, r.proxyDamage())
}

func (r *chaosRun) proxyDamage() []string {
	if r.proxy == nil {
		return nil
	}
	return r.proxy.Damaged()
}

// shortReads reads the counter on a new connection every 100-300 ms until
// stop: every answer must be the guest's boot and at least what the long
// connection had been acknowledged before the read began (a resumed
// guest that forgot an acknowledged increment shows here too). Failed
// connections (during a failover) are retried, not errors.
func (r *chaosRun) shortReads(ctx context.Context, stop <-chan struct{}, acked *atomic.Uint64) (int, error) {
	n := 0
	rng := rand.New(rand.NewPCG(r.res.Seed, 2))
	for {
		select {
		case <-stop:
			return n, nil
		case <-time.After(time.Duration(100+rng.IntN(200)) * time.Millisecond):
		}
		floor := acked.Load()
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		conn, err := r.l.Dial(dctx)
		cancel()
		if err != nil {
			continue
		}
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		got, err := counter.NewClient(conn).Get()
		conn.Close()
		if err != nil {
			continue
		}
		n++
		if got.BootID != r.g.ready.BootID {
			return n, fmt.Errorf("read boot %s, want %s", got.BootID, r.g.ready.BootID)
		}
		if got.Value < floor {
			return n, fmt.Errorf("read counter %d, below the %d acknowledged before the read", got.Value, floor)
		}
	}
}

// checkGuest connects to the guest that runs and checks it is the same
// boot, its counter at least last (the last reply the client got), its
// memory consistent, and its disk (the image at disk) holding the records
// 1..counter of this boot and nothing beyond.
func (r *chaosRun) checkGuest(ctx context.Context, last uint64, disk string) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := r.l.Dial(ctx)
	if err != nil {
		r.violate("connect to the guest at the end: %v", err)
		return
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	cl := counter.NewClient(conn)
	got, err := cl.Get()
	switch {
	case err != nil:
		r.violate("GET at the end: %v", err)
		return
	case got.BootID != r.g.ready.BootID:
		r.violate("the guest rebooted: boot %s, want %s", got.BootID, r.g.ready.BootID)
	case got.Value < last:
		r.violate("counter %d at the end, below the last reply %d: an acknowledged increment was lost", got.Value, last)
	}
	if chk, err := cl.Check(); err != nil || chk.Value != 0 {
		r.violate("memory check: %d pages out of order, %v", chk.Value, err)
	}
	n, err := checkRecords(disk, got.Value, got.BootID)
	r.res.Records = n
	if err != nil {
		r.violate("disk %s: %v", filepath.Base(disk), err)
	}
}

// checkRecords checks that the disk image at path holds exactly the
// records 1..value, all of boot, and returns how many it holds.
func checkRecords(path string, value uint64, boot string) (uint64, error) {
	img, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer img.Close()
	st, err := img.Stat()
	if err != nil {
		return 0, err
	}
	recs, err := counter.ReadRecords(img, st.Size())
	if err != nil {
		return uint64(len(recs)), err
	}
	n := uint64(len(recs))
	if n != value {
		return n, fmt.Errorf("holds records 1..%d, the guest's counter is %d", n, value)
	}
	for _, rec := range recs {
		if counter.FormatBootID(rec.BootID) != boot {
			return n, fmt.Errorf("record %d is from boot %s", rec.Value, counter.FormatBootID(rec.BootID))
		}
	}
	var b [counter.RecordSize]byte
	for v := value + 1; v <= value+4096 && counter.Offset(v)+counter.RecordSize <= st.Size(); v++ {
		if _, err := img.ReadAt(b[:], counter.Offset(v)); err != nil {
			return n, err
		}
		if _, err := counter.UnmarshalRecord(b[:]); !errors.Is(err, counter.ErrNoRecord) {
			return n, fmt.Errorf("a block at value %d beyond the counter %d (%v)", v, value, err)
		}
	}
	return n, nil
}

// run increments until stop, returning the first failure; acked follows
// the last value acknowledged.
func (c *consecutiveClient) run(stop <-chan struct{}, acked *atomic.Uint64) error {
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		if err := c.next(); err != nil {
			return err
		}
		acked.Store(c.last.Value)
	}
}

// guestRuns reports whether a guest's QEMU answers on its QMP socket and
// says its guest is running (not paused: a guest a guard froze, or one
// loaded and not yet continued, runs nothing).
func guestRuns(ctx context.Context, qmpSocket string) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	mon, err := qmp.Dial(ctx, qmpSocket)
	if err != nil {
		return false
	}
	defer mon.Close()
	st, err := qemu.Status(ctx, mon)
	return err == nil && st == "running"
}

// blockJobsAt lists the block jobs (their ids) of the QEMU at qmpSocket.
func blockJobsAt(ctx context.Context, qmpSocket string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	mon, err := qmp.Dial(ctx, qmpSocket)
	if err != nil {
		return nil, err
	}
	defer mon.Close()
	return blockJobs(ctx, mon)
}

// blockJobs lists the block jobs (their ids) of a QEMU.
func blockJobs(ctx context.Context, mon *qmp.Client) ([]string, error) {
	var jobs []struct {
		Device string `json:"device"`
	}
	if err := mon.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, err
	}
	var ids []string
	for _, j := range jobs {
		ids = append(ids, j.Device)
	}
	return ids, nil
}

// chaosTable is the results per fault: iterations, passed, failovers and
// their time from the fault to the guest running on the backup (p50,
// p99), the time from the fault to the first epoch committed after it
// ended (p50, p99), the client's longest wait (p50, max) and the seeds that
// failed; and a total line.
func chaosTable(results []chaosResult) string {
	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "fault\titerations\tpassed\tfailovers\tfailover p50/p99 (ms)\tre-protect p50/p99 (ms)\tclient wait p50/max (ms)\tfailed seeds")
	pct := func(v []float64, p float64) string {
		if len(v) == 0 {
			return "-"
		}
		slices.Sort(v)
		return strconv.FormatFloat(v[min(len(v)-1, int(p*float64(len(v))))], 'f', 0, 64)
	}
	var total, passed int
	for _, f := range chaosFaults {
		var n, ok, fo int
		var gaps, fos, reps []float64
		var failed []string
		for _, r := range results {
			if r.Fault != f.name {
				continue
			}
			n++
			if r.Passed {
				ok++
			} else {
				failed = append(failed, strconv.FormatUint(r.Seed, 10))
			}
			if r.FailedOver {
				fo++
				fos = append(fos, r.FailoverMS)
			} else if r.ReprotMS > 0 {
				reps = append(reps, r.ReprotMS)
			}
			gaps = append(gaps, r.MaxGapMS)
		}
		if n == 0 {
			continue
		}
		total, passed = total+n, passed+ok
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s / %s\t%s / %s\t%s / %s\t%s\n", f.name, n, ok, fo,
			pct(fos, 0.5), pct(fos, 0.99), pct(reps, 0.5), pct(reps, 0.99), pct(gaps, 0.5), pct(gaps, 1), strings.Join(failed, " "))
	}
	fmt.Fprintf(tw, "total\t%d\t%d\t\t\t\t\t\n", total, passed)
	tw.Flush()
	return sb.String()
}

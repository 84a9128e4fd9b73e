package e2e

import (
	"context"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/testvm/counter"
)

// consecutiveClient increments the guest's counter on one connection and
// checks that every reply is the previous one plus one: no reply taken back,
// none skipped.
type consecutiveClient struct {
	t    *testing.T
	conn net.Conn
	cl   *counter.Client
	last counter.Reply
	n    int
	// maxGap is the longest wait for a reply.
	maxGap time.Duration
}

func newConsecutiveClient(t *testing.T, ctx context.Context, l *lab.Lab) *consecutiveClient {
	t.Helper()
	conn, err := l.Dial(ctx)
	if err != nil {
		t.Fatalf("connect to the guest: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return &consecutiveClient{t: t, conn: conn, cl: counter.NewClient(conn)}
}

// incFor increments for d.
func (c *consecutiveClient) incFor(d time.Duration) {
	c.t.Helper()
	for from := time.Now(); time.Since(from) < d; {
		c.inc()
	}
}

// inc increments once and checks the reply follows the last one.
func (c *consecutiveClient) inc() {
	c.t.Helper()
	if err := c.next(); err != nil {
		c.t.Fatal(err)
	}
}

// next increments once and says what is wrong with the reply: an error,
// or not the last one plus one on the same boot.
func (c *consecutiveClient) next() error {
	c.conn.SetDeadline(time.Now().Add(time.Minute))
	sent := time.Now()
	r, err := c.cl.Inc()
	c.maxGap = max(c.maxGap, time.Since(sent))
	if err != nil {
		return fmt.Errorf("INC after %d replies: %w", c.n, err)
	}
	if c.n > 0 && (r.Value != c.last.Value+1 || r.BootID != c.last.BootID) {
		return fmt.Errorf("reply %d: counter %d boot %s after %d boot %s: not consecutive", c.n+1, r.Value, r.BootID, c.last.Value, c.last.BootID)
	}
	c.last = r
	c.n++
	return nil
}

// protectGuest boots the primary guest (with opts), protects it with o
// (heartbeatTimeout unless o says otherwise), waits for commits epochs and
// connects a client that checks its replies are consecutive.
func protectGuest(t *testing.T, ctx context.Context, l *lab.Lab, o lab.ProtectOptions, commits int, opts ...func(*protectedGuest) error) (*protectedGuest, *lab.Protection, *consecutiveClient) {
	t.Helper()
	g := bootPrimary(t, l, ctx, 4000, opts...)
	if o.HeartbeatTimeout == 0 {
		o.HeartbeatTimeout = heartbeatTimeout
	}
	p, err := l.Protect(g.prim, g.back, o)
	if err != nil {
		t.Fatal(err)
	}
	dump(t, l, p)
	if _, err := p.WaitCommitted(ctx, commits); err != nil {
		t.Fatal(err)
	}
	return g, p, newConsecutiveClient(t, ctx, l)
}

// TestPrimaryRestartNeverFailsOver stops `remusd primary` with SIGTERM and
// starts it again, five times, as an upgrade does. Each stop says goodbye,
// so the backup never resumes the guest (there stays one guest); each
// restart protects it again; and the client's counter on one TCP
// connection stays consecutive throughout.
func TestPrimaryRestartNeverFailsOver(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{}, 1)
	for i := 1; i <= 5; i++ {
		c.incFor(time.Second)
		if err := p.Primary.Stop(30 * time.Second); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(p.Primary.Output(), "telling the backup the session ends") {
			t.Fatalf("restart %d: the primary did not say goodbye:\n%s", i, p.Primary.Output())
		}
		// Longer than the heartbeat timeout: a backup that took the end
		// for a death would fail over now.
		time.Sleep(2 * heartbeatTimeout)
		if _, err := lab.ReadReport(p.Report); err == nil {
			t.Fatalf("restart %d: the backup failed over from a primary that said goodbye", i)
		}
		before, err := p.Epochs()
		if err != nil {
			t.Fatal(err)
		}
		if err := p.RestartPrimary(); err != nil {
			t.Fatal(err)
		}
		if _, err := p.WaitCommitted(ctx, len(before)+3); err != nil {
			t.Fatalf("restart %d: not protected again: %v", i, err)
		}
	}
	c.incFor(time.Second)
	if strings.Contains(p.Backup.Output(), "failing over") {
		t.Fatalf("the backup failed over:\n%s", p.Backup.Output())
	}
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s, want %s", c.last.BootID, g.ready.BootID)
	}
	t.Logf("5 restarts, %d consecutive replies up to %d, one boot", c.n, c.last.Value)
}

// TestPortScanDuringSessionHasNoEffect connects to the backup's port while
// a session runs: plain connects that say nothing, garbage, a connection
// that closes at once. None of them is a session: epochs keep committing,
// nothing fails over, and the client is served throughout.
func TestPortScanDuringSessionHasNoEffect(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{}, 1)
	c.incFor(500 * time.Millisecond)
	var silent []net.Conn
	defer func() {
		for _, s := range silent {
			s.Close()
		}
	}()
	for i := 0; i < 20; i++ {
		s, err := net.Dial("tcp", p.BackupAddr)
		if err != nil {
			t.Fatalf("scan %d: %v", i, err)
		}
		switch i % 3 {
		case 0: // says nothing, stays open
			silent = append(silent, s)
		case 1: // garbage
			s.Write([]byte("GET / HTTP/1.0\r\n\r\n\x00\xffRMUS garbage"))
			s.Close()
		case 2: // connects and leaves
			s.Close()
		}
	}
	before, _ := p.Epochs()
	c.incFor(3 * time.Second)
	after, _ := p.Epochs()
	if len(after) < len(before)+10 {
		t.Fatalf("%d epochs committed during the scan, want protection going on", len(after)-len(before))
	}
	if _, err := lab.ReadReport(p.Report); err == nil {
		t.Fatal("the backup failed over during a port scan")
	}
	select {
	case <-p.Primary.Done():
		t.Fatalf("the primary ended:\n%s", p.Primary.Output())
	default:
	}
	t.Logf("%d epochs committed while 20 scan connections came and went", len(after)-len(before))
}

// TestHangingStopHandsTheGuestOver freezes the primary QEMU (SIGSTOP), so
// that QMP stop never returns. The checkpoint's command timeout ends the
// wait: the primary kills its guest and tells the backup to resume at once.
// Exactly one guest runs afterwards: the backup's, same boot, and the
// client's counter carries on.
func TestHangingStopHandsTheGuestOver(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// A long heartbeat timeout: the handover, not silence, must decide.
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{HeartbeatTimeout: time.Minute,
		PrimaryArgs: []string{"--command-timeout", "2s"}}, 1)
	c.incFor(time.Second)
	if err := syscall.Kill(g.vm.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	frozenAt := time.Now()
	select {
	case <-g.vm.Done():
	case <-ctx.Done():
		t.Fatal("the primary's frozen QEMU was never ended")
	}
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Cause, "handed the guest over") {
		t.Fatalf("failover cause %q, want the primary's handover", r.Cause)
	}
	select {
	case <-p.Primary.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the primary remusd did not end after handing the guest over")
	}
	if !strings.Contains(p.Primary.Output(), "handed over to the backup") {
		t.Fatalf("the primary's output does not say it handed over:\n%s", p.Primary.Output())
	}
	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s after the handover, want %s", c.last.BootID, g.ready.BootID)
	}
	t.Logf("stop hung at %s; the backup resumed epoch %d, running %.0f ms after the freeze; %d consecutive replies",
		frozenAt.Format("15:04:05.000"), r.Epoch, float64(r.Running.Sub(frozenAt).Milliseconds()), c.n)
}

// TestUnprotectEndsProtectionCleanly ends protection on the control
// socket (remusctl unprotect) of a guest with a disk: the backup confirms
// it will not resume the guest (it never does), the primary remusd exits
// cleanly, and the guest's QEMU is left as it was before protection: the
// guest running, no block job, no mirror node, no migration capability
// left on, no descriptor set.
func TestUnprotectEndsProtectionCleanly(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{}, 3, withDisk(l, 64))
	c.incFor(time.Second)
	r, err := p.Unprotect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Confirmed {
		t.Fatalf("unprotect: %s", r.Result)
	}
	select {
	case <-p.Primary.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the primary remusd still runs after unprotect")
	}
	time.Sleep(2 * heartbeatTimeout)
	if _, err := lab.ReadReport(p.Report); err == nil {
		t.Fatal("the backup resumed the guest after unprotect")
	}
	mon, err := qmp.Dial(ctx, g.prim.QMP[0])
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if st, err := qemu.Status(ctx, mon); err != nil || st != "running" {
		t.Fatalf("guest %q (%v) after unprotect, want running", st, err)
	}
	if jobs, err := blockJobs(ctx, mon); err != nil || len(jobs) > 0 {
		t.Errorf("block jobs %v (%v) after unprotect, want none", jobs, err)
	}
	var nodes []struct {
		NodeName string `json:"node-name"`
	}
	if err := mon.Execute(ctx, "query-named-block-nodes", map[string]bool{"flat": true}, &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.NodeName != testvm.DiskNode && n.NodeName != testvm.DiskNode+"-file" {
			t.Errorf("block node %q left after unprotect", n.NodeName)
		}
	}
	for _, capName := range []qemu.Capability{qemu.IgnoreShared, "events"} {
		if on, err := qemu.CapabilityOn(ctx, mon, capName); err != nil || on {
			t.Errorf("migration capability %s on (%v) after unprotect", capName, err)
		}
	}
	var fdsets []struct {
		ID int `json:"fdset-id"`
	}
	if err := mon.Execute(ctx, "query-fdsets", nil, &fdsets); err != nil || len(fdsets) > 0 {
		t.Errorf("descriptor sets %v (%v) left in QEMU after unprotect", fdsets, err)
	}
	if !strings.Contains(p.Primary.Output(), "protection ends: asked on the control socket") {
		t.Errorf("the primary did not log why protection ended:\n%s", p.Primary.Output())
	}
	t.Logf("%s; %d replies before", r.Result, c.n)
}

// TestStatusShowsTheInitialSync protects the guest over a link held to
// 8 MiB/s, so that the live copy of its RAM takes seconds, and reads the
// primary's status all along: syncing, with the round and the share of RAM
// sent growing, then protecting once the first epoch committed.
func TestStatusShowsTheInitialSync(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootPrimary(t, l, ctx, 4000)
	var proxy *lab.LinkProxy
	p, err := l.Protect(g.prim, g.back, lab.ProtectOptions{HeartbeatTimeout: 3 * time.Second, Via: func(backup string) (string, error) {
		var err error
		if proxy, err = lab.NewLinkProxy("127.0.0.1:0", backup, 1); err != nil {
			return "", err
		}
		t.Cleanup(proxy.Close)
		proxy.Limit(8 << 20)
		return proxy.Addr(), nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	dump(t, l, p)
	var syncing []agent.SyncStatus
	for {
		st, err := p.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == "syncing" {
			if st.Sync == nil || st.Sync.RAMPages != 256<<20/4096 {
				t.Fatalf("syncing without progress: %+v", st)
			}
			syncing = append(syncing, *st.Sync)
		}
		if st.State == "protecting" {
			if st.Sync != nil || st.CommittedEpoch == 0 {
				t.Fatalf("protecting: %+v", st)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("not protecting: %+v", st)
		case <-time.After(100 * time.Millisecond):
		}
	}
	proxy.Limit(0)
	if len(syncing) < 2 {
		t.Fatalf("saw the sync %d times; the link was slow enough for more", len(syncing))
	}
	first, last := syncing[0], syncing[len(syncing)-1]
	for i := 1; i < len(syncing); i++ {
		if syncing[i].Pages < syncing[i-1].Pages || syncing[i].Round < syncing[i-1].Round {
			t.Fatalf("sync progress went back: %+v after %+v", syncing[i], syncing[i-1])
		}
	}
	if last.Pages <= first.Pages {
		t.Fatalf("sync progress did not grow: %+v to %+v", first, last)
	}
	t.Logf("syncing seen %d times: from round %d, %.0f%% to round %d, %.0f%% (%d pages sent); then protecting", len(syncing), first.Round, first.Percent, last.Round, last.Percent, last.Pages)
}

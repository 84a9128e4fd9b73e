package agent

import (
	"context"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/netbuffer"
)

// recMonitor records the QMP commands that reach QEMU.
type recMonitor struct {
	mu   sync.Mutex
	cmds []string
}

func (m *recMonitor) Execute(_ context.Context, cmd string, _, _ any) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cmds = append(m.cmds, cmd)
	return nil
}

func (m *recMonitor) take() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := strings.Join(m.cmds, " ")
	m.cmds = nil
	return s
}

// recOutput records what the output commit is asked.
type recOutput struct{ events []string }

func (o *recOutput) Hold() error                       { o.events = append(o.events, "hold"); return nil }
func (o *recOutput) Cut(context.Context, uint64) error { return nil }
func (o *recOutput) Commit(uint64) netbuffer.Release {
	o.events = append(o.events, "commit")
	return netbuffer.Release{}
}
func (o *recOutput) PassThrough() { o.events = append(o.events, "pass") }

// TestGateKeepsAFrozenGuestStopped: the guard's freeze is not undone by a
// checkpoint's cont, whether the guest was running or paused by the
// checkpoint when it froze; thaw continues it unless a checkpoint holds it.
func TestGateKeepsAFrozenGuestStopped(t *testing.T) {
	ctx := context.Background()
	m := &recMonitor{}
	g := &gate{mon: m}
	thaw := func() error {
		ok, err := g.thaw(ctx)
		if !ok {
			t.Fatal("thaw refused with no checkpoint command under way")
		}
		return err
	}
	for _, c := range []struct {
		do   func() error
		want string
	}{
		{func() error { return g.freeze(ctx) }, "stop"},                    // running: stopped now
		{func() error { return g.Execute(ctx, "stop", nil, nil) }, "stop"}, // a checkpoint's pause
		{func() error { return g.Execute(ctx, "cont", nil, nil) }, ""},     // kept back
		{func() error { return g.Execute(ctx, "query-status", nil, nil) }, "query-status"},
		{thaw, "cont"},
		{func() error { return g.Execute(ctx, "stop", nil, nil) }, "stop"}, // paused by a checkpoint...
		{func() error { return g.freeze(ctx) }, "stop"},                    // ...frozen meanwhile: stop again, harmless
		{func() error { return g.Execute(ctx, "cont", nil, nil) }, ""},     // its cont kept back
		{func() error { return g.Execute(ctx, "stop", nil, nil) }, "stop"}, // next checkpoint
		{thaw, ""}, // thawed mid-checkpoint: no cont under it
		{func() error { return g.Execute(ctx, "cont", nil, nil) }, "cont"}, // the checkpoint's cont goes through
	} {
		if err := c.do(); err != nil {
			t.Fatal(err)
		}
		if got := m.take(); got != c.want {
			t.Fatalf("QEMU got %q, want %q", got, c.want)
		}
	}
}

// hangMonitor's stop hangs until released, as QEMU's does behind a wedged
// main loop; other commands answer at once.
type hangMonitor struct {
	recMonitor
	release chan struct{}
	hanging chan struct{}
}

func (m *hangMonitor) Execute(ctx context.Context, cmd string, a, r any) error {
	if cmd == "stop" && m.hanging != nil {
		h := m.hanging
		m.hanging = nil
		close(h)
		select {
		case <-m.release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return m.recMonitor.Execute(ctx, cmd, a, r)
}

// TestGateFreezeDoesNotWaitForAHungCheckpoint: while a checkpoint's stop
// hangs, the guard's freeze goes straight to QEMU (and reports its own
// timeout, so that the guard can kill the guest), and thaw says to try
// again instead of waiting.
func TestGateFreezeDoesNotWaitForAHungCheckpoint(t *testing.T) {
	m := &hangMonitor{release: make(chan struct{}), hanging: make(chan struct{})}
	g := &gate{mon: m}
	hanging := m.hanging
	loopDone := make(chan error, 1)
	go func() { loopDone <- g.Execute(context.Background(), "stop", nil, nil) }()
	<-hanging
	if ok, _ := g.thaw(context.Background()); ok {
		t.Fatal("thaw went ahead under a checkpoint's hung stop")
	}
	// The checkpoint's stop hangs until released below: a freeze that
	// waited for it would end with its context.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := g.freeze(ctx); err != nil {
		t.Fatalf("freeze: %v: it waited for the checkpoint's hung stop", err)
	}
	close(m.release)
	if err := <-loopDone; err != nil {
		t.Fatal(err)
	}
	if err := g.Execute(context.Background(), "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	if got := m.take(); got != "stop stop" {
		t.Fatalf("QEMU got %q, want the guard's and the checkpoint's stops and no cont", got)
	}
}

// TestGatedOutputPassesOnlyUnderTheLease: a PassThrough (running
// unprotected) waits for a trusted lease; a new session's Hold cancels it.
func TestGatedOutputPassesOnlyUnderTheLease(t *testing.T) {
	o := &recOutput{}
	g := &gate{mon: &recMonitor{}, out: o}
	out := g.output()
	out.PassThrough()
	if slices.Contains(o.events, "pass") {
		t.Fatal("output passed without a trusted lease")
	}
	g.allowPass(true)
	if !slices.Equal(o.events, []string{"pass"}) {
		t.Fatalf("events %v: want the waiting pass once the lease is trusted", o.events)
	}
	g.allowPass(false)
	out.PassThrough()
	out.Hold()
	out.Commit(1)
	g.allowPass(true)
	if !slices.Equal(o.events, []string{"pass", "hold", "commit"}) {
		t.Fatalf("events %v: a Hold after a waiting pass cancels it", o.events)
	}
	out.PassThrough()
	if o.events[len(o.events)-1] != "pass" {
		t.Fatal("under a trusted lease PassThrough goes through")
	}
	if (&gate{}).output() != nil {
		t.Fatal("a gate without output commit must give none")
	}
}

// TestKillGuestNow: the guard's kill is a SIGKILL through the pidfd taken
// at attach, and returns once the process is gone (a zombie counts).
func TestKillGuestNow(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	proc, err := os.FindProcess(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	s := &primarySession{q: &QEMU{PID: cmd.Process.Pid, Proc: proc}}
	if err := s.killGuestNow(); err != nil {
		t.Fatal(err)
	}
	if !s.guestGone() {
		t.Fatal("the process is still there")
	}
	// Gone already: nothing to do, no error.
	if err := s.killGuestNow(); err != nil {
		t.Fatalf("second kill: %v", err)
	}
}

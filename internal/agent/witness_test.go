package agent

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"

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
	for _, c := range []struct {
		do   func() error
		want string
	}{
		{func() error { return g.freeze(ctx) }, "stop"},                    // running: stopped now
		{func() error { return g.Execute(ctx, "stop", nil, nil) }, "stop"}, // a checkpoint's pause
		{func() error { return g.Execute(ctx, "cont", nil, nil) }, ""},     // kept back
		{func() error { return g.Execute(ctx, "query-status", nil, nil) }, "query-status"},
		{func() error { return g.thaw(ctx) }, "cont"},
		{func() error { return g.Execute(ctx, "stop", nil, nil) }, "stop"}, // paused by a checkpoint...
		{func() error { return g.freeze(ctx) }, ""},                        // ...frozen meanwhile: no second stop
		{func() error { return g.Execute(ctx, "cont", nil, nil) }, ""},     // its cont kept back
		{func() error { return g.Execute(ctx, "stop", nil, nil) }, "stop"}, // next checkpoint
		{func() error { return g.thaw(ctx) }, ""},                          // thawed mid-checkpoint: no cont under it
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

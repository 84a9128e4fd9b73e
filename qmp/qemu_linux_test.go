package qmp_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/qmp"
)

// statusInfo is query-status's return value.
type statusInfo struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

// qemuProcess is a QEMU with no guest and a QMP socket.
type qemuProcess struct {
	cmd    *exec.Cmd
	socket string
	stderr *lockedBuffer
	exited chan struct{} // closed when the process has been reaped
	kill   func()        // kills QEMU and waits for it; idempotent
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startQEMU starts qemu-system-x86_64 with no guest under TCG and a QMP
// monitor on a unix socket. QEMU is killed and reaped in t.Cleanup, and by
// the kernel should the test binary die (Pdeathsig).
func startQEMU(t *testing.T, extra ...string) *qemuProcess {
	t.Helper()
	bin := testenv.RequireQEMU(t)
	// A short directory: unix socket paths are limited to 107 bytes.
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	args := append([]string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "q35", "-accel", "tcg", "-m", "64",
		"-chardev", "socket,id=qmp0,path=" + sock + ",server=on,wait=off",
		"-mon", "chardev=qmp0,mode=control",
	}, extra...)
	cmd := exec.CommandContext(t.Context(), bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	q := &qemuProcess{cmd: cmd, socket: sock, stderr: &lockedBuffer{}, exited: make(chan struct{})}
	cmd.Stdout = q.stderr
	cmd.Stderr = q.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		cmd.Wait()
		close(q.exited)
	}()
	q.kill = sync.OnceFunc(func() {
		cmd.Process.Kill()
		<-q.exited
	})
	t.Cleanup(q.kill)
	return q
}

// dial connects to the QMP socket, retrying until QEMU has created it.
func (q *qemuProcess) dial(t *testing.T, ctx context.Context, opts ...qmp.Option) *qmp.Client {
	t.Helper()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := qmp.Dial(ctx, q.socket, opts...)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("connect to QEMU's QMP socket: %v\nQEMU output:\n%s", err, q.stderr)
		}
		select {
		case <-tick.C:
		case <-q.exited:
			t.Fatalf("QEMU exited before its QMP socket accepted (%v)\nQEMU output:\n%s", q.cmd.ProcessState, q.stderr)
		case <-ctx.Done():
			t.Fatalf("QEMU's QMP socket %s did not accept: %v (last error: %v)\nQEMU output:\n%s", q.socket, ctx.Err(), err, q.stderr)
		}
	}
}

func TestQEMU(t *testing.T) {
	q := startQEMU(t)
	ctx := testContext(t)
	c := q.dial(t, ctx)
	t.Logf("QEMU %s, capabilities %q", c.Version(), c.Capabilities())

	t.Run("query-version matches the greeting", func(t *testing.T) {
		v, err := qmp.Run[qmp.Version](ctx, c, "query-version", nil)
		if err != nil {
			t.Fatal(err)
		}
		if v != c.Version() || v.Major == 0 {
			t.Errorf("query-version = %+v, greeting = %+v", v, c.Version())
		}
	})

	t.Run("getfd takes a descriptor passed with the command", func(t *testing.T) {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		defer w.Close()
		// closefd of a name QEMU does not hold fails; after getfd it works:
		// the descriptor arrived under that name.
		if err := c.Execute(ctx, "closefd", map[string]string{"fdname": "passed"}, nil); err == nil {
			t.Fatal("closefd of an unknown name succeeded")
		}
		if err := c.ExecuteWithFile(ctx, "getfd", map[string]string{"fdname": "passed"}, nil, r); err != nil {
			t.Fatalf("getfd: %v", err)
		}
		if err := c.Execute(ctx, "closefd", map[string]string{"fdname": "passed"}, nil); err != nil {
			t.Fatalf("closefd after getfd: %v", err)
		}
		// Without a descriptor, getfd fails.
		if err := c.Execute(ctx, "getfd", map[string]string{"fdname": "none"}, nil); err == nil {
			t.Fatal("getfd without a descriptor succeeded")
		}
	})

	t.Run("a machine started without -S is running", func(t *testing.T) {
		st, err := qmp.Run[statusInfo](ctx, c, "query-status", nil)
		if err != nil {
			t.Fatal(err)
		}
		if st != (statusInfo{Status: "running", Running: true}) {
			t.Errorf("query-status = %+v, want running", st)
		}
	})

	t.Run("stop and cont with their events", func(t *testing.T) {
		sub := c.Subscribe("STOP", "RESUME")
		defer sub.Close()
		for _, step := range []struct {
			command, event, status string
		}{
			{"stop", "STOP", "paused"},
			{"cont", "RESUME", "running"},
		} {
			before := time.Now()
			if err := c.Execute(ctx, step.command, nil, nil); err != nil {
				t.Fatalf("%s: %v", step.command, err)
			}
			ev, err := sub.Wait(ctx, nil)
			if err != nil {
				t.Fatalf("after %s: %v", step.command, err)
			}
			if ev.Name != step.event {
				t.Errorf("after %s got event %s, want %s", step.command, ev.Name, step.event)
			}
			if d := ev.Time.Sub(before); d < -time.Second || d > time.Minute {
				t.Errorf("%s event time %v is %v away from the command", ev.Name, ev.Time, d)
			}
			st, err := qmp.Run[statusInfo](ctx, c, "query-status", nil)
			if err != nil {
				t.Fatal(err)
			}
			if st.Status != step.status || st.Running != (step.status == "running") {
				t.Errorf("after %s query-status = %+v, want %s", step.command, st, step.status)
			}
		}
	})

	t.Run("errors keep their class", func(t *testing.T) {
		for _, tt := range []struct {
			command   string
			args      any
			wantClass string
			wantDesc  string
		}{
			{"no-such-command", nil, "CommandNotFound", "The command no-such-command has not been found"},
			{"qmp_capabilities", nil, "CommandNotFound", "Capabilities negotiation is already complete, command ignored"},
			{"query-status", map[string]int{"x": 1}, "GenericError", "Parameter 'x' is unexpected"},
		} {
			err := c.Execute(ctx, tt.command, tt.args, nil)
			var qe *qmp.Error
			if !errors.As(err, &qe) {
				t.Fatalf("%s: error %v, want a *qmp.Error", tt.command, err)
			}
			if *qe != (qmp.Error{Command: tt.command, Class: tt.wantClass, Desc: tt.wantDesc}) {
				t.Errorf("%s: error %+v, want class %s, desc %q", tt.command, *qe, tt.wantClass, tt.wantDesc)
			}
		}
	})

	t.Run("concurrent commands", func(t *testing.T) {
		errc := make(chan error, 16)
		var wg sync.WaitGroup
		for range cap(errc) {
			wg.Go(func() {
				for range 10 {
					st, err := qmp.Run[statusInfo](ctx, c, "query-status", nil)
					if err == nil && st.Status != "running" {
						err = fmt.Errorf("status %q", st.Status)
					}
					if err != nil {
						errc <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Error(err)
		}
	})

	if t.Failed() {
		t.Logf("QEMU output:\n%s", q.stderr)
	}
}

func TestQEMUPrelaunch(t *testing.T) {
	q := startQEMU(t, "-S")
	ctx := testContext(t)
	c := q.dial(t, ctx)
	st, err := qmp.Run[statusInfo](ctx, c, "query-status", nil)
	if err != nil {
		t.Fatal(err)
	}
	if st != (statusInfo{Status: "prelaunch"}) {
		t.Errorf("query-status under -S = %+v, want prelaunch, not running", st)
	}
	sub := c.Subscribe("RESUME")
	defer sub.Close()
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.Wait(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if st, err := qmp.Run[statusInfo](ctx, c, "query-status", nil); err != nil || st.Status != "running" {
		t.Errorf("after cont query-status = %+v, %v; want running", st, err)
	}
}

func TestQEMUKilled(t *testing.T) {
	q := startQEMU(t)
	ctx := testContext(t)
	c := q.dial(t, ctx)
	if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
	q.kill()
	waitClosed(t, c.Done(), "the client to notice QEMU died")
	if err := c.Err(); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("Err() = %v, want ErrClosed", err)
	}
	t.Logf("after kill: %v", c.Err())
	err := c.Execute(ctx, "query-status", nil, nil)
	if !errors.Is(err, qmp.ErrClosed) || !strings.HasPrefix(err.Error(), "qmp: query-status: connection closed: ") {
		t.Errorf("Execute after QEMU was killed = %v, want ErrClosed", err)
	}
}

// TestQEMUKilledMidCommand kills QEMU while commands are in flight: each
// either completes or fails with ErrClosed, none hangs.
func TestQEMUKilledMidCommand(t *testing.T) {
	q := startQEMU(t)
	ctx := testContext(t)
	c := q.dial(t, ctx)
	const workers = 8
	errc := make(chan error, workers)
	started := make(chan struct{}, workers)
	for range workers {
		go func() {
			started <- struct{}{}
			for {
				if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	for range workers {
		receive(t, started, "workers to start")
	}
	q.kill()
	for range workers {
		if err := receive(t, errc, "a worker to fail"); !errors.Is(err, qmp.ErrClosed) {
			t.Errorf("Execute while QEMU died = %v, want ErrClosed", err)
		}
	}
}

package agent

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/qmp/qmptest"
)

// standIn is a process standing in for QEMU, reaped when it ends.
func standIn(t *testing.T) (*exec.Cmd, <-chan struct{}) {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	return cmd, done
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestDeadman(t *testing.T) {
	for _, tc := range []struct {
		name       string
		input      string // what the agent wrote before the pipe closed
		hold       bool   // QEMU does not answer stop
		gone       bool   // QEMU exited before the agent
		wantStop   bool
		wantAction string // in the marker; "" no marker
		wantKilled bool
	}{
		{name: "agent died", input: "", wantStop: true, wantAction: "stopped"},
		{name: "agent died mid-line", input: "disa", wantStop: true, wantAction: "stopped"},
		{name: "disarmed", input: "disarm\n", wantStop: false},
		{name: "qemu hangs", input: "", hold: true, wantStop: true, wantAction: "killed", wantKilled: true},
		{name: "qemu gone", input: "", gone: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "qmp.sock")
			srv := qmptest.ListenUnix(t, sock)
			if tc.hold {
				srv.Hold("stop")
			}
			proc, exited := standIn(t)
			if tc.gone {
				proc.Process.Kill()
				<-exited
			}
			cfg := DeadmanConfig{QMPSocket: sock, PID: proc.Process.Pid, StateDir: dir, Budget: 300 * time.Millisecond}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := RunDeadman(ctx, cfg, strings.NewReader(tc.input), quietLog()); err != nil {
				t.Fatal(err)
			}
			if got := slices.Contains(srv.CommandNames(), "stop"); got != tc.wantStop {
				t.Errorf("stop sent: %v, want %v (commands %v)", got, tc.wantStop, srv.CommandNames())
			}
			m := ReadDeadmanMarker(dir, proc.Process.Pid)
			switch {
			case tc.wantAction == "" && m != nil:
				t.Errorf("marker %+v, want none", m)
			case tc.wantAction != "" && (m == nil || m.Action != tc.wantAction):
				t.Errorf("marker %+v, want action %q", m, tc.wantAction)
			}
			if ReadDeadmanMarker(dir, proc.Process.Pid+1) != nil {
				t.Error("a marker names one QEMU only")
			}
			select {
			case <-exited:
				if !tc.wantKilled && !tc.gone {
					t.Error("QEMU was killed; want it stopped and alive")
				}
			case <-time.After(500 * time.Millisecond):
				if tc.wantKilled {
					t.Error("QEMU still runs; want it killed after the budget")
				}
			}
		})
	}
}

// TestDeadmanProcessOutlivesAgent runs the deadman as remusd does, a
// process of its own fed by a pipe, and checks that the pipe's end alone
// (as when the agent is killed) makes it stop the guest.
func TestDeadmanProcessOutlivesAgent(t *testing.T) {
	if os.Getenv("REMUS_DEADMAN_CHILD") == "1" {
		cfg := DeadmanConfig{QMPSocket: os.Getenv("REMUS_QMP"), StateDir: os.Getenv("REMUS_DIR")}
		cfg.PID = os.Getppid() // any live process: it is only stopped over QMP
		if err := RunDeadman(context.Background(), cfg, os.Stdin, quietLog()); err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "qmp.sock")
	srv := qmptest.ListenUnix(t, sock)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run", "^TestDeadmanProcessOutlivesAgent$")
	cmd.Env = append(os.Environ(), "REMUS_DEADMAN_CHILD=1", "REMUS_QMP="+sock, "REMUS_DIR="+dir)
	w, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if slices.Contains(srv.CommandNames(), "stop") {
		t.Fatal("stopped the guest while the agent lives")
	}
	w.Close() // the agent's end of the pipe goes with it
	if err := cmd.Wait(); err != nil {
		t.Fatalf("deadman: %v", err)
	}
	if !slices.Contains(srv.CommandNames(), "stop") {
		t.Fatalf("the deadman did not stop the guest: commands %v", srv.CommandNames())
	}
}

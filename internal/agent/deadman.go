package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
)

// The deadman is what stops the primary's guest when `remusd primary` dies
// without ending its session (SIGKILL, a crash, the OOM killer): the
// guest's QEMU does not die with its agent, and a backup that hears
// nothing more resumes the guest once the witness lease ran out (or its
// fence said so) — without the deadman the old copy would run on beside
// it. The primary starts it as a process of its own (`remusd deadman`, in
// its own process group, ignoring SIGTERM and SIGINT), holding the write
// end of a pipe to its stdin. When the pipe closes without the word
// "disarm" first, the agent is gone: the deadman stops the guest over the
// agent's QMP socket (QEMU accepts it once the agent's connection closed)
// or, failing that within its budget, kills QEMU; it notes that in
// STATE-DIR/deadman-stopped.json, so that the next `remusd primary` knows
// the guest was stopped for safety, not by someone else, and continues it
// once it holds the witness lease again. The agent disarms it only when
// the backup confirmed that it will not resume the guest (a goodbye it
// answered), or the guest is gone.

// DeadmanCommand is the hidden remusd subcommand that runs RunDeadman.
const DeadmanCommand = "deadman"

// deadmanDisarm is the line that disarms the deadman.
const deadmanDisarm = "disarm"

// DefaultDeadmanBudget is how long the deadman tries to stop the guest
// before it kills QEMU: well inside the heartbeat timeout and the witness
// lease after which the backup may resume the guest.
const DefaultDeadmanBudget = 500 * time.Millisecond

// DeadmanConfig is what the deadman acts on.
type DeadmanConfig struct {
	QMPSocket string        // the agent's QMP socket
	PID       int           // QEMU's pid
	StateDir  string        // for the marker
	Budget    time.Duration // to stop the guest before killing QEMU (default DefaultDeadmanBudget)
}

// DeadmanStopped is the marker the deadman leaves in the state directory.
type DeadmanStopped struct {
	At     time.Time `json:"at"`
	PID    int       `json:"qemu_pid"`
	Action string    `json:"action"` // "stopped" or "killed"
}

// DeadmanMarker is the marker's path in stateDir.
func DeadmanMarker(stateDir string) string { return filepath.Join(stateDir, "deadman-stopped.json") }

// ReadDeadmanMarker reads the marker the deadman left for QEMU pid; nil
// when there is none for it (a marker of another QEMU is stale).
func ReadDeadmanMarker(stateDir string, pid int) *DeadmanStopped {
	b, err := os.ReadFile(DeadmanMarker(stateDir))
	if err != nil {
		return nil
	}
	var m DeadmanStopped
	if json.Unmarshal(b, &m) != nil || m.PID != pid {
		return nil
	}
	return &m
}

// deadman is the primary's handle on its deadman process.
type deadman struct {
	cmd  *exec.Cmd
	w    *os.File
	done chan struct{}
	log  *slog.Logger
}

// startDeadman starts `remusd deadman` for cfg (remusd being this
// executable); it is armed from the start.
func startDeadman(cfg DeadmanConfig, log *slog.Logger) (*deadman, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("deadman: find remusd: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("deadman: %w", err)
	}
	defer r.Close()
	cmd := exec.Command(exe, DeadmanCommand, "--qmp", cfg.QMPSocket, "--pid", strconv.Itoa(cfg.PID),
		"--state-dir", cfg.StateDir, "--budget", cfg.Budget.String())
	cmd.Stdin, cmd.Stdout, cmd.Stderr = r, os.Stderr, os.Stderr
	// Its own process group: a signal to the agent's group (a terminal's
	// ^C, a kill of the group) does not take it along.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, fmt.Errorf("deadman: start %s %s: %w", exe, DeadmanCommand, err)
	}
	d := &deadman{cmd: cmd, w: w, done: make(chan struct{}), log: log}
	go func() { cmd.Wait(); close(d.done) }()
	log.Info("deadman armed: if this agent dies without a goodbye, the guest is stopped", "pid", cmd.Process.Pid)
	return d, nil
}

// disarm lets the guest run on after this agent exits, and waits briefly
// for the deadman to go.
func (d *deadman) disarm() {
	if _, err := io.WriteString(d.w, deadmanDisarm+"\n"); err != nil {
		d.log.Warn("disarm the deadman", "err", err)
	}
	d.w.Close()
	select {
	case <-d.done:
	case <-time.After(2 * time.Second):
		d.log.Warn("the deadman did not exit after it was disarmed")
	}
}

// release leaves the deadman armed: it acts once this process is gone
// (the pipe closes with the process, whatever way it ends).
func (d *deadman) release() {
	d.log.Warn("exiting with the deadman armed: it stops the guest now, since the backup may resume it")
	d.w.Close()
}

// RunDeadman waits for the agent's word on stdin: "disarm" and the end of
// it lets the guest run on; the end alone (the agent died) stops the
// guest, or kills its QEMU when it cannot be stopped within the budget.
func RunDeadman(ctx context.Context, cfg DeadmanConfig, stdin io.Reader, log *slog.Logger) error {
	// A service manager's SIGTERM to the whole group reaches the deadman
	// too; only its agent's word or death counts.
	signal.Ignore(syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	if cfg.Budget <= 0 {
		cfg.Budget = DefaultDeadmanBudget
	}
	log = log.With("qemu_pid", cfg.PID)
	// Held from now on: a signal can never reach another process that
	// reused the pid after QEMU ended.
	proc, err := os.FindProcess(cfg.PID)
	if err != nil {
		return fmt.Errorf("deadman: QEMU pid %d: %w", cfg.PID, err)
	}
	disarmed := false
	sc := bufio.NewScanner(stdin)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == deadmanDisarm {
			disarmed = true
		}
	}
	if disarmed {
		return nil
	}
	if errors.Is(proc.Signal(syscall.Signal(0)), os.ErrProcessDone) {
		return nil // the guest is gone already
	}
	log.Error("remusd primary is gone without ending its session: stopping the guest, so that only the backup may resume it")
	action := "stopped"
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.Budget)
	err = stopOver(sctx, cfg.QMPSocket)
	cancel()
	if err != nil {
		log.Error("the guest could not be stopped in time: killing its QEMU", "err", err)
		if kerr := proc.Signal(syscall.SIGKILL); kerr != nil && !errors.Is(kerr, os.ErrProcessDone) {
			return fmt.Errorf("deadman: the guest could be neither stopped (%v) nor killed: %w", err, kerr)
		}
		action = "killed"
	}
	b, _ := json.Marshal(DeadmanStopped{At: time.Now(), PID: cfg.PID, Action: action})
	if err := os.WriteFile(DeadmanMarker(cfg.StateDir), b, 0o600); err != nil {
		log.Warn("write the deadman's marker (the next agent will not continue the guest by itself)", "err", err)
	}
	log.Warn("guest "+action+" by the deadman; the next remusd primary continues it if the backup did not resume it", "marker", DeadmanMarker(cfg.StateDir))
	return nil
}

// stopOver stops the guest over the QMP socket at path, trying again
// while QEMU has not yet taken the place of the connection that just
// closed.
func stopOver(ctx context.Context, path string) error {
	for {
		mon, err := qmp.Dial(ctx, path)
		if err == nil {
			err = qemu.Stop(ctx, mon)
			mon.Close()
			if err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stop the guest over %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

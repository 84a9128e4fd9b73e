package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-libvirt"
	"golang.org/x/sys/unix"
)

// record is what the daemon keeps of a VM, in STATE-DIR/vms/NAME.json: the
// agent it runs for it and how to run it again. The agent is a process of
// its own (remusd primary or remusd backup, in a session of its own), so a
// daemon that exits or restarts leaves protection running; the next daemon
// adopts the agent by its pid.
type record struct {
	Name   string `json:"name"`
	Role   string `json:"role"`
	Domain string `json:"domain"`
	Peer   string `json:"peer"`
	// Request is what a primary was protected with, QEMUVersion the
	// version of the QEMU that runs its guest.
	Request     ProtectRequest `json:"request,omitzero"`
	QEMUVersion string         `json:"qemu_version,omitempty"`
	// Args are the agent's arguments after the remusd binary.
	Args     []string `json:"args"`
	Control  string   `json:"control"`
	StateDir string   `json:"state_dir"`
	// NetArgs are the agent's arguments for a NIC it relays (--net-guest,
	// --net-tap, --net-netns), which a relay takes over when the guest
	// runs unprotected.
	NetArgs []string `json:"net_args,omitempty"`
	// Relay: the agent is remusd relay, the NIC of a guest that runs
	// here unprotected.
	Relay bool `json:"relay,omitempty"`
	// DiskImage is a backup's copy of the guest's disk.
	DiskImage string `json:"disk_image,omitempty"`
	// AgentPort is a backup agent's TCP port.
	AgentPort int       `json:"agent_port,omitempty"`
	PID       int       `json:"pid,omitempty"`
	Since     time.Time `json:"since,omitzero"`
	Restarts  int       `json:"restarts,omitempty"`
	// Wanted: the agent should run; one that dies is started again while
	// what it serves is still there (see Daemon.agentExited).
	Wanted bool `json:"wanted"`
	// Ended says why the agent is not running, when it is not.
	Ended string `json:"ended,omitempty"`
	// EndState is the state the VM is in after the agent ended.
	EndState string `json:"end_state,omitempty"`
}

// vm is a record and its running agent.
type vm struct {
	mu  sync.Mutex
	rec record
	// exited is closed when the agent process of rec.PID exits.
	exited chan struct{}
	// restartTimes are the recent restarts, for the restart budget.
	restartTimes []time.Time
}

func (v *vm) snapshot() record {
	v.mu.Lock()
	defer v.mu.Unlock()
	r := v.rec
	r.Args = slices.Clone(r.Args)
	return r
}

// alive reports whether the agent process runs.
func (v *vm) alive() bool {
	v.mu.Lock()
	ch := v.exited
	v.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return false
	default:
		return true
	}
}

func (d *Daemon) recordPath(name string) string {
	return filepath.Join(d.cfg.StateDir, "vms", name+".json")
}
func (d *Daemon) logPath(name string) string {
	return filepath.Join(d.cfg.StateDir, "vms", name+".log")
}

// save writes v's record (atomically: a temporary file renamed).
func (d *Daemon) save(v *vm) error {
	r := v.snapshot()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	p := d.recordPath(r.Name)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("save record of %s: %w", r.Name, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("save record of %s: %w", r.Name, err)
	}
	return nil
}

// forget removes v's record.
func (d *Daemon) forget(name string) {
	d.mu.Lock()
	delete(d.vms, name)
	d.mu.Unlock()
	os.Remove(d.recordPath(name))
}

// loadRecords reads the records an earlier daemon left.
func (d *Daemon) loadRecords() ([]record, error) {
	dir := filepath.Join(d.cfg.StateDir, "vms")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read records: %w", err)
	}
	var recs []record
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("read record %s: %w", e.Name(), err)
		}
		var r record
		if err := json.Unmarshal(b, &r); err != nil || r.Name == "" {
			d.log.Warn("ignoring an unreadable record", "file", e.Name(), "err", err)
			continue
		}
		recs = append(recs, r)
	}
	return recs, nil
}

// startAgent starts v's agent as a process in a session of its own (a
// daemon that exits leaves it running), its output appended to
// STATE-DIR/vms/NAME.log.
func (d *Daemon) startAgent(v *vm) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := os.MkdirAll(v.rec.StateDir, 0o700); err != nil {
		return fmt.Errorf("agent state directory: %w", err)
	}
	logf, err := os.OpenFile(d.logPath(v.rec.Name), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("agent log: %w", err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "--- %s: remusd %s\n", d.clock().Format(time.RFC3339), strings.Join(v.rec.Args, " "))
	cmd := exec.Command(d.cfg.Remusd, v.rec.Args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start remusd %s for %s: %w", v.rec.Role, v.rec.Name, err)
	}
	v.rec.PID, v.rec.Since, v.rec.Ended, v.rec.EndState = cmd.Process.Pid, d.clock(), "", ""
	exited := make(chan struct{})
	v.exited = exited
	go func() {
		err := cmd.Wait()
		close(exited)
		d.agentExited(v, cmd.Process.Pid, describeExit(cmd.ProcessState, err))
	}()
	d.log.Info("agent started", "vm", v.rec.Name, "role", v.rec.Role, "pid", v.rec.PID)
	return nil
}

func describeExit(ps *os.ProcessState, err error) string {
	if ps == nil {
		return fmt.Sprintf("agent lost: %v", err)
	}
	return "agent " + ps.String()
}

// adopt watches an agent an earlier daemon started, if it still runs:
// a process with the record's pid whose command line is the record's.
func (d *Daemon) adopt(v *vm) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	pid := v.rec.PID
	if pid <= 0 || !sameCommand(pid, v.rec.Args) {
		return false
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return false
	}
	exited := make(chan struct{})
	v.exited = exited
	go func() {
		defer unix.Close(fd)
		for {
			n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 1000)
			if n > 0 || (err != nil && !errors.Is(err, unix.EINTR)) {
				break
			}
		}
		close(exited)
		d.agentExited(v, pid, "agent exited (adopted: its exit status is not known)")
	}()
	return true
}

// sameCommand reports whether process pid runs with args after its
// binary.
func sameCommand(pid int, args []string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	parts := bytes.Split(bytes.TrimSuffix(b, []byte{0}), []byte{0})
	if len(args) == 0 || len(b) == 0 || len(parts) != len(args)+1 {
		return false
	}
	for i, a := range args {
		if string(parts[i+1]) != a {
			return false
		}
	}
	return true
}

// Restart budget: an agent that dies more than maxRestarts times within
// restartWindow is left failed.
const (
	maxRestarts   = 5
	restartWindow = 5 * time.Minute
	restartDelay  = time.Second
)

// agentExited decides what follows an agent's exit: started again when it
// is wanted and what it serves is still there (a primary's domain still
// active; a backup's standby still waiting), else recorded as ended.
func (d *Daemon) agentExited(v *vm, pid int, how string) {
	v.mu.Lock()
	if v.rec.PID != pid {
		v.mu.Unlock()
		return
	}
	wanted, name := v.rec.Wanted, v.rec.Name
	v.mu.Unlock()
	d.log.Info("agent exited", "vm", name, "pid", pid, "how", how, "wanted", wanted)
	if !wanted || d.ctx.Err() != nil {
		d.ended(v, how, StateEnded)
		return
	}
	ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
	defer cancel()
	restart, why, state := d.shouldRestart(ctx, v)
	if !restart {
		d.ended(v, how+"; "+why, state)
		if r := v.snapshot(); r.Role == RolePrimary && !r.Relay && state == StateEnded {
			// The guest stopped (shut down, or crashed): its backup is
			// released if it holds nothing to resume.
			go d.afterStop(v)
		}
		return
	}
	v.mu.Lock()
	now := d.clock()
	v.restartTimes = slices.DeleteFunc(v.restartTimes, func(t time.Time) bool { return now.Sub(t) > restartWindow })
	if len(v.restartTimes) >= maxRestarts {
		v.rec.Wanted = false
		v.mu.Unlock()
		d.ended(v, fmt.Sprintf("%s; not started again: it exited %d times within %v (see %s)", how, maxRestarts+1, restartWindow, d.logPath(name)), StateFailed)
		return
	}
	v.restartTimes = append(v.restartTimes, now)
	v.rec.Restarts++
	v.mu.Unlock()
	select {
	case <-d.ctx.Done():
		return
	case <-time.After(restartDelay):
	}
	d.log.Warn("starting the agent again", "vm", name, "after", how, "because", why)
	if err := d.startAgent(v); err != nil {
		d.ended(v, fmt.Sprintf("%s; starting it again failed: %v", how, err), StateFailed)
		return
	}
	d.save(v)
}

func (d *Daemon) ended(v *vm, why, state string) {
	v.mu.Lock()
	if v.rec.EndState != StateSwitchedOver { // the agent's exit after a switchover says less
		v.rec.Ended, v.rec.EndState = why, state
	}
	v.mu.Unlock()
	d.save(v)
}

// shouldRestart looks at what the agent served.
func (d *Daemon) shouldRestart(ctx context.Context, v *vm) (bool, string, string) {
	r := v.snapshot()
	st, err := d.hv.domainState(ctx, r.Domain)
	switch {
	case errors.Is(err, errNoDomain):
		return false, "its domain is gone", StateEnded
	case err != nil:
		// libvirt does not answer: the agent itself checks what it finds.
		return true, fmt.Sprintf("libvirt does not answer (%v)", err), ""
	}
	if r.Role == RolePrimary {
		if !active(st) {
			return false, "the domain is " + stateName(st), StateEnded
		}
		return true, "the domain is " + stateName(st), ""
	}
	if _, err := os.Stat(filepath.Join(r.StateDir, "failover.json")); err == nil {
		if st == libvirt.DomainRunning && len(r.NetArgs) > 0 {
			go d.replaceWithRelay(v, "the backup agent that failed over exited")
		}
		return false, "it had failed over: the guest runs here", StateFailedOver
	}
	if st != libvirt.DomainPaused {
		return false, "the standby domain is " + stateName(st), StateEnded
	}
	return true, "the standby domain still waits", ""
}

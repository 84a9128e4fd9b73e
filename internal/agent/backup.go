package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/diskmirror"
	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/transport"
	"github.com/remus-kvm/remus/witness"
)

// BackupConfig is remusd's configuration on the backup host.
type BackupConfig struct {
	VM       string
	Listen   string // host:port for the primary
	RAMImage string // the guest RAM as of the last committed epoch (tmpfs)
	StateDir string // holds the committed device state
	// StageMemory bounds the memory an epoch's pages take while it arrives;
	// beyond it they wait in a file of StateDir (0: no bound).
	StageMemory int64
	// QEMU is the command line that starts the guest here on failover: the
	// primary's, with the RAM backend's mem-path set to RAMImage. remusd
	// adds the arguments that make it wait for the device state.
	QEMU []string
	// QMPSocket is the QMP socket that QEMU command line creates, for
	// remusd to drive the restore.
	QMPSocket string
	// Standby, instead of QEMU, QMPSocket and RAMImage, is the QMP socket
	// of a standby QEMU that runs already, waiting for a device state
	// (-incoming defer), with guest RAM in a shared backend the size of the
	// primary's: libvirt's standby domain. remusd writes committed epochs
	// straight into that RAM and, on failover, hands the device state to
	// that QEMU (getfd, migrate-incoming fd:) and continues it.
	Standby   string
	Heartbeat failover.DetectorConfig
	// Report, when set, receives a JSON FailoverReport after a failover.
	Report string
	// Key, when set, authenticates the link: a primary without the same
	// key is refused before anything it sends is used.
	Key []byte
	// DiskImage, when set, is the backup's copy of the guest's disk (a raw
	// image the size of the primary's); the QEMU command line must use it.
	// It holds the committed epochs' writes only.
	DiskImage string
	// FenceCommand, when set, is a shell command run before the guest is
	// resumed after the primary went silent, STONITH-style: it gets the VM
	// name and the primary's address as its arguments (and in REMUS_VM
	// and REMUS_PRIMARY) and must make sure the primary's copy of the
	// guest runs no more (power the host off, kill its QEMU). A non-zero
	// exit, or FenceTimeout passing, means no failover; it is tried again.
	FenceCommand string
	FenceTimeout time.Duration
	// Net, when enabled, connects the restored guest's NIC to the network
	// after a failover; remusd then keeps relaying until it is stopped or
	// the guest's QEMU exits.
	Net NetConfig
	// Witness, when enabled: the guest is resumed after the primary went
	// silent only once this backup claimed the witness (the primary's
	// lease expired, so its guest is stopped); after a failover remusd
	// holds the lease as the guest's new active side until it is stopped.
	Witness WitnessConfig
	// AssumeFailStop allows running with neither witness nor fence
	// command.
	AssumeFailStop bool
	// Metrics, when set, is a TCP address (host:port) where the agent
	// serves its Prometheus metrics (GET /metrics).
	Metrics string
	// Control is the path of the control socket (remusctl status,
	// metrics); default DefaultControlSocket(StateDir).
	Control string
}

// Validate rejects incomplete configurations.
func (c BackupConfig) Validate() error {
	switch {
	case c.VM == "":
		return errors.New("--vm is required")
	case c.Listen == "":
		return errors.New("--listen is required")
	case c.StateDir == "":
		return errors.New("--state-dir is required")
	case c.Standby != "" && (len(c.QEMU) > 0 || c.RAMImage != "" || c.QMPSocket != ""):
		return errors.New("--standby-qmp names a QEMU that runs already: no QEMU command line, --ram-image or --qmp with it")
	case c.Standby != "":
	case c.RAMImage == "":
		return errors.New("--ram-image is required (or --standby-qmp)")
	case len(c.QEMU) == 0:
		return errors.New("the QEMU command line to start on failover is required (after --), or --standby-qmp")
	case c.QMPSocket == "":
		return errors.New("--qmp is required (the QMP socket of the QEMU started on failover)")
	case !c.Witness.Enabled() && c.FenceCommand == "" && !c.AssumeFailStop:
		return errors.New("neither witness (--witness) nor fence command (--fence-command): " + failStopRisk + "; give either, or --assume-fail-stop to accept that")
	}
	if err := c.Net.Validate(); err != nil {
		return err
	}
	if c.Standby != "" {
		return c.Heartbeat.Validate()
	}
	if _, err := exec.LookPath(c.QEMU[0]); err != nil {
		return fmt.Errorf("QEMU binary: %w", err)
	}
	if !slices.ContainsFunc(c.QEMU, func(a string) bool { return strings.Contains(a, "mem-path="+c.RAMImage) }) {
		return fmt.Errorf("the QEMU command line must put guest RAM in the RAM image: no argument has mem-path=%s", c.RAMImage)
	}
	return c.Heartbeat.Validate()
}

// QEMUPIDFile is where a backup whose state directory is stateDir writes the
// pid of the QEMU it starts on failover, as soon as it started it.
func QEMUPIDFile(stateDir string) string { return filepath.Join(stateDir, "qemu.pid") }

// FailoverReport is what remusd writes after a failover.
type FailoverReport struct {
	VM             string    `json:"vm"`
	Epoch          uint64    `json:"epoch"` // the committed epoch resumed
	LastHeard      time.Time `json:"last_heard"`
	Declared       time.Time `json:"declared"`
	Running        time.Time `json:"running"`
	Cleared        time.Time `json:"cleared,omitzero"`
	DetectionMS    float64   `json:"detection_ms"`       // last frame heard -> declared dead
	ClearMS        float64   `json:"clear_ms,omitempty"` // declared dead -> witness claimed or primary fenced
	RestoreMS      float64   `json:"restore_ms"`         // declared dead (or cleared) -> guest running
	LoadMS         float64   `json:"load_ms"`            // device state load inside QEMU
	QEMUPID        int       `json:"qemu_pid"`
	QEMUVersion    string    `json:"qemu_version"`
	Cause          string    `json:"cause"`
	IncomingURI    string    `json:"incoming_uri"`
	RAMImage       string    `json:"ram_image"`
	DeviceStateLen int64     `json:"device_state_bytes"`
}

// RunBackup waits for the primary and applies its epochs until ctx ends or
// the primary is lost. Sessions that fail for other reasons (a corrupt
// epoch, a primary that restarts) end with the committed image untouched,
// and the next connection starts a new session. On the primary's loss it
// fails over and returns the report; the guest keeps running in the QEMU it
// started, which outlives remusd.
func RunBackup(ctx context.Context, cfg BackupConfig, log *slog.Logger) (*FailoverReport, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("configuration: %w", err)
	}
	log = log.With("vm", cfg.VM)
	metrics := newBackupMetrics(cfg.VM)
	status := newBackupState(cfg.VM)
	if cfg.Metrics != "" {
		_, stop, err := serveMetrics(ctx, cfg.Metrics, metrics.handler(), log)
		if err != nil {
			return nil, err
		}
		defer stop()
	}
	stateFile := filepath.Join(cfg.StateDir, "committed.state")
	var b *checkpoint.Backup
	var ln net.Listener
	var journal *diskmirror.Journal
	var w *witness.Witness
	var standby *QEMU
	defer func() {
		if standby != nil {
			standby.Mon.Close()
		}
		if journal != nil {
			journal.Close()
		}
		if w != nil {
			w.Close()
		}
	}()
	if err := step(ctx, log, "prepare standby", func() (err error) {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return err
		}
		if cfg.Standby != "" {
			if standby, err = attachStandby(ctx, cfg.Standby, log); err != nil {
				return err
			}
			if cfg.RAMImage, err = standby.ramPath(); err != nil {
				return fmt.Errorf("standby QEMU: %w", err)
			}
			log.Info("standby QEMU found: committed epochs go straight into its RAM", "pid", standby.PID, "version", standby.Version.String(),
				"ram_backend", standby.RAM.ID, "ram_bytes", standby.RAM.Size, "ram", cfg.RAMImage)
		}
		bcfg := checkpoint.BackupConfig{VMName: cfg.VM, RAMImage: cfg.RAMImage, RAMFixed: standby != nil, StateFile: stateFile,
			Heartbeat: cfg.Heartbeat, Logger: log, StageMemory: cfg.StageMemory, StageFile: filepath.Join(cfg.StateDir, "staging.pages"),
			OnCommit: func(epoch uint64, _ int) {
				now := time.Now()
				metrics.epochApplied(now)
				status.committed(epoch, now)
			}}
		if cfg.Witness.Enabled() {
			if w, err = cfg.Witness.open(cfg.VM); err != nil {
				return err
			}
			if err := checkBackupSide(ctx, w, log); err != nil {
				return err
			}
			bcfg.Claim = status.claim(claimFor(w, max(cfg.Heartbeat.WithDefaults().Timeout, time.Second)))
		} else if cfg.FenceCommand == "" {
			log.Warn("no witness and no fence command: assuming fail-stop hosts: " + failStopRisk)
		}
		if cfg.FenceCommand != "" {
			bcfg.Fence = status.fence(func(ctx context.Context, primary string) error {
				return fence(ctx, cfg, primary, log)
			})
		}
		if cfg.DiskImage != "" {
			st, err := os.Stat(cfg.DiskImage)
			if err != nil {
				return fmt.Errorf("disk image: %w", err)
			}
			j, err := diskmirror.OpenJournal(cfg.DiskImage, filepath.Join(cfg.StateDir, "disk.journal"), 0)
			if err != nil {
				return err
			}
			journal, bcfg.Disk, bcfg.DiskSize = j, j, uint64(st.Size())
		}
		b, err = checkpoint.NewBackup(bcfg)
		if err != nil {
			return err
		}
		var lc net.ListenConfig
		ln, err = lc.Listen(ctx, "tcp", cfg.Listen)
		return err
	}); err != nil {
		return nil, err
	}
	defer b.Close()
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	ctl := cfg.Control
	if ctl == "" {
		ctl = DefaultControlSocket(cfg.StateDir)
	}
	stopControl, err := serveBackupControl(ctx, ctl, status, metrics, log)
	if err != nil {
		return nil, err
	}
	defer stopControl()

	log.Info("waiting for the primary", "listen", ln.Addr().String())
	conns := make(chan checkpoint.Link)
	go acceptPrimaries(ctx, ln, cfg.Key, conns, status, log)
	var report *FailoverReport
	var gnet *guestNet
	relayDone := make(chan error, 1)
	rctx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	runDone := make(chan error, 1)
	go func() {
		runDone <- b.Run(rctx, conns, func(ctx context.Context, lost *checkpoint.PrimaryLost) error {
			log.Warn("primary lost: failing over", "committed_epoch", lost.Committed.Epoch, "cause", lost.Cause)
			status.failingOver(lost)
			r, err := failOver(ctx, cfg, standby, lost, &gnet, log)
			report = r
			metrics.failedOver(r, err)
			status.failedOver(r, err)
			if err != nil {
				return err
			}
			if w != nil {
				log.Info("the guest runs here now: holding the witness lease until remusd is stopped")
				go keepBackupLease(rctx, w, log)
			}
			if gnet == nil {
				relayDone <- nil
				return nil
			}
			log.Info("relaying the guest's network", "tap", cfg.Net.Tap)
			go func() { relayDone <- <-gnet.done }()
			return nil
		})
	}()
	select {
	case <-ctx.Done():
		<-runDone
		return report, nil
	case err := <-runDone:
		if ctx.Err() != nil {
			return report, nil
		}
		return report, err
	case err := <-relayDone:
		// Failed over. Run goes on answering primaries that come back
		// (they are told the guest runs here) while the guest's network
		// is relayed or the witness lease held.
		if (gnet != nil || w != nil) && err == nil {
			select {
			case <-ctx.Done():
			case err = <-relayDone:
			}
		}
		if err != nil {
			log.Warn("the guest's network relay stopped", "err", err)
		}
		cancelRun()
		<-runDone
		return report, nil
	}
}

// DefaultFenceTimeout bounds a fence command by default.
const DefaultFenceTimeout = time.Minute

// fence runs the fence command against the primary (host:port).
func fence(ctx context.Context, cfg BackupConfig, primary string, log *slog.Logger) error {
	timeout := cfg.FenceTimeout
	if timeout <= 0 {
		timeout = DefaultFenceTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	host := primary
	if h, _, err := net.SplitHostPort(primary); err == nil {
		host = h
	}
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", cfg.FenceCommand+` "$@"`, "remus-fence", cfg.VM, host)
	cmd.Env = append(os.Environ(), "REMUS_VM="+cfg.VM, "REMUS_PRIMARY="+host)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if len(out) > 2000 {
		out = out[len(out)-2000:]
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w after %v", ctx.Err(), timeout)
		}
		return fmt.Errorf("fence command %q for %s on %s: %w: %s", cfg.FenceCommand, cfg.VM, host, err, strings.TrimSpace(string(out)))
	}
	log.Info("fence command done", "primary", host, "took", time.Since(start).Round(time.Millisecond), "output", strings.TrimSpace(string(out)))
	return nil
}

// acceptPrimaries accepts connections until ctx ends and hands each one, once
// authenticated where a key is set, to conns, telling st what the primary
// says on it. Each handshake runs on its own goroutine with a deadline, so
// a connection that says nothing (a port scan) holds up no other; no
// connection is a session before the Standby accepts its hello.
func acceptPrimaries(ctx context.Context, ln net.Listener, key []byte, conns chan<- checkpoint.Link, st *backupState, log *slog.Logger) {
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.Error("accept", "err", err)
			}
			return
		}
		go func() {
			link := transport.NewConn(nc)
			if key != nil {
				actx, cancel := context.WithTimeout(ctx, checkpoint.HelloTimeout)
				err := link.Authenticate(actx, key, false)
				cancel()
				if err != nil {
					log.Warn("refused a connection", "from", nc.RemoteAddr().String(), "err", err)
					link.Close()
					return
				}
			}
			select {
			case conns <- &primaryLink{Conn: link, addr: nc.RemoteAddr().String(), st: st}:
			case <-ctx.Done():
				link.Close()
			}
		}()
	}
}

func failOver(ctx context.Context, cfg BackupConfig, standby *QEMU, lost *checkpoint.PrimaryLost, gnet **guestNet, log *slog.Logger) (*FailoverReport, error) {
	r := &FailoverReport{VM: cfg.VM, Epoch: lost.Committed.Epoch, LastHeard: lost.LastHeard, Declared: lost.DeclaredAt, Cleared: lost.ClearedAt,
		Cause: lost.Cause.Error(), RAMImage: lost.Committed.RAMImage}
	if st, err := os.Stat(lost.Committed.StateFile); err == nil {
		r.DeviceStateLen = st.Size()
	}
	format, err := qemu.ReadStateFormat(lost.Committed.StateFile)
	if err != nil {
		return r, err
	}
	var mon *qmp.Client
	// kill ends a QEMU this failover started and could not finish with; a
	// standby QEMU is its manager's (libvirt's), and is left as it is.
	kill := func() {}
	qemuLog := func(err error) error { return err }
	if standby != nil {
		if err := step(ctx, log, "take the standby QEMU", func() error {
			if err := standby.Mon.Err(); err != nil {
				return fmt.Errorf("its QMP connection (%s) broke: %w (is the standby QEMU gone?)", cfg.Standby, err)
			}
			if err := checkIncoming(ctx, standby.Mon); err != nil {
				return err
			}
			mon, r.QEMUPID = standby.Mon, standby.PID
			return writeQEMUPID(cfg.StateDir, r.QEMUPID)
		}); err != nil {
			return r, err
		}
	} else {
		cmd, err := startRestoreQEMU(ctx, cfg, format, r, log)
		if err != nil {
			return r, err
		}
		kill = func() { cmd.Process.Kill() }
		qemuLog = func(err error) error {
			return fmt.Errorf("%w\nQEMU's output (%s):\n%s", err, filepath.Join(cfg.StateDir, "qemu.log"), tail(filepath.Join(cfg.StateDir, "qemu.log"), 2000))
		}
		if err := step(ctx, log, "connect to the new QEMU", func() error {
			dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			var err error
			mon, err = redial(dctx, 5*time.Millisecond, func(ctx context.Context) (*qmp.Client, error) {
				return qmp.Dial(ctx, cfg.QMPSocket, qmp.WithLogger(log))
			})
			if err != nil {
				return fmt.Errorf("QMP socket %s: %w", cfg.QMPSocket, err)
			}
			return nil
		}); err != nil {
			kill()
			return r, err
		}
		defer mon.Close()
	}
	v := mon.Version()
	r.QEMUVersion = v.String()
	r.IncomingURI = qemu.IncomingURI(lost.Committed.StateFile, v)
	if err := step(ctx, log, "load the last committed checkpoint", func() error {
		if standby != nil {
			// The standby's QEMU may run sandboxed and as another user:
			// it gets the state as a descriptor.
			f, err := os.Open(lost.Committed.StateFile)
			if err != nil {
				return err
			}
			defer f.Close()
			if err := qemu.PassFile(ctx, mon, standbyStateFD, f); err != nil {
				return err
			}
			r.IncomingURI = "fd:" + standbyStateFD
		}
		load, err := failover.Load(ctx, mon, r.IncomingURI, format)
		r.LoadMS = ms(load)
		if err != nil {
			return qemuLog(err)
		}
		return nil
	}); err != nil {
		kill()
		return r, err
	}
	if cfg.Net.Enabled() {
		// Connected once the device state is loaded and before the guest
		// runs, so that nothing it sends is lost.
		if err := step(ctx, log, "connect the guest's NIC to "+cfg.Net.Tap, func() (err error) {
			if *gnet, err = startNetwork(ctx, cfg.Net, 10*time.Second, log); err != nil {
				return err
			}
			// The guest runs only once QEMU took the connection: before,
			// it would drop what the guest sends.
			wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			return qemu.WaitStreamConnected(wctx, mon, cfg.Net.Guest, 2*time.Millisecond)
		}); err != nil {
			kill()
			return r, err
		}
	}
	if err := step(ctx, log, "resume the guest", func() error {
		if _, err := failover.Resume(ctx, mon); err != nil {
			return qemuLog(err)
		}
		return nil
	}); err != nil {
		kill()
		return r, err
	}
	// The guest's MAC address now lives behind another port: tell the
	// switches (gratuitous RARP from each NIC, as after a migration).
	if err := qemu.Announce(ctx, mon); err != nil {
		log.Warn("announce the guest on the network", "err", err)
	}
	r.Running = time.Now()
	r.DetectionMS = ms(r.Declared.Sub(r.LastHeard))
	from := r.Declared
	if !r.Cleared.IsZero() {
		r.ClearMS, from = ms(r.Cleared.Sub(r.Declared)), r.Cleared
	}
	r.RestoreMS = ms(r.Running.Sub(from))
	log.Info("failed over: the guest runs here", "epoch", r.Epoch, "detection_ms", r.DetectionMS, "clear_ms", r.ClearMS, "restore_ms", r.RestoreMS, "qemu_pid", r.QEMUPID)
	if cfg.Report != "" {
		b, _ := json.MarshalIndent(r, "", "  ")
		if err := os.WriteFile(cfg.Report, append(b, '\n'), 0o644); err != nil {
			return r, fmt.Errorf("write failover report: %w", err)
		}
	}
	return r, nil
}

// standbyAttachWait bounds the wait for the standby QEMU's QMP socket at
// start.
const standbyAttachWait = 30 * time.Second

// standbyStateFD is the name the device state's descriptor gets in a
// standby QEMU.
const standbyStateFD = "remus-state"

// attachStandby attaches to the standby QEMU at socket and checks that it
// waits for a device state.
func attachStandby(ctx context.Context, socket string, log *slog.Logger) (*QEMU, error) {
	// It may be starting as remusd does (both started at boot).
	actx, cancel := context.WithTimeout(ctx, standbyAttachWait)
	defer cancel()
	q, err := redial(actx, 100*time.Millisecond, func(ctx context.Context) (*QEMU, error) { return Attach(ctx, socket, log) })
	if err != nil {
		return nil, fmt.Errorf("standby QEMU (waited %v): %w", standbyAttachWait, err)
	}
	if err := checkIncoming(ctx, q.Mon); err != nil {
		q.Mon.Close()
		return nil, err
	}
	return q, nil
}

// checkIncoming checks that QEMU waits for an incoming migration.
func checkIncoming(ctx context.Context, mon qemu.Monitor) error {
	st, err := qemu.Status(ctx, mon)
	if err != nil {
		return fmt.Errorf("standby QEMU: %w", err)
	}
	if st != "inmigrate" {
		return fmt.Errorf("the standby QEMU is %q, not waiting for a device state: start it with -incoming defer", st)
	}
	return nil
}

// startRestoreQEMU starts the QEMU command line of cfg waiting for the
// device state of format, on the RAM image; it outlives remusd.
func startRestoreQEMU(ctx context.Context, cfg BackupConfig, format qemu.StateFormat, r *FailoverReport, log *slog.Logger) (*exec.Cmd, error) {
	var cmd *exec.Cmd
	err := step(ctx, log, "start QEMU on the RAM image", func() error {
		os.Remove(cfg.QMPSocket)
		args := append(append([]string{}, cfg.QEMU[1:]...), qemu.RestoreArgs(format)...)
		cmd = exec.Command(cfg.QEMU[0], args...)
		// The restored guest must outlive remusd: its own session, no
		// death signal, output to a log beside the state.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		out, err := os.Create(filepath.Join(cfg.StateDir, "qemu.log"))
		if err != nil {
			return err
		}
		defer out.Close()
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			return err
		}
		r.QEMUPID = cmd.Process.Pid
		go func() {
			// The guest's QEMU ending while remusd runs is worth a line
			// (how it ended: an exit status or a signal).
			err := cmd.Wait()
			log.Warn("the guest's QEMU exited", "pid", r.QEMUPID, "status", cmd.ProcessState.String(), "err", err)
		}()
		// The restored guest's QEMU is not remusd's child for long: say
		// where it is at once, for whoever manages it from here.
		return writeQEMUPID(cfg.StateDir, r.QEMUPID)
	})
	return cmd, err
}

// writeQEMUPID names the guest's QEMU in the state directory.
func writeQEMUPID(stateDir string, pid int) error {
	pidFile := QEMUPIDFile(stateDir)
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", pidFile, err)
	}
	return nil
}

// tail returns the last n bytes of a file, or why it cannot.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

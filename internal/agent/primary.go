package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/dirtypages"
	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/transport"
	"github.com/remus-kvm/remus/witness"
)

// Tracker choices.
const (
	TrackerAuto      = "auto"
	TrackerUffd      = "uffd"
	TrackerSoftDirty = "softdirty"
	TrackerCompare   = "compare"
)

// PrimaryConfig is remusd's configuration on the primary host.
type PrimaryConfig struct {
	VM        string // name of the protected VM, the same on both sides
	QMPSocket string // a QMP socket of the running QEMU, for remusd alone
	Peer      string // backup remusd, host:port
	StateDir  string // directory for the device state QEMU saves each epoch
	Pipeline  checkpoint.PipelineConfig
	Heartbeat failover.DetectorConfig
	Tracker   string // auto, softdirty or compare
	// DeviceState picks how the device state is saved: auto (default:
	// xen-save-devices-state when QEMU has it), xen or migrate.
	DeviceState string
	// ConnectTimeout bounds each attempt to reach the backup.
	ConnectTimeout time.Duration
	// Retry is the wait before a new protection session after one failed;
	// 0 means do not retry.
	Retry time.Duration
	// EpochLog, when set, receives one JSON line per committed epoch.
	EpochLog string
	// Compress sends pages as compressed XOR deltas.
	Compress bool
	// DeltaCache bounds, in bytes, the compressor's memory of the pages
	// it sent (0: as large as guest RAM).
	DeltaCache int64
	// NoLiveSync copies all of RAM in the first epoch's pause instead of
	// while the guest runs (checkpoint.LiveSyncConfig).
	NoLiveSync bool
	// Key, when set, authenticates the link (the backup needs the same).
	Key []byte
	// Net, when enabled, relays the guest's network with output commit.
	Net NetConfig
	// Disk, when set, is the block node of the guest's disk (as in
	// -blockdev ...,node-name=NODE), or the absolute path of its image
	// (the node a guest device has on top of it: a libvirt domain's
	// <source file>): QEMU mirrors it to remusd, which ships its writes
	// with the epochs.
	Disk string
	// Trace, when set, records the dirty pages of the session's first
	// TraceEpochs epochs (the first is all of RAM) to this file
	// (transport's page trace format).
	Trace       string
	TraceEpochs int
	// CommandTimeout bounds each QMP command of a checkpoint; a stop that
	// does not return in time hands the guest over to the backup.
	CommandTimeout time.Duration
	// Fault stops the agent at a point of the epoch cycle (testing aid).
	Fault *Fault
	// Witness, when enabled, is where this side holds the lease that lets
	// its guest run (package witness): without it and without the
	// backup's acknowledgements the guest is stopped before the lease can
	// expire, and a guest the backup claimed is killed here.
	Witness WitnessConfig
	// AssumeFailStop runs without a witness: the backup's fence command
	// (or hosts that never partition) must make a failover safe.
	AssumeFailStop bool
	// Control is the path of the control socket (remusctl status,
	// switchover, metrics); default DefaultControlSocket(StateDir).
	Control string
	// Metrics, when set, is a TCP address (host:port) where the agent
	// serves its Prometheus metrics (GET /metrics) besides the control
	// socket.
	Metrics string
}

// Fault describes where to stop the agent: at Point of epoch Epoch (or the
// first epoch at or after it), once the Trigger file exists when one is
// named, remusd prints a line and blocks until it is killed. Tests use it to
// kill the primary at chosen points of the cycle.
type Fault struct {
	Point   checkpoint.FaultPoint
	Epoch   uint64
	Trigger string
}

func (f *Fault) armed(at checkpoint.FaultPoint, epoch uint64) bool {
	if at != f.Point || epoch < f.Epoch {
		return false
	}
	if f.Trigger == "" {
		return true
	}
	_, err := os.Stat(f.Trigger)
	return err == nil
}

// FaultReachedPrefix starts the line printed on stderr at a fault point.
const FaultReachedPrefix = "remusd: fault point reached:"

// Validate rejects incomplete or impossible configurations.
func (c PrimaryConfig) Validate() error {
	switch {
	case c.VM == "":
		return errors.New("--vm is required")
	case c.QMPSocket == "":
		return errors.New("--qmp is required")
	case c.Peer == "":
		return errors.New("--peer is required")
	case c.StateDir == "":
		return errors.New("--state-dir is required")
	case !c.Witness.Enabled() && !c.AssumeFailStop:
		return errors.New("no witness (--witness): " + failStopRisk + "; give --witness, or --assume-fail-stop where the backup fences this host (its --fence-command) or the hosts cannot be partitioned")
	}
	switch c.Tracker {
	case "", TrackerAuto, TrackerUffd, TrackerSoftDirty, TrackerCompare:
	default:
		return fmt.Errorf("unknown tracker %q (auto, uffd, softdirty or compare)", c.Tracker)
	}
	switch c.DeviceState {
	case "", "auto", "xen", "migrate":
	default:
		return fmt.Errorf("unknown device state saver %q (auto, xen or migrate)", c.DeviceState)
	}
	if err := c.Pipeline.Validate(); err != nil {
		return err
	}
	if err := c.Net.Validate(); err != nil {
		return err
	}
	return c.Heartbeat.Validate()
}

// EpochRecord is one line of the epoch log.
type EpochRecord struct {
	Epoch       uint64    `json:"epoch"`
	Start       time.Time `json:"start"`
	Acked       time.Time `json:"acked"`
	PauseUS     int64     `json:"pause_us"`
	StopUS      int64     `json:"stop_us"`
	CutUS       int64     `json:"cut_us"`
	HarvestUS   int64     `json:"harvest_us"`
	CopyUS      int64     `json:"copy_us"`
	SaveUS      int64     `json:"save_us"`
	ContUS      int64     `json:"cont_us"`
	DirtyPages  int       `json:"dirty_pages"`
	DeviceBytes int       `json:"device_bytes"`
	WireBytes   int64     `json:"wire_bytes"`
	AckUS       int64     `json:"ack_us"`
	// The effective epoch (since the previous epoch's start) and how much
	// of it the guest ran; zero for a session's first epoch.
	IntervalUS int64 `json:"interval_us,omitempty"`
	RanUS      int64 `json:"ran_us,omitempty"`
	// A session's first epoch after a live sync: its rounds, the pages
	// they sent and how long they took.
	LiveSyncRounds int   `json:"live_sync_rounds,omitempty"`
	LiveSyncPages  int   `json:"live_sync_pages,omitempty"`
	LiveSyncUS     int64 `json:"live_sync_us,omitempty"`
	// Network output released by this epoch's commit: frames, bytes, and
	// how long they were held (p50, p99); bytes still held and the most
	// ever held, when remusd relays the guest's network.
	DiskWrites   int   `json:"disk_writes,omitempty"`
	DiskBytes    int64 `json:"disk_bytes,omitempty"`
	NetFrames    int   `json:"net_frames,omitempty"`
	NetBytes     int64 `json:"net_bytes,omitempty"`
	NetWaitP50US int64 `json:"net_wait_p50_us,omitempty"`
	NetWaitP99US int64 `json:"net_wait_p99_us,omitempty"`
	NetHeldBytes int64 `json:"net_held_bytes,omitempty"`
	NetPeakBytes int64 `json:"net_peak_bytes,omitempty"`
}

// NewEpochRecord converts the loop's statistics.
func NewEpochRecord(s checkpoint.EpochStats) EpochRecord {
	return EpochRecord{Epoch: s.Epoch, Start: s.Start, Acked: s.Acked,
		PauseUS: s.Pause.Total().Microseconds(), StopUS: s.Pause.Stop.Microseconds(), CutUS: s.Pause.Cut.Microseconds(),
		HarvestUS: s.Pause.Harvest.Microseconds(),
		CopyUS:    s.Pause.Copy.Microseconds(), SaveUS: s.Pause.Save.Microseconds(), ContUS: s.Pause.Cont.Microseconds(),
		DirtyPages: s.DirtyPages, DeviceBytes: s.DeviceBytes, WireBytes: s.WireBytes, AckUS: s.AckLatency().Microseconds(),
		DiskWrites: s.DiskWrites, DiskBytes: s.DiskBytes,
		IntervalUS: s.Interval.Microseconds(), RanUS: s.Ran.Microseconds(),
		LiveSyncRounds: s.LiveSync.Rounds, LiveSyncPages: s.LiveSync.Pages, LiveSyncUS: s.LiveSync.Took.Microseconds(),
		NetFrames: s.Output.Frames, NetBytes: s.Output.Bytes,
		NetWaitP50US: s.Output.WaitP50.Microseconds(), NetWaitP99US: s.Output.WaitP99.Microseconds()}
}

// RunPrimary protects the VM until ctx ends. A failed session (backup gone,
// epoch rejected) is logged and, with Retry set, followed by a new one that
// starts again from a full copy of RAM; the guest runs on unprotected in
// between.
func RunPrimary(ctx context.Context, cfg PrimaryConfig, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	log = log.With("vm", cfg.VM)
	s := &primarySession{cfg: cfg, log: log, metrics: newPrimaryMetrics(cfg.VM, cfg.Net.Enabled(), cfg.Witness.Enabled()),
		recent: newRecentEpochs(RecentWindow, recentSize)}
	if cfg.Metrics != "" {
		_, stop, err := serveMetrics(ctx, cfg.Metrics, s.metrics.handler(), log)
		if err != nil {
			return err
		}
		defer stop()
	}
	var q *QEMU
	if err := step(ctx, log, "attach to QEMU", func() (err error) {
		q, err = Attach(ctx, cfg.QMPSocket, log)
		if err == nil {
			log.Info("QEMU found", "pid", q.PID, "version", q.Version.String(), "ram_backend", q.RAM.ID, "ram_bytes", q.RAM.Size, "ram_path", q.RAM.Path)
		}
		return err
	}); err != nil {
		return err
	}
	defer q.Mon.Close()

	s.q = q
	// A guest the deadman of an agent before this one stopped (it died
	// without a goodbye) runs again only once this agent may run it.
	stopped := ReadDeadmanMarker(cfg.StateDir, q.PID)
	if stopped != nil {
		log.Warn("the guest was stopped by the deadman when the previous agent died", "at", stopped.At, "action", stopped.Action)
	}
	dm, err := startDeadman(DeadmanConfig{QMPSocket: cfg.QMPSocket, PID: q.PID, StateDir: cfg.StateDir}, log)
	if err != nil {
		return err
	}
	defer func() {
		if s.backupWillNotResume() || s.guestGone() {
			dm.disarm()
		} else {
			dm.release()
		}
	}()

	var w *witness.Witness
	var lease witness.Lease
	if cfg.Witness.Enabled() {
		if err := step(ctx, log, "hold the witness lease", func() (err error) {
			if w, err = cfg.Witness.open(cfg.VM); err != nil {
				return err
			}
			lease, err = holdPrimaryLease(ctx, w, log)
			if errors.Is(err, witness.ErrOwnedElsewhere) {
				// The backup resumed the guest: this copy is stale.
				if serr := qemu.Stop(ctx, q.Mon); serr != nil {
					log.Error("stop the stale guest", "err", serr)
				}
				return fmt.Errorf("%w (this copy of the guest is stopped: it must not run)", err)
			}
			if err == nil {
				log.Info("holding the witness lease", "id", w.ID(), "ttl", lease.TTL)
			}
			return err
		}); err != nil {
			if w != nil {
				w.Close()
			}
			return err
		}
		defer w.Close()
		if stopped != nil {
			// Holding the lease: the backup has not resumed the guest,
			// and cannot while it lasts.
			if err := s.continueStopped(ctx); err != nil {
				return err
			}
		}
	} else {
		log.Warn("no witness: assuming fail-stop hosts: " + failStopRisk)
		if stopped != nil {
			// Without a witness only the backup can say it did not resume
			// the guest: the first checkpoint of a session it accepted
			// continues it.
			log.Warn("the guest stays stopped until a backup accepts a session")
			os.Remove(DeadmanMarker(cfg.StateDir))
		}
	}

	// The guard runs from the moment the lease is held: it renews it and
	// stops the guest if it may not run, whatever the rest of the start
	// is doing.
	runCtx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	s.unprotect, s.looped = cancelRun, make(chan struct{})
	s.shutdown = watchShutdown(runCtx, q.Mon, log, func(string) { cancelRun() })
	defer s.shutdown.close()
	guardErr := make(chan error, 1)
	loopDone := make(chan struct{})
	if w != nil {
		s.gate = &gate{mon: q.Mon}
		// A guest the guard cannot stop in time is killed at once: the
		// lease may run out next.
		s.guard = &primaryGuard{w: w, g: s.gate, log: log, grace: cfg.Heartbeat.WithDefaults().Timeout / 3, metrics: s.metrics,
			kill: func(context.Context, string) error { return s.killGuestNow() }}
		go func() {
			err := s.guard.run(runCtx, lease)
			if errors.Is(err, checkpoint.ErrHandedOver) {
				// The guard killed the guest: the session's next
				// checkpoint finds it gone and tells the backup to
				// take over (ending the session now would say a
				// plain goodbye, and the backup would never resume
				// it). A session that does not end soon has nothing
				// committed to hand over.
				select {
				case <-loopDone:
				case <-time.After(2 * cfg.Heartbeat.WithDefaults().Timeout):
				}
			}
			if err != nil {
				cancelRun()
			}
			guardErr <- err
		}()
	} else {
		guardErr <- nil
	}
	err = s.protect(runCtx)
	close(loopDone)
	cancelRun()
	if gerr := <-guardErr; gerr != nil {
		if errors.Is(gerr, checkpoint.ErrFailedOver) {
			log.Error("the backup owns the guest now: killing this copy", "err", gerr)
			if kerr := s.killGuest(context.WithoutCancel(ctx), gerr.Error()); kerr != nil {
				log.Error("kill the guest", "err", kerr)
			}
		}
		return gerr
	}
	if w != nil && errors.Is(err, checkpoint.ErrSwitchedOver) {
		// The backup claims the witness at once instead of after the
		// lease's TTL.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		if rerr := w.Release(rctx); rerr != nil {
			log.Warn("release the witness lease (the backup takes it once it expires)", "err", rerr)
		}
		cancel()
	}
	return switchedOver(err, log)
}

// protect sets up what protection needs beside QEMU (RAM, device state
// saving, the guest's network and disk, the control socket) and runs
// protection sessions until ctx ends or one ends for good.
func (s *primarySession) protect(ctx context.Context) error {
	cfg, q, log := s.cfg, s.q, s.log
	if err := step(ctx, log, "check that all guest RAM is replicated", func() error {
		return q.CheckRAMReplicated(ctx)
	}); err != nil {
		return err
	}

	var ram []byte
	if err := step(ctx, log, "map guest RAM", func() (err error) {
		ram, err = q.MapRAM()
		return err
	}); err != nil {
		return err
	}
	defer unix.Munmap(ram)

	saver := qemu.DeviceSaver{Version: q.Version}
	if err := step(ctx, log, "check device state saving", func() error {
		ok, err := qemu.HasCommand(ctx, q.Mon, "xen-save-devices-state")
		if err != nil {
			return err
		}
		switch {
		case cfg.DeviceState == "migrate":
			saver.Migrate = true
		case !ok && cfg.DeviceState == "xen":
			return errors.New("QEMU lacks xen-save-devices-state")
		case !ok:
			saver.Migrate = true
			log.Warn("QEMU lacks xen-save-devices-state; saving device state by migration (slower)")
		}
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return err
		}
		if saver.Migrate {
			return nil
		}
		// QEMU writes the state through a descriptor remusd hands it: it
		// may not open a file of remusd's (another user, a sandbox, an
		// AppArmor profile: libvirt's QEMU).
		var err2 error
		saver.FDSet, err2 = qemu.AddStateFD(ctx, q.Mon, filepath.Join(cfg.StateDir, deviceStateFile))
		return err2
	}); err != nil {
		return err
	}
	if !saver.Migrate {
		var stop func()
		if err := step(ctx, log, "guard against migrations remusd does not start", func() (err error) {
			stop, err = guardMigrations(ctx, q.Mon, log)
			return err
		}); err != nil {
			return err
		}
		defer stop()
	}
	if saver.FDSet != nil {
		defer func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			saver.FDSet.Close(cctx, q.Mon)
			cancel()
		}()
	}

	var gnet *guestNet
	if cfg.Net.Enabled() {
		if err := step(ctx, log, "connect the guest's NIC to "+cfg.Net.Tap, func() (err error) {
			gnet, err = startNetwork(ctx, cfg.Net, 10*time.Second, log)
			return err
		}); err != nil {
			return err
		}
		go func() {
			if err := <-gnet.done; err != nil && ctx.Err() == nil {
				log.Error("the guest's network relay stopped", "err", err)
			}
		}()
		if !cfg.Net.NoOutputCommit {
			// Nothing the guest sends leaves until the backup answered (a
			// backup that already resumed this guest says so, and this
			// copy is stopped) or is found unreachable.
			gnet.relay.Hold()
		}
	}

	var plug *netbuffer.KernelBuffer
	if cfg.Net.PlugTap != "" {
		if err := step(ctx, log, "set up the kernel output buffer on "+cfg.Net.PlugTap, func() (err error) {
			plug, err = netbuffer.NewKernelBuffer(cfg.Net.PlugTap, "ifb-"+cfg.Net.PlugTap, 0)
			return err
		}); err != nil {
			return err
		}
		defer plug.Close()
		if cfg.Pipeline.MaxInFlight != 1 {
			log.Info("sch_plug holds one epoch in flight: --max-in-flight set to 1")
			cfg.Pipeline.MaxInFlight = 1
		}
	}

	var disk *primaryDisk
	if cfg.Disk != "" {
		if err := step(ctx, log, "serve the disk mirror target for "+cfg.Disk, func() (err error) {
			node := cfg.Disk
			if strings.HasPrefix(node, "/") {
				if node, err = qemu.DiskNode(ctx, q.Mon, node); err != nil {
					return err
				}
				log.Info("the guest's disk", "image", cfg.Disk, "node", node)
			}
			disk, err = startPrimaryDisk(ctx, q, node, log)
			return err
		}); err != nil {
			return err
		}
	}

	var epochLog *json.Encoder
	if cfg.EpochLog != "" {
		f, err := os.OpenFile(cfg.EpochLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("epoch log: %w", err)
		}
		defer f.Close()
		epochLog = json.NewEncoder(f)
	}

	s.ram, s.saver, s.gnet, s.plug, s.disk, s.epochLog = ram, saver, gnet, plug, disk, epochLog
	if s.gate != nil {
		s.gate.setOutput(s.baseOutput())
	}
	ctl := cfg.Control
	if ctl == "" {
		ctl = DefaultControlSocket(cfg.StateDir)
	}
	stopControl, err := s.serveControl(ctx, ctl)
	if err != nil {
		return err
	}
	defer stopControl()
	err = s.loop(ctx)
	close(s.looped)
	return err
}

// deviceStateFile is the name, in the state directory, of the file the
// device state is saved to (checkpoint.Primary reads it there).
const deviceStateFile = "devices.state"

// ErrGuestGone ends protection when the guest's QEMU is gone.
var ErrGuestGone = errors.New("no guest to protect")

// switchedOver turns a completed switchover into a clean exit.
func switchedOver(err error, log *slog.Logger) error {
	if errors.Is(err, checkpoint.ErrSwitchedOver) {
		log.Info("switched over: the guest runs on the backup now; this agent exits", "result", err)
		return nil
	}
	return err
}

// loop runs protection sessions until ctx ends or one ends for good.
func (s *primarySession) loop(ctx context.Context) error {
	cfg, log := s.cfg, s.log
	redialed := false
	for {
		s.protected.Store(false)
		err := s.run(ctx)
		s.ended(err)
		switch {
		case errors.Is(err, checkpoint.ErrFailedOver), errors.Is(err, checkpoint.ErrHandedOver), errors.Is(err, checkpoint.ErrSwitchedOver):
			return err
		case s.guestGone():
			// No guest to protect (it crashed, or the guard killed
			// it): a new session would only make the backup drop the
			// epochs it may resume.
			return fmt.Errorf("%w: the guest's QEMU is gone (%v)", ErrGuestGone, err)
		case ctx.Err() != nil:
			return nil
		case cfg.Retry == 0:
			return err
		}
		if s.protected.Load() {
			redialed = false
		}
		if !redialed && errors.Is(err, checkpoint.ErrPeerLost) {
			// A session that ended without the backup's word leaves the
			// guest's output held: the backup may be alive, and will
			// resume the guest unless a new session reaches it within its
			// heartbeat timeout. Redial at once; the new session lets the
			// output go once the backup answers.
			redialed = true
			log.Warn("session with the backup ended; reconnecting at once, the guest's output held until it answers", "err", err)
			continue
		}
		if redialed {
			if out := s.output(); out != nil {
				// No backup answers: it is taken as dead (hosts
				// fail-stop).
				out.PassThrough()
			}
		}
		redialed = false
		log.Error("protection lost; the guest runs unprotected until the backup is back", "err", err, "retry_in", cfg.Retry)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(cfg.Retry):
		}
	}
}

// primarySession is what every protection session of the primary uses.
type primarySession struct {
	cfg      PrimaryConfig
	q        *QEMU
	ram      []byte
	saver    qemu.DeviceSaver
	gnet     *guestNet
	plug     *netbuffer.KernelBuffer
	disk     *primaryDisk
	epochLog *json.Encoder
	log      *slog.Logger
	metrics  *primaryMetrics
	recent   *recentEpochs // the newest epochs, for the status
	// protected: the last run committed an epoch.
	protected atomic.Bool
	// current is the session's Primary while one runs (for a
	// switchover); lastCommit, the newest acknowledged epoch.
	current    atomic.Pointer[checkpoint.Primary]
	lastCommit atomic.Pointer[checkpoint.EpochStats]
	// gate and guard, with a witness: the guest runs and its output
	// passes as the lease allows.
	gate  *gate
	guard *primaryGuard

	mu      sync.Mutex
	lastEnd error // how the last session ended

	// shutdown follows QEMU's SHUTDOWN events: a guest shut down on
	// purpose ends protection (shutdown.go).
	shutdown *shutdownWatch
	// unprotect ends protection as SIGTERM does (POST /unprotect);
	// looped is closed once the protection loop has returned.
	unprotect func()
	looped    chan struct{}
}

// ended notes how a session (or an attempt at one) ended, for the
// deadman: whether the backup may still resume the guest.
func (s *primarySession) ended(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastEnd = err
}

// backupWillNotResume reports whether the last session ended with the
// backup's word that it will not resume the guest: a goodbye it confirmed,
// or a session it refused. Anything else (no session yet, since a backup
// may hold an earlier agent's epochs; a backup gone silent) may leave it
// a committed epoch to resume.
func (s *primarySession) backupWillNotResume() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.lastEnd
	return err != nil && !errors.Is(err, checkpoint.ErrPeerLost) &&
		(errors.Is(err, checkpoint.ErrStopped) || errors.Is(err, checkpoint.ErrPeerRejected))
}

// continueStopped continues a guest the deadman stopped, now that this
// agent may run it.
func (s *primarySession) continueStopped(ctx context.Context) error {
	st, err := qemu.Status(ctx, s.q.Mon)
	if err != nil {
		return fmt.Errorf("status of the guest the deadman stopped: %w", err)
	}
	if st == "paused" {
		if err := qemu.Cont(ctx, s.q.Mon); err != nil {
			return fmt.Errorf("continue the guest the deadman stopped: %w", err)
		}
		s.log.Info("continued the guest the deadman had stopped: this agent holds the witness lease")
	}
	os.Remove(DeadmanMarker(s.cfg.StateDir))
	return nil
}

// output is the session's output commit, nil without one.
func (s *primarySession) output() checkpoint.Output {
	if s.gate != nil {
		return s.gate.output()
	}
	return s.baseOutput()
}

// baseOutput is the output commit itself, nil without one.
func (s *primarySession) baseOutput() checkpoint.Output {
	switch {
	case s.cfg.Net.NoOutputCommit:
	case s.gnet != nil:
		return output{s.gnet.relay}
	case s.plug != nil:
		return plugOutput{s.plug, s.log}
	}
	return nil
}

// killGuest ends the guest's QEMU for good: quit, and SIGKILL if QEMU does
// not go (a QMP monitor blocked behind a hung command).
func (s *primarySession) killGuest(ctx context.Context, reason string) error {
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	err := qemu.Quit(qctx, s.q.Mon)
	cancel()
	if err == nil && s.waitGone(3*time.Second) {
		return nil
	}
	// QEMU did not answer (a monitor blocked behind a hung command) or
	// did not go.
	return s.killGuestNow()
}

// killGuestNow sends QEMU SIGKILL and waits for it to be gone.
func (s *primarySession) killGuestNow() error {
	if err := s.q.Proc.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill QEMU pid %d: %w", s.q.PID, err)
	}
	if !s.waitGone(5 * time.Second) {
		return fmt.Errorf("QEMU pid %d still there 5s after SIGKILL", s.q.PID)
	}
	return nil
}

// waitGone waits up to d for the guest's QEMU to be gone.
func (s *primarySession) waitGone(d time.Duration) bool {
	for deadline := time.Now().Add(d); ; time.Sleep(20 * time.Millisecond) {
		if s.guestGone() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// guestGone reports whether the guest's QEMU has exited (no such process,
// or a zombie).
func (s *primarySession) guestGone() bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.q.PID))
	if err != nil {
		return true
	}
	// pid (comm) state ...: the state follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

func (s *primarySession) run(ctx context.Context) error {
	cfg, q, ram, saver, gnet, disk, epochLog, log := s.cfg, s.q, s.ram, s.saver, s.gnet, s.disk, s.epochLog, s.log
	out := s.output()
	var tracker dirtypages.Tracker
	if err := step(ctx, log, "start dirty-page tracking", func() (err error) {
		tracker, err = newTracker(ctx, cfg.Tracker, q, ram, log)
		return err
	}); err != nil {
		return err
	}
	defer tracker.Close()

	var link *transport.Conn
	if err := step(ctx, log, "connect to backup "+cfg.Peer, func() error {
		timeout := cfg.ConnectTimeout
		if timeout == 0 {
			timeout = 10 * time.Second
		}
		dctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var d net.Dialer
		first := true
		nc, err := redial(dctx, 100*time.Millisecond, func(ctx context.Context) (net.Conn, error) {
			if s.guestGone() {
				// Nothing left to protect: dial no more (the loop ends
				// with ErrGuestGone).
				cancel()
				return nil, errors.New("the guest's QEMU is gone")
			}
			if first {
				// The first attempt is short: the guest's output waits
				// on it.
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, cfg.Heartbeat.WithDefaults().Timeout)
				defer cancel()
			}
			c, err := d.DialContext(ctx, "tcp", cfg.Peer)
			if err != nil && first && out != nil {
				// No backup to have resumed the guest: it runs on,
				// unprotected (hosts fail-stop).
				log.Warn("backup unreachable: the guest runs unprotected until it answers", "err", err)
				out.PassThrough()
			}
			first = false
			return c, err
		})
		if err != nil {
			return fmt.Errorf("backup unreachable: %w", err)
		}
		link = transport.NewConn(nc)
		if cfg.Key == nil {
			return nil
		}
		if err := link.Authenticate(dctx, cfg.Key, true); err != nil {
			link.Close()
			return fmt.Errorf("backup %s: %w", cfg.Peer, err)
		}
		return nil
	}); err != nil {
		return err
	}
	defer link.Close()
	if s.guestGone() {
		// QEMU died while the agent dialed (a partition held the dial,
		// say): a session opened now would make the backup drop the
		// epochs it may resume, and then fail with nothing committed.
		return fmt.Errorf("%w: its QEMU died while the agent dialed the backup: no session opened", ErrGuestGone)
	}

	pcfg := checkpoint.PrimaryConfig{
		VMName: cfg.VM, Pipeline: cfg.Pipeline, Heartbeat: cfg.Heartbeat, StateDir: cfg.StateDir,
		Saver: saver, Logger: log, Compress: cfg.Compress, LiveSync: checkpoint.LiveSyncConfig{Off: cfg.NoLiveSync},
		DeltaCachePages: int(cfg.DeltaCache / transport.PageSize),
		CommandTimeout:  cfg.CommandTimeout, KillGuest: s.killGuest, Output: out,
		// QEMU's monitor closes as it dies, a moment before the process
		// shows as gone: give it that moment.
		// A guest shut down on purpose is not stuck: the session ends
		// with a goodbye, not by handing the guest to the backup.
		GuestGone: func() bool { return s.waitGone(300*time.Millisecond) && s.shutdown.Reason() == "" },
		OnEpoch: func(st checkpoint.EpochStats) {
			s.protected.Store(true)
			s.lastCommit.Store(&st)
			if s.guard != nil {
				s.guard.acked(st.Acked)
			}
			var relay *netbuffer.Status
			if gnet != nil {
				rs := gnet.relay.Status()
				relay = &rs
			}
			s.metrics.committed(st, relay)
			s.recent.add(st, relay)
			if epochLog == nil {
				return
			}
			rec := NewEpochRecord(st)
			if relay != nil {
				rec.NetHeldBytes, rec.NetPeakBytes = relay.HeldBytes, relay.PeakBytes
			}
			epochLog.Encode(rec)
		},
	}
	if cfg.Trace != "" {
		f, err := os.Create(cfg.Trace)
		if err != nil {
			return fmt.Errorf("page trace: %w", err)
		}
		defer f.Close()
		tw := transport.NewTraceWriter(f)
		defer tw.Flush()
		left := cfg.TraceEpochs
		pcfg.OnPages = func(epoch uint64, pages []transport.Page) {
			if left <= 0 {
				return
			}
			if err := tw.WriteEpoch(epoch, pages); err != nil {
				log.Error("page trace", "err", err)
				left = 0
				return
			}
			if left--; left == 0 {
				tw.Flush()
				log.Info("page trace written", "file", cfg.Trace, "epochs", cfg.TraceEpochs)
			}
		}
	}
	if disk != nil {
		pcfg.Disk, pcfg.Prepare, pcfg.DiskSize = disk, disk.prepare, disk.size
		defer disk.stopMirror()
	}
	if f := cfg.Fault; f != nil {
		pcfg.Fault = func(at checkpoint.FaultPoint, epoch uint64) {
			if f.armed(at, epoch) {
				fmt.Fprintf(os.Stderr, "%s %s epoch=%d\n", FaultReachedPrefix, at, epoch)
				select {} // until killed
			}
		}
	}
	var mon checkpoint.Monitor = q.Mon
	if s.gate != nil {
		mon = s.gate
	}
	p, err := checkpoint.NewPrimary(pcfg, mon, ram, tracker)
	if err != nil {
		return err
	}
	s.current.Store(p)
	defer s.current.Store(nil)
	log.Info("protecting", "epoch", cfg.Pipeline.WithDefaults().Interval, "tracker", trackerName(tracker), "device_state", saver.String())
	s.metrics.sessionStarted()
	err = p.Run(ctx, link)
	s.metrics.sessionEnded(err)
	return err
}

func newTracker(ctx context.Context, kind string, q *QEMU, ram []byte, log *slog.Logger) (dirtypages.Tracker, error) {
	if kind == TrackerCompare {
		return dirtypages.NewCompare(ram, dirtypages.Options{})
	}
	// Write trackers miss what changes guest RAM other than through
	// QEMU's mapping; comparing sees it.
	hazards, err := qemu.UntrackedWrites(ctx, q.Mon)
	if err != nil {
		return nil, fmt.Errorf("look for devices that write guest RAM unseen: %w", err)
	}
	if len(hazards) > 0 {
		why := fmt.Errorf("guest RAM can change without a write through QEMU's mapping, which write tracking would miss: %s", strings.Join(hazards, "; "))
		if kind != TrackerAuto && kind != "" {
			return nil, fmt.Errorf("--tracker %s: %w (--tracker compare sees those changes)", kind, why)
		}
		log.Info("comparing RAM against the last checkpoint instead of tracking writes", "reason", why)
		return dirtypages.NewCompare(ram, dirtypages.Options{})
	}
	name := q.RAM.Path
	if name == "" {
		name = "memory-backend-memfd"
	}
	m, err := dirtypages.FindMapping(q.PID, name)
	if err != nil {
		if kind != TrackerAuto && kind != "" {
			return nil, err
		}
		log.Info("guest RAM not found in QEMU's mappings; comparing RAM against the last checkpoint instead", "reason", err)
		return dirtypages.NewCompare(ram, dirtypages.Options{})
	}
	switch kind {
	case TrackerUffd:
		return dirtypages.NewUffd(q.PID, m, dirtypages.Options{})
	case TrackerSoftDirty:
		if err := dirtypages.SoftDirtySupported(); err != nil {
			return nil, err
		}
		return dirtypages.NewSoftDirty(q.PID, m, dirtypages.Options{})
	}
	tr, fallback, err := dirtypages.NewAuto(q.PID, m, ram, dirtypages.Options{})
	if err != nil {
		return nil, err
	}
	if fallback != nil {
		log.Info("dirty-page tracker: "+trackerName(tr)+"; the better ones are unavailable here", "reason", fallback)
	}
	return tr, nil
}

// trackerName names a tracker for people.
func trackerName(tr dirtypages.Tracker) string {
	switch tr.(type) {
	case *dirtypages.Uffd:
		return TrackerUffd
	case *dirtypages.SoftDirty:
		return TrackerSoftDirty
	case *dirtypages.Compare:
		return TrackerCompare
	}
	return fmt.Sprintf("%T", tr)
}

package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/remus-kvm/remus/dirtypages"
	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/transport"
)

// Monitor is the part of a QMP client the checkpoint loop uses (a
// *qmp.Client); package qemu's commands run on it.
type Monitor interface {
	Execute(ctx context.Context, command string, args, result any) error
}

// Link is the connection to the peer agent (a *transport.Conn).
type Link interface {
	Send(ctx context.Context, f transport.Frame) error
	Recv(ctx context.Context) (transport.Frame, error)
	Close() error
}

// Sentinel errors the callers of Primary.Run and Backup.Serve branch on.
var (
	// ErrPeerLost: the peer stopped answering (heartbeat timeout) or the
	// connection broke.
	ErrPeerLost = errors.New("checkpoint: peer lost")
	// ErrPeerRejected: the peer reported an error (for example a corrupt
	// epoch) and ended the session.
	ErrPeerRejected = errors.New("checkpoint: peer rejected the session")
)

// PrimaryConfig configures the primary's epoch loop.
type PrimaryConfig struct {
	VMName   string
	Pipeline PipelineConfig
	// Heartbeat timing towards the backup.
	Heartbeat failover.DetectorConfig
	// StateDir is a directory QEMU can write the device state into (it must
	// be on this host; a tmpfs such as /dev/shm is best).
	StateDir string
	// Saver picks how the device state is saved: xen-save-devices-state
	// (the zero value), or a migration with x-ignore-shared for QEMU
	// builds without it.
	Saver qemu.DeviceSaver
	// Output, when set, holds the guest's network output until the epoch
	// that produced it commits (output commit). It holds from the first
	// pause of each session (what the guest sent before is in every state
	// the backup can resume) and passes everything through when a session
	// ends.
	Output Output
	// Compress sends pages as XOR deltas against their last version,
	// compressed with zstd or lz4, whichever is smaller (RAMDelta frames).
	Compress bool
	// DeltaCachePages bounds the pages the compressor remembers to send
	// XOR deltas against (the most recently sent ones); a page it forgot
	// goes whole, compressed. 0, or at least RAM's pages: all of RAM (its
	// size in memory again).
	DeltaCachePages int
	// OnPages, when set, is given each epoch's dirty pages as they are
	// shipped, from the sender's goroutine (page traces for compression
	// studies). It must not keep the pages.
	OnPages func(epoch uint64, pages []transport.Page)
	// Disk, when set, gives each epoch the guest's disk writes received
	// since the previous pause (diskmirror.Recorder).
	Disk DiskSource
	// Prepare, when set, runs after the hello, with heartbeats flowing,
	// before the first epoch: the disk's initial copy. The first epoch
	// waits for it; an error ends the session.
	Prepare func(ctx context.Context, link Link) error
	// LiveSync copies guest RAM to the backup while the guest runs, after
	// Prepare and before the first epoch, so that the first pause holds
	// only what the guest wrote meanwhile (see LiveSyncConfig).
	LiveSync LiveSyncConfig
	// OnEpoch, when set, is called from the loop's goroutine with the
	// statistics of each epoch once it is acknowledged. It must not block.
	OnEpoch func(EpochStats)
	// DiskSize is the size of the mirrored disk (0: none); the backup's
	// disk image must have the same.
	DiskSize uint64
	// CommandTimeout bounds each QMP command of a checkpoint (stop, save,
	// cont). A stop that does not return in time leaves the guest in an
	// unknown state: the session hands the guest over to the backup (see
	// Session). Default DefaultCommandTimeout.
	CommandTimeout time.Duration
	// GuestGone, when set, reports whether the guest's QEMU has exited. A
	// checkpoint that fails because QEMU is gone (crashed, killed) hands the
	// guest over instead of saying goodbye: a backup told goodbye would
	// never resume it.
	GuestGone func() bool
	// KillGuest ends the guest's QEMU here for good: the backup resumed it
	// or is told to (see Session). Required: a session that cannot stop a
	// guest cannot promise there is only one.
	KillGuest func(ctx context.Context, reason string) error
	// Fault, when set, is called at each FaultPoint with the epoch; tests
	// use it to stop the agent at a chosen point of the epoch cycle.
	Fault  func(FaultPoint, uint64)
	Logger *slog.Logger
}

// Output is the guest's outbound network traffic, held per epoch (package
// netbuffer's Relay, through a small adapter).
type Output interface {
	// Hold starts holding output for a new session, whose epochs are
	// numbered from 1; called in the first pause, after Cut(1). An error
	// fails the checkpoint: output must never leave unheld unnoticed.
	Hold() error
	// Cut closes epoch: everything the guest sent before its pause belongs
	// to it. Called with the guest paused.
	Cut(ctx context.Context, epoch uint64) error
	// Commit releases the output of every epoch up to epoch and says what
	// it released (zero where the buffer does not count it).
	Commit(epoch uint64) netbuffer.Release
	// PassThrough releases everything held and stops holding: the session
	// ended and the guest runs on unprotected.
	PassThrough()
}

// DiskSource yields the guest's disk writes of the epoch being closed.
type DiskSource interface {
	// BeginCut is called just before the pause: writes held back by a
	// per-epoch cap must go into the epoch now, since QMP stop waits for
	// the guest's I/O to finish.
	BeginCut()
	// Cut returns the writes received since the last Cut. Called with the
	// guest paused, after QMP stop drained its I/O. An error says the
	// writes can no longer be trusted to be complete (the mirror stopped
	// copying them): the checkpoint fails and the session ends.
	Cut() ([]transport.DiskWrite, error)
}

// FaultPoint names a point of the epoch cycle.
type FaultPoint string

// The points at which PrimaryConfig.Fault is called.
const (
	FaultPaused   FaultPoint = "paused"   // guest stopped, nothing harvested yet
	FaultResumed  FaultPoint = "resumed"  // guest resumed, epoch not yet sent
	FaultShipping FaultPoint = "shipping" // about half of the epoch's frames sent
	FaultShipped  FaultPoint = "shipped"  // commit sent, ack not yet processed
	FaultAcked    FaultPoint = "acked"    // epoch acknowledged, next not started
)

// PauseStats splits one pause into its steps.
type PauseStats struct {
	// Cut is the output cut (Output.Cut), zero without an Output.
	Stop, Cut, Harvest, Copy, Save, Cont time.Duration
}

// Total is the whole time the guest was paused.
func (p PauseStats) Total() time.Duration {
	return p.Stop + p.Cut + p.Harvest + p.Copy + p.Save + p.Cont
}

// EpochStats describes one epoch.
type EpochStats struct {
	Epoch       uint64
	Start       time.Time // the stop command was sent
	Pause       PauseStats
	DirtyPages  int
	DeviceBytes int
	DiskWrites  int           // disk writes in the epoch
	DiskBytes   int64         // their data (zero writes count their length)
	WireBytes   int64         // frame bytes sent for the epoch
	Ship        time.Duration // from resume until the commit frame was written
	Acked       time.Time
	Output      netbuffer.Release // the network output the commit released
	// Interval is the effective epoch: from the previous epoch's start to
	// this one's; Ran is how much of it the guest ran (from the previous
	// resume). Both zero for a session's first epoch.
	Interval, Ran time.Duration
	// LiveSync describes the live first sync before a session's first
	// epoch, in that epoch's stats (zero otherwise).
	LiveSync LiveSyncStats
}

// RunFraction is the share of the effective epoch the guest ran (0 when
// unknown: a session's first epoch).
func (e EpochStats) RunFraction() float64 {
	if e.Interval <= 0 {
		return 0
	}
	return float64(e.Ran) / float64(e.Interval)
}

// AckLatency is the time from the start of the epoch's pause to its ack.
func (e EpochStats) AckLatency() time.Duration { return e.Acked.Sub(e.Start) }

// DefaultCommandTimeout bounds a checkpoint's QMP commands by default.
const DefaultCommandTimeout = 10 * time.Second

// Primary runs the epoch loop for one VM.
type Primary struct {
	cfg     PrimaryConfig
	mon     Monitor
	ram     []byte
	tracker dirtypages.Tracker
	log     *slog.Logger
	// switchq takes switchover requests to the running session; each
	// is answered on its channel when the switchover ends.
	switchq chan chan error
	free    chan []byte // shipped epochs' page buffers, for reuse
	// sync is the live first sync's progress, for SyncProgress.
	sync struct {
		on           atomic.Bool
		round, pages atomic.Int64
	}
}

// SyncProgress is how far a session's live first sync has come.
type SyncProgress struct {
	Syncing  bool // the live first sync runs: nothing of the session is resumable yet
	Round    int  // the round under way, from 1
	Pages    int  // pages sent so far over all rounds
	RAMPages int  // pages of guest RAM
}

// SyncProgress reports the live first sync of the running session.
func (p *Primary) SyncProgress() SyncProgress {
	return SyncProgress{Syncing: p.sync.on.Load(), Round: int(p.sync.round.Load()), Pages: int(p.sync.pages.Load()),
		RAMPages: len(p.ram) / transport.PageSize}
}

// Switchover moves the guest to the backup with nothing lost: the running
// session takes a final epoch with the guest paused, waits for the
// backup's acknowledgement, kills the guest here and tells the backup to
// resume that epoch. It returns once the session ended: an error matching
// ErrSwitchedOver when it completed (Run returns the same); another error
// when it was refused (no session protecting the guest) or abandoned (the
// guest runs on here). ctx bounds the wait for a session to take the
// request, and for the answer.
func (p *Primary) Switchover(ctx context.Context) error {
	reply := make(chan error, 1)
	select {
	case p.switchq <- reply:
	case <-ctx.Done():
		return fmt.Errorf("checkpoint: switchover: no protection session takes it: %w", ctx.Err())
	}
	select {
	case err := <-reply:
		return err
	case <-ctx.Done():
		return fmt.Errorf("checkpoint: switchover: %w (it may still complete)", ctx.Err())
	}
}

// NewPrimary prepares the loop: mon controls QEMU, ram is the guest RAM
// mapped from the shared backend, tracker finds the pages written in each
// epoch (its first harvest must report every page).
func NewPrimary(cfg PrimaryConfig, mon Monitor, ram []byte, tracker dirtypages.Tracker) (*Primary, error) {
	if err := cfg.Pipeline.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.Heartbeat.Validate(); err != nil {
		return nil, err
	}
	if len(ram) == 0 || len(ram)%transport.PageSize != 0 {
		return nil, fmt.Errorf("checkpoint: guest RAM of %d bytes is not a whole number of pages", len(ram))
	}
	if tracker.Pages() != len(ram)/transport.PageSize {
		return nil, fmt.Errorf("checkpoint: tracker covers %d pages, RAM has %d", tracker.Pages(), len(ram)/transport.PageSize)
	}
	if cfg.StateDir == "" {
		return nil, errors.New("checkpoint: StateDir is required")
	}
	if cfg.VMName == "" {
		return nil, errors.New("checkpoint: VMName is required")
	}
	if cfg.KillGuest == nil {
		return nil, errors.New("checkpoint: KillGuest is required")
	}
	cfg.Pipeline = cfg.Pipeline.WithDefaults()
	cfg.Heartbeat = cfg.Heartbeat.WithDefaults()
	if cfg.CommandTimeout <= 0 {
		cfg.CommandTimeout = DefaultCommandTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Primary{cfg: cfg, mon: mon, ram: ram, tracker: tracker, log: log.With("role", "primary"),
		switchq: make(chan chan error), free: make(chan []byte, cfg.Pipeline.MaxInFlight+1)}, nil
}

// epochData is a checkpoint taken and waiting to be shipped.
type epochData struct {
	stats  EpochStats
	epoch  transport.Epoch
	resume time.Time
	buf    []byte // the pages' data, recycled once shipped
}

// pageBuf returns a buffer of n bytes for an epoch's pages, reusing one an
// earlier epoch shipped when it is large enough: a fresh allocation of
// tens of MiB per epoch costs a page fault per page during the pause,
// which dominated it for a guest writing thousands of pages an epoch.
func (p *Primary) pageBuf(n int) []byte {
	select {
	case b := <-p.free:
		if cap(b) >= n {
			return b[:n]
		}
	default:
	}
	return make([]byte, n, n+n/4)
}

// recycle keeps a shipped epoch's buffer for a later epoch.
func (p *Primary) recycle(b []byte) {
	if b == nil {
		return
	}
	select {
	case p.free <- b[:0]:
	default:
	}
}

// shipped is the sender's report on one epoch.
type shipped struct {
	epoch     uint64
	wireBytes int64
	ship      time.Duration
	err       error
}

// pendingEpoch is an epoch in flight as the driver tracks it for its
// statistics: reported once both shipped and acknowledged.
type pendingEpoch struct {
	EpochStats
	shipped, acked bool
}

// Run protects the VM over link until the session ends, and returns why.
// It drives a Session: every end says why to the backup (see Session), and
// the guest is never left paused by a failed checkpoint. When ctx ends the
// session says goodbye (waiting up to the goodbye timeout for the backup's
// confirmation) and Run returns an error matching ErrStopped. Other ends
// match ErrPeerLost (the backup is gone; the guest runs on unprotected),
// ErrPeerRejected (the backup refused), ErrFailedOver (the backup already
// resumed the guest: it was killed here) or ErrHandedOver.
func (p *Primary) Run(ctx context.Context, link Link) error {
	// Link I/O outlives ctx: the goodbye must still go out after it ends.
	ioctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	s, acts, err := NewSession(SessionConfig{VMName: p.cfg.VMName, RAMSize: uint64(len(p.ram)), DiskSize: p.cfg.DiskSize,
		Pipeline: p.cfg.Pipeline, Heartbeat: p.cfg.Heartbeat, Prepare: p.cfg.Prepare != nil || p.liveSync()}, time.Now())
	if err != nil {
		return err
	}
	var enc *transport.DeltaEncoder
	if p.cfg.Compress {
		if n := p.cfg.DeltaCachePages; n > 0 && n < len(p.ram)/transport.PageSize {
			enc, err = transport.NewBoundedDeltaEncoder(uint64(len(p.ram)), p.cfg.DeltaCachePages)
		} else {
			enc, err = transport.NewDeltaEncoder(uint64(len(p.ram)))
		}
		if err != nil {
			return err
		}
	}
	d := &primaryDriver{p: p, s: s, link: link, enc: enc, ctx: ioctx,
		events: make(chan any, 64), pending: map[uint64]*pendingEpoch{}, taken: map[uint64]*epochData{},
		sendq: make(chan *epochData, p.cfg.Pipeline.MaxInFlight+1), beats: make(chan uint64, 1)}
	go d.receive()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); d.sender() }()
	go func() { defer wg.Done(); d.heartbeats() }()
	defer func() {
		close(d.sendq)
		cancel()
		wg.Wait()
		// The step before the first epoch reads guest RAM and the
		// tracker, which the caller releases once Run returns.
		d.prep.Wait()
		if enc != nil {
			enc.Close()
		}
	}()

	tick := time.NewTicker(p.cfg.Heartbeat.Interval / 4)
	defer tick.Stop()
	timer := time.NewTimer(0)
	defer timer.Stop()
	done := ctx.Done()
	for {
		if end, ok := d.do(acts); ok {
			return end
		}
		if w := s.NextWake(); !w.IsZero() {
			timer.Reset(max(time.Until(w), 0))
		}
		select {
		case <-done:
			done = nil
			acts = s.Step(StopRequested{Now: time.Now(), Reason: "the primary agent stops: " + context.Cause(ctx).Error()})
		case reply := <-p.switchq:
			if s.State() != Running || d.switchReply != nil {
				reply <- fmt.Errorf("checkpoint: switchover refused: the session is %s, not protecting the guest", s.State())
				continue
			}
			d.switchReply = reply
			p.log.Info("switchover: taking the final epoch")
			acts = s.Step(SwitchoverRequested{Now: time.Now()})
		case ev := <-d.events:
			var ok bool
			if acts, ok = d.internal(ev); !ok {
				acts = s.Step(ev)
			}
		case now := <-tick.C:
			acts = d.tick(now)
		case now := <-timer.C:
			acts = d.tick(now)
		}
	}
}

// tick advances the Session's clock, with the time the newest frame came
// off the link: frames still queued count before the failure detector
// judges.
func (d *primaryDriver) tick(now time.Time) []any {
	var heard time.Time
	if ns := d.lastRecv.Load(); ns != 0 {
		heard = time.Unix(0, ns)
	}
	return d.s.Step(Tick{Now: now, Heard: heard})
}

// primaryDriver carries out a Session's actions.
type primaryDriver struct {
	p       *Primary
	s       *Session
	link    Link
	enc     *transport.DeltaEncoder
	ctx     context.Context // link I/O; ends when Run returns
	events  chan any
	pending map[uint64]*pendingEpoch
	taken   map[uint64]*epochData // taken, not yet handed to the sender
	sendq   chan *epochData
	beats   chan uint64
	// checkpointing counts the checkpoint under way (one at most); prep
	// the step before the first epoch.
	checkpointing sync.WaitGroup
	prep          sync.WaitGroup
	lastRecv      atomic.Int64 // Unix ns of the newest frame from the backup
	passed        bool         // the session's end let the guest's output go
	killFailed    bool         // KillGuest failed: no takeover may follow
	// finalPaused: a final (switchover) checkpoint left the guest paused
	// and nothing resumed or killed it yet.
	finalPaused atomic.Bool
	switchReply chan error // the switchover's requester, answered at End
	// The previous epoch's pause began at lastStart and ended at
	// lastResume (zero before the session's first epoch).
	lastStart, lastResume time.Time
	liveStats             LiveSyncStats // the session's live first sync
	stretchLogged         time.Time     // last "epochs stretched" line
}

// ran fills in how long the guest ran before the epoch's pause and the
// effective epoch, and says (at most every 10 s) when the guest's share
// of time stretched the epochs well beyond the interval.
func (d *primaryDriver) ran(st *EpochStats, resume time.Time) {
	if !d.lastStart.IsZero() {
		st.Interval, st.Ran = st.Start.Sub(d.lastStart), st.Start.Sub(d.lastResume)
	}
	d.lastStart, d.lastResume = st.Start, resume
	cfg := d.p.cfg.Pipeline // NewPrimary filled in the defaults
	if st.Interval > 2*cfg.Interval && cfg.MinRun > 0 && st.Start.Sub(d.stretchLogged) >= 10*time.Second {
		d.stretchLogged = st.Start
		d.p.log.Info("epochs stretched so that the guest runs its share of the time", "epoch", st.Epoch,
			"effective_epoch", st.Interval.Round(time.Millisecond), "interval", cfg.Interval,
			"previous_pause", (st.Interval - st.Ran).Round(time.Millisecond), "min_run", cfg.MinRun)
	}
}

// waitCheckpoint waits for a checkpoint under way, draining the events
// meanwhile so that its report can always be posted.
func (d *primaryDriver) waitCheckpoint() {
	done := make(chan struct{})
	go func() { d.checkpointing.Wait(); close(done) }()
	for {
		select {
		case <-done:
			return
		case <-d.events:
		}
	}
}

// checkpointDone is a checkpoint's result, from its goroutine.
type checkpointDone struct {
	epoch uint64
	ed    *epochData
	err   error
	stuck bool
}

// internal handles the driver's own reports; ok is false for Session
// events.
func (d *primaryDriver) internal(ev any) (acts []any, ok bool) {
	switch r := ev.(type) {
	case shippedReport:
		d.shipped(r)
		return nil, true
	case checkpointDone:
		if r.err != nil {
			return d.s.Step(CheckpointFailed{Now: time.Now(), Epoch: r.epoch, Err: r.err, GuestStuck: r.stuck}), true
		}
		d.ran(&r.ed.stats, r.ed.resume)
		if d.liveStats.Rounds > 0 {
			r.ed.stats.LiveSync, d.liveStats = d.liveStats, LiveSyncStats{}
		}
		d.pending[r.epoch] = &pendingEpoch{EpochStats: r.ed.stats}
		d.taken[r.epoch] = r.ed
		return d.s.Step(CheckpointTaken{Now: time.Now(), Epoch: r.epoch}), true
	}
	return nil, false
}

// do carries out actions, feeding back what the synchronous ones report;
// it returns the session's end once End comes.
func (d *primaryDriver) do(acts []any) (error, bool) {
	p := d.p
	for len(acts) > 0 {
		a := acts[0]
		acts = acts[1:]
		switch a := a.(type) {
		case SendHelloToBackup:
			h := transport.Hello{Version: transport.Version, Role: transport.RolePrimary, VMName: p.cfg.VMName,
				RAMSize: uint64(len(p.ram)), DiskSize: p.cfg.DiskSize, PageSize: transport.PageSize}
			if err := d.send(0, h); err != nil {
				acts = append(acts, d.s.Step(LinkDown{Now: time.Now(), Err: fmt.Errorf("send hello: %w", err)})...)
			}
		case StartPrepare:
			d.prep.Go(func() {
				var err error
				if p.cfg.Prepare != nil {
					err = p.cfg.Prepare(d.ctx, d.link)
				}
				if err == nil && p.liveSync() {
					err = d.liveSync(d.ctx)
				}
				d.post(Prepared{Now: time.Now(), Err: err})
			})
		case TakeCheckpoint:
			// The checkpoint runs beside the loop, which meanwhile hears
			// the backup, sends heartbeats and releases acknowledged
			// output: a long pause (the first epoch copies all of RAM)
			// must not look like silence to either side.
			d.checkpointing.Add(1)
			go func() {
				defer d.checkpointing.Done()
				ed, err, stuck := p.checkpoint(d.ctx, a.Epoch, a.Started, a.Final)
				if err == nil && a.Final {
					d.finalPaused.Store(true)
				}
				if err != nil && p.cfg.GuestGone != nil && p.cfg.GuestGone() {
					err, stuck = fmt.Errorf("%w (the guest's QEMU is gone)", err), true
				}
				d.post(checkpointDone{epoch: a.Epoch, ed: ed, err: err, stuck: stuck})
			}()
		case Ship:
			ed := d.taken[a.Epoch]
			delete(d.taken, a.Epoch)
			d.sendq <- ed // room for MaxInFlight+1: never blocks
		case Release:
			p.fault(FaultAcked, a.Epoch)
			var released netbuffer.Release
			if p.cfg.Output != nil {
				released = p.cfg.Output.Commit(a.Epoch)
			}
			if pe := d.pending[a.Epoch]; pe != nil {
				pe.Acked, pe.Output, pe.acked = time.Now(), released, true
				d.report(a.Epoch)
			}
		case Heartbeat:
			select {
			case d.beats <- a.Committed:
			default: // one is on its way
			}
		case Goodbye:
			code, msg := transport.CodeGoodbye, a.Reason
			switch {
			case a.TakeOver && d.killFailed:
				// The guest may not be gone: the backup must not resume
				// it. Better no guest than two.
				msg += "; but the guest could not be killed here: do not resume it"
			case a.TakeOver:
				code = transport.CodeTakeOver
			}
			if len(msg) > transport.MaxErrorMessage {
				msg = strings.ToValidUTF8(msg[:transport.MaxErrorMessage], "")
			}
			p.log.Info("telling the backup the session ends", "takeover", a.TakeOver, "reason", a.Reason)
			if err := d.send(0, transport.Error{Code: code, Message: msg}); err != nil {
				acts = append(acts, d.s.Step(LinkDown{Now: time.Now(), Err: fmt.Errorf("send goodbye: %w", err)})...)
			}
		case KillGuest:
			p.log.Error("stopping the guest here for good", "reason", a.Reason)
			if err := p.cfg.KillGuest(d.ctx, a.Reason); err != nil {
				p.log.Error("kill the guest", "err", err)
				d.killFailed = true
			}
		case PassThrough:
			// Only the session's end lets output go for good; the
			// hello's PassThrough (what the guest sent before the
			// session) is followed by the first pause's Hold, and
			// output held since then belongs to uncommitted epochs.
			d.passed = d.s.State() == Ended
			if p.cfg.Output != nil {
				p.cfg.Output.PassThrough()
			}
		case ResumeGuest:
			d.resumeFinal()
		case End:
			// A checkpoint under way ends first: it resumes the guest.
			// Its report is drained meanwhile (the loop reads no more),
			// and output let go by this session stays let go (the
			// checkpoint may have held it again).
			d.waitCheckpoint()
			if !errors.Is(a.Err, ErrSwitchedOver) && !errors.Is(a.Err, ErrFailedOver) {
				// A switchover's final epoch taken as the session
				// ended: the guest runs on here.
				d.resumeFinal()
			}
			if d.switchReply != nil {
				d.switchReply <- a.Err
			}
			if d.passed && p.cfg.Output != nil {
				p.cfg.Output.PassThrough()
			}
			if s, ok := d.link.(interface{ Shutdown(context.Context) error }); ok {
				// The backup reads the goodbye, then a clean end.
				sctx, cancel := context.WithTimeout(d.ctx, time.Second)
				s.Shutdown(sctx)
				cancel()
			}
			return a.Err, true
		}
	}
	return nil, false
}

func (d *primaryDriver) post(ev any) {
	select {
	case d.events <- ev:
	case <-d.ctx.Done():
	}
}

func (d *primaryDriver) send(epoch uint64, m transport.Message) error {
	ctx, cancel := context.WithTimeout(d.ctx, d.p.cfg.Heartbeat.Timeout)
	defer cancel()
	return sendMessage(ctx, d.link, epoch, m)
}

// report hands an epoch's statistics out once it was both shipped and
// acknowledged (the ack can overtake the sender's report).
func (d *primaryDriver) report(n uint64) {
	pe := d.pending[n]
	if pe == nil || !pe.shipped || !pe.acked {
		return
	}
	delete(d.pending, n)
	d.p.log.Debug("epoch committed", "epoch", n, "pause", pe.Pause.Total(), "dirty_pages", pe.DirtyPages,
		"wire_bytes", pe.WireBytes, "ack_latency", pe.AckLatency())
	if d.p.cfg.OnEpoch != nil {
		d.p.cfg.OnEpoch(pe.EpochStats)
	}
}

// shipped records that an epoch went out whole.
func (d *primaryDriver) shipped(r shippedReport) {
	if pe := d.pending[r.epoch]; pe != nil {
		pe.WireBytes, pe.Ship, pe.shipped = r.wireBytes, r.ship, true
		d.report(r.epoch)
	}
	d.p.fault(FaultShipped, r.epoch)
}

// receive reads the backup's frames into events until the link fails.
func (d *primaryDriver) receive() {
	for {
		f, err := d.link.Recv(d.ctx)
		if err == nil {
			d.lastRecv.Store(time.Now().UnixNano())
		}
		if err != nil {
			d.post(LinkDown{Now: time.Now(), Err: fmt.Errorf("receive from backup: %w", err)})
			return
		}
		m, err := transport.Decode(f)
		if err != nil {
			d.post(LinkDown{Now: time.Now(), Err: fmt.Errorf("%w: from backup: %w", ErrPeerRejected, err)})
			return
		}
		if _, ok := m.(transport.Auth); ok {
			d.post(LinkDown{Now: time.Now(), Err: fmt.Errorf("%w: %w: the backup authenticates and this primary has no key (give both the same --key-file)", ErrPeerRejected, transport.ErrAuth)})
			return
		}
		d.post(BackupMessage{Now: time.Now(), Epoch: f.Epoch, Msg: m})
	}
}

// sender ships epochs in order while the loop goes on.
func (d *primaryDriver) sender() {
	for ed := range d.sendq {
		s := d.p.ship(d.ctx, d.link, ed, d.enc)
		d.p.recycle(ed.buf)
		if s.err != nil {
			d.post(ShipFailed{Now: time.Now(), Epoch: s.epoch, Err: s.err})
			for range d.sendq { // drain: nothing more goes out
			}
			return
		}
		d.post(shippedReport(s))
	}
}

// shippedReport is the sender's note that an epoch went out whole; it is
// statistics, not a Session event.
type shippedReport shipped

// heartbeats sends heartbeats on their own goroutine: a stalled link blocks
// only this one.
func (d *primaryDriver) heartbeats() {
	for {
		select {
		case <-d.ctx.Done():
			return
		case c := <-d.beats:
			sendMessage(d.ctx, d.link, 0, transport.Heartbeat{SentUnixNano: time.Now().UnixNano(), LastCommitted: c})
		}
	}
}

func sendMessage(ctx context.Context, link Link, epoch uint64, m transport.Message) error {
	f, err := transport.NewFrame(epoch, m)
	if err != nil {
		return err
	}
	return link.Send(ctx, f)
}

func (p *Primary) fault(at FaultPoint, epoch uint64) {
	if p.cfg.Fault != nil {
		p.cfg.Fault(at, epoch)
	}
}

// resumeFinal continues a guest that a final checkpoint left paused.
func (d *primaryDriver) resumeFinal() {
	if !d.finalPaused.Swap(false) {
		return
	}
	cctx, cancel := context.WithTimeout(d.ctx, d.p.cfg.CommandTimeout)
	defer cancel()
	if err := qemu.Cont(cctx, d.p.mon); err != nil {
		d.p.log.Error("switchover abandoned: continue the guest", "err", err)
		return
	}
	d.p.log.Warn("switchover abandoned: the guest runs on here")
}

// checkpoint pauses the guest, takes epoch n and resumes the guest (final:
// leaves it paused, for a switchover). Each QMP command is bounded by the
// command timeout. stuck reports a guest that may not be running normally
// afterwards: the stop timed out (its state is unknown), or no cont
// succeeded after a successful stop.
func (p *Primary) checkpoint(ctx context.Context, n uint64, now time.Time, final bool) (ed *epochData, err error, stuck bool) {
	st := EpochStats{Epoch: n, Start: now}
	mark := time.Now()
	step := func(d *time.Duration) {
		t := time.Now()
		*d = t.Sub(mark)
		mark = t
	}
	bounded := func(cmd func(context.Context, qemu.Monitor) error) error {
		cctx, cancel := context.WithTimeout(ctx, p.cfg.CommandTimeout)
		defer cancel()
		return cmd(cctx, p.mon)
	}
	if p.cfg.Disk != nil {
		// Writes waiting for room in the epoch go in now: QMP stop waits
		// for the guest's I/O, and so for them.
		p.cfg.Disk.BeginCut()
	}
	if err := bounded(qemu.Stop); err != nil {
		return nil, fmt.Errorf("stop: %w", err), errors.Is(err, context.DeadlineExceeded)
	}
	step(&st.Pause.Stop)
	resumed := false
	defer func() {
		if resumed {
			return
		}
		// Never leave the guest paused, whatever failed.
		if cerr := bounded(qemu.Cont); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cont after failure: %w", cerr))
			stuck = true
		}
	}()
	p.fault(FaultPaused, n)

	if out := p.cfg.Output; out != nil {
		if err := out.Cut(ctx, n); err != nil {
			return nil, fmt.Errorf("cut network output: %w", err), false
		}
		if n == 1 {
			// Output from before the session's first pause needs no
			// holding: every state the backup can resume includes it.
			if err := out.Hold(); err != nil {
				return nil, fmt.Errorf("hold network output: %w", err), false
			}
		}
	}
	step(&st.Pause.Cut)
	var disk []transport.DiskWrite
	if p.cfg.Disk != nil {
		if disk, err = p.cfg.Disk.Cut(); err != nil {
			return nil, fmt.Errorf("disk: %w", err), false
		}
		for _, w := range disk {
			st.DiskBytes += int64(w.Length)
		}
		st.DiskWrites = len(disk)
	}

	set, err := p.tracker.Harvest(ctx)
	if err != nil {
		return nil, fmt.Errorf("harvest dirty pages: %w", err), false
	}
	step(&st.Pause.Harvest)

	count := set.Count()
	buf := p.pageBuf(count * transport.PageSize)
	pages := make([]transport.Page, 0, count)
	for i := range set.All() {
		off := i * transport.PageSize
		data := buf[len(pages)*transport.PageSize : (len(pages)+1)*transport.PageSize]
		copy(data, p.ram[off:off+transport.PageSize])
		pages = append(pages, transport.Page{Index: uint64(i), Data: data})
	}
	step(&st.Pause.Copy)

	dctx, cancel := context.WithTimeout(ctx, p.cfg.CommandTimeout)
	dev, err := p.saveDevices(dctx)
	cancel()
	if err != nil {
		return nil, err, false
	}
	step(&st.Pause.Save)

	if final {
		resumed = true // the switchover resumes it elsewhere, or here if abandoned
		st.DirtyPages, st.DeviceBytes = count, len(dev)
		return &epochData{stats: st, epoch: transport.Epoch{Number: n, Pages: pages, DeviceState: dev, Disk: disk}, resume: time.Now(), buf: buf}, nil, false
	}
	if err := bounded(qemu.Cont); err != nil {
		return nil, fmt.Errorf("cont: %w", err), false // the deferred cont tries again
	}
	resumed = true
	step(&st.Pause.Cont)
	st.DirtyPages, st.DeviceBytes = count, len(dev)
	p.fault(FaultResumed, n)
	return &epochData{stats: st, epoch: transport.Epoch{Number: n, Pages: pages, DeviceState: dev, Disk: disk}, resume: time.Now(), buf: buf}, nil, false
}

func (p *Primary) saveDevices(ctx context.Context) ([]byte, error) {
	path := filepath.Join(p.cfg.StateDir, "devices.state")
	if err := p.cfg.Saver.Save(ctx, p.mon, path); err != nil {
		return nil, fmt.Errorf("save device state: %w", err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read device state: %w", err)
	}
	return data, nil
}

// ship sends one epoch's frames in order.
func (p *Primary) ship(ctx context.Context, link Link, ed *epochData, enc *transport.DeltaEncoder) shipped {
	n := ed.epoch.Number
	if p.cfg.OnPages != nil {
		p.cfg.OnPages(n, ed.epoch.Pages)
	}
	// Frames go out as they are made: a large epoch (a first one of all
	// of RAM) is not copied whole a second time.
	var bytes int64
	total := len(ed.epoch.Disk) + (len(ed.epoch.Pages)+transport.MaxPagesPerFrame-1)/transport.MaxPagesPerFrame + 2 // about
	progressEvery := 0
	if total > 1000 {
		progressEvery = total / 10
	}
	i := 0
	err := ed.epoch.EachFrame(enc, func(f transport.Frame) error {
		if i == total/2 {
			p.fault(FaultShipping, n)
		}
		if err := link.Send(ctx, f); err != nil {
			return err
		}
		i++
		bytes += int64(len(f.Payload) + transport.Overhead)
		if progressEvery > 0 && i%progressEvery == 0 {
			p.log.Info("shipping epoch", "epoch", n, "frames_sent", i, "frames_about", total, "bytes_sent", bytes)
		}
		return nil
	})
	if err != nil {
		return shipped{epoch: n, err: err}
	}
	return shipped{epoch: n, wireBytes: bytes, ship: time.Since(ed.resume)}
}

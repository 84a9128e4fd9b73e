package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/remus-kvm/remus/dirtypages"
	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/transport"
)

// Monitor is the part of a QMP client the checkpoint loop uses.
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

// DeviceSaver saves the guest's device and CPU state while it is paused.
type DeviceSaver int

const (
	// SaveXen uses xen-save-devices-state (live: false): about 2 ms and
	// 32 KiB for a small q35 guest.
	SaveXen DeviceSaver = iota
	// SaveMigrate uses migrate with x-ignore-shared to a file: slower and
	// larger, for QEMU builds without xen-save-devices-state.
	SaveMigrate
)

func (s DeviceSaver) String() string {
	if s == SaveMigrate {
		return "migrate(x-ignore-shared)"
	}
	return "xen-save-devices-state"
}

// PrimaryConfig configures the primary's epoch loop.
type PrimaryConfig struct {
	VMName   string
	Pipeline PipelineConfig
	// Heartbeat timing towards the backup.
	Heartbeat failover.DetectorConfig
	// StateDir is a directory QEMU can write the device state into (it must
	// be on this host; a tmpfs such as /dev/shm is best).
	StateDir string
	// Saver picks how the device state is saved.
	Saver DeviceSaver
	// QEMUVersion selects the migrate URI form for SaveMigrate.
	QEMUVersion qmp.Version
	// Output, when set, holds the guest's network output until the epoch
	// that produced it commits (output commit). It holds from the first
	// pause of each session (what the guest sent before is in every state
	// the backup can resume) and passes everything through when a session
	// ends.
	Output Output
	// Compress sends pages as XOR deltas against their last version,
	// compressed with zstd or lz4, whichever is smaller (RAMDelta frames).
	Compress bool
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
	// OnEpoch, when set, is called from the loop's goroutine with the
	// statistics of each epoch once it is acknowledged. It must not block.
	OnEpoch func(EpochStats)
	// Fault, when set, is called at each FaultPoint with the epoch; tests
	// use it to stop the agent at a chosen point of the epoch cycle.
	Fault  func(FaultPoint, uint64)
	Logger *slog.Logger
}

// Output is the guest's outbound network traffic, held per epoch (package
// netbuffer's Relay, through a small adapter).
type Output interface {
	// Hold starts holding output for a new session, whose epochs are
	// numbered from 1; called in the first pause, after Cut(1).
	Hold()
	// Cut closes epoch: everything the guest sent before its pause belongs
	// to it. Called with the guest paused.
	Cut(ctx context.Context, epoch uint64) error
	// Commit releases the output of every epoch up to epoch.
	Commit(epoch uint64) OutputCommit
	// PassThrough releases everything held and stops holding: the session
	// ended and the guest runs on unprotected.
	PassThrough()
}

// DiskSource yields the guest's disk writes of the epoch being closed.
type DiskSource interface {
	// Cut returns the writes received since the last Cut. Called with the
	// guest paused, after QMP stop drained its I/O.
	Cut() []transport.DiskWrite
}

// OutputCommit describes the network output one commit released.
type OutputCommit struct {
	Frames int
	Bytes  int64
	// WaitP50 and WaitP99: how long the released frames were held.
	WaitP50, WaitP99 time.Duration
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
	Output      OutputCommit // the network output the commit released
}

// AckLatency is the time from the start of the epoch's pause to its ack.
func (e EpochStats) AckLatency() time.Duration { return e.Acked.Sub(e.Start) }

// Primary runs the epoch loop for one VM.
type Primary struct {
	cfg     PrimaryConfig
	mon     Monitor
	ram     []byte
	tracker dirtypages.Tracker
	log     *slog.Logger
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
	if len(ram) == 0 || len(ram)%dirtypages.PageSize != 0 {
		return nil, fmt.Errorf("checkpoint: guest RAM of %d bytes is not a whole number of pages", len(ram))
	}
	if tracker.Pages() != len(ram)/dirtypages.PageSize {
		return nil, fmt.Errorf("checkpoint: tracker covers %d pages, RAM has %d", tracker.Pages(), len(ram)/dirtypages.PageSize)
	}
	if cfg.StateDir == "" {
		return nil, errors.New("checkpoint: StateDir is required")
	}
	if cfg.VMName == "" {
		return nil, errors.New("checkpoint: VMName is required")
	}
	cfg.Pipeline = cfg.Pipeline.WithDefaults()
	cfg.Heartbeat = cfg.Heartbeat.WithDefaults()
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Primary{cfg: cfg, mon: mon, ram: ram, tracker: tracker, log: log.With("vm", cfg.VMName, "role", "primary")}, nil
}

// epochData is a checkpoint taken and waiting to be shipped.
type epochData struct {
	stats  EpochStats
	epoch  transport.Epoch
	resume time.Time
}

type shipped struct {
	epoch     uint64
	wireBytes int64
	ship      time.Duration
	err       error
}

// Run protects the VM over link until ctx ends or protection fails. The
// guest is never left paused: every stop is followed by a cont, also on
// errors. It returns ctx.Err() when ctx ends, and an error wrapping
// ErrPeerLost or ErrPeerRejected when the backup goes away or refuses an
// epoch; the guest keeps running unprotected then.
func (p *Primary) Run(ctx context.Context, link Link) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := p.hello(ctx, link); err != nil {
		return err
	}
	if out := p.cfg.Output; out != nil {
		defer out.PassThrough()
	}
	pipe, _ := NewPipeline(p.cfg.Pipeline, 0)
	live := startLiveness(ctx, p.cfg.Heartbeat, link)
	frames := receive(ctx, link, live)

	// Epochs start once Prepare (the disk's initial copy) is done; the loop
	// meanwhile keeps reading the backup's frames and watching its
	// heartbeats.
	prepared := make(chan error, 1)
	if p.cfg.Prepare != nil {
		go func() { prepared <- p.cfg.Prepare(ctx, link) }()
	} else {
		prepared <- nil
	}
	ready := false

	var enc *transport.DeltaEncoder
	if p.cfg.Compress {
		var err error
		if enc, err = transport.NewDeltaEncoder(uint64(len(p.ram))); err != nil {
			return err
		}
	}
	// The sender ships epochs in order while the loop goes on.
	sendq := make(chan *epochData, p.cfg.Pipeline.MaxInFlight)
	shippedc := make(chan shipped, p.cfg.Pipeline.MaxInFlight)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ed := range sendq {
			s := p.ship(ctx, link, ed, enc)
			shippedc <- s
			if s.err != nil {
				return
			}
		}
	}()
	defer func() {
		close(sendq)
		cancel()
		wg.Wait()
	}()

	pending := map[uint64]*pendingEpoch{}
	noteShipped := func(s shipped) error {
		if s.err != nil {
			// A backup that ends the session sends its reason first:
			// prefer that to the broken pipe it leaves behind.
			if why := backupsReason(ctx, frames); why != nil {
				return why
			}
			return fmt.Errorf("%w: epoch %d: send to backup: %w", ErrPeerLost, s.epoch, s.err)
		}
		if pe := pending[s.epoch]; pe != nil {
			pe.WireBytes, pe.Ship, pe.shipped = s.wireBytes, s.ship, true
		}
		p.fault(FaultShipped, s.epoch)
		return nil
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case s := <-shippedc:
			if err := noteShipped(s); err != nil {
				return err
			}
		case r := <-frames:
			if r.err != nil {
				return fmt.Errorf("%w: receive from backup: %w", ErrPeerLost, r.err)
			}
			f := r.f
			if f.Type == transport.TypeAck {
				// The ack can overtake the sender's report that the
				// epoch's last frame went out: take that report first.
				for pending[f.Epoch] != nil && !pending[f.Epoch].shipped {
					if err := noteShipped(<-shippedc); err != nil {
						return err
					}
				}
			}
			if err := p.handle(f, pipe, pending); err != nil {
				return err
			}
			live.committed.Store(pipe.Committed())
		case <-live.dead:
			_, _, silence := live.verdict()
			return fmt.Errorf("%w: no frame from the backup for %v", ErrPeerLost, silence.Round(time.Millisecond))
		case err := <-prepared:
			if err != nil {
				return fmt.Errorf("checkpoint: before the first epoch: %w", err)
			}
			ready, prepared = true, nil
		case <-timer.C:
		}
		if !ready {
			continue
		}
		now := time.Now()
		due, blocked := pipe.Due(now)
		if due {
			ed, err := p.checkpoint(ctx, pipe, now)
			if err != nil {
				return err
			}
			pending[ed.stats.Epoch] = &pendingEpoch{EpochStats: ed.stats}
			sendq <- ed
			timer.Reset(max(time.Until(pipe.NextDue()), 0))
		} else if !blocked {
			timer.Reset(max(time.Until(pipe.NextDue()), 0))
		}
		// When blocked, the next ack wakes the loop.
	}
}

func (p *Primary) hello(ctx context.Context, link Link) error {
	h := transport.Hello{Version: transport.Version, Role: transport.RolePrimary, VMName: p.cfg.VMName,
		RAMSize: uint64(len(p.ram)), PageSize: transport.PageSize}
	if err := sendMessage(ctx, link, 0, h); err != nil {
		return fmt.Errorf("%w: send hello: %w", ErrPeerLost, err)
	}
	hctx, cancel := context.WithTimeout(ctx, p.cfg.Heartbeat.Timeout)
	defer cancel()
	f, err := link.Recv(hctx)
	if err != nil {
		return fmt.Errorf("%w: wait for the backup's hello: %w", ErrPeerLost, err)
	}
	m, err := transport.Decode(f)
	if err != nil {
		return fmt.Errorf("%w: backup's hello: %w", ErrPeerRejected, err)
	}
	switch m := m.(type) {
	case transport.Error:
		return fmt.Errorf("%w: backup refused: %s: %s", ErrPeerRejected, m.Code, m.Message)
	case transport.Hello:
		if m.Role != transport.RoleBackup || m.VMName != p.cfg.VMName || m.RAMSize != uint64(len(p.ram)) {
			return fmt.Errorf("%w: backup answered as %s for VM %q with %d bytes of RAM; want backup for %q with %d",
				ErrPeerRejected, m.Role, m.VMName, m.RAMSize, p.cfg.VMName, len(p.ram))
		}
		p.log.Info("backup connected", "backup_last_committed", m.LastCommitted)
		return nil
	case transport.Auth:
		return fmt.Errorf("%w: %w: the backup authenticates and this primary has no key (give both the same --key-file)", ErrPeerRejected, transport.ErrAuth)
	default:
		return fmt.Errorf("%w: backup sent %s before its hello", ErrPeerRejected, f.Type)
	}
}

// pendingEpoch is an epoch in flight as the loop tracks it.
type pendingEpoch struct {
	EpochStats
	shipped bool
}

func (p *Primary) handle(f transport.Frame, pipe *Pipeline, pending map[uint64]*pendingEpoch) error {
	m, err := transport.Decode(f)
	if err != nil {
		return fmt.Errorf("%w: from backup: %w", ErrPeerRejected, err)
	}
	switch m := m.(type) {
	case transport.Ack:
		p.fault(FaultAcked, f.Epoch)
		e, err := pipe.Acked(f.Epoch)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrPeerRejected, err)
		}
		st := pending[f.Epoch]
		delete(pending, f.Epoch)
		var released OutputCommit
		if p.cfg.Output != nil {
			released = p.cfg.Output.Commit(f.Epoch)
		}
		if st != nil {
			st.Acked = time.Now()
			st.Output = released
			p.log.Debug("epoch committed", "epoch", e.Epoch, "pause", st.Pause.Total(), "dirty_pages", st.DirtyPages,
				"wire_bytes", st.WireBytes, "ack_latency", st.AckLatency())
			if p.cfg.OnEpoch != nil {
				p.cfg.OnEpoch(st.EpochStats)
			}
		}
	case transport.Heartbeat:
	case transport.Error:
		return rejected(f.Epoch, m)
	default:
		return fmt.Errorf("%w: unexpected %s frame from the backup", ErrPeerRejected, f.Type)
	}
	return nil
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

// checkpoint pauses the guest, takes the epoch and resumes the guest.
func (p *Primary) checkpoint(ctx context.Context, pipe *Pipeline, now time.Time) (ed *epochData, err error) {
	n := pipe.Begin(now)
	st := EpochStats{Epoch: n, Start: now}
	mark := time.Now()
	step := func(d *time.Duration) {
		t := time.Now()
		*d = t.Sub(mark)
		mark = t
	}
	if err := p.mon.Execute(ctx, "stop", nil, nil); err != nil {
		return nil, fmt.Errorf("checkpoint: epoch %d: stop: %w", n, err)
	}
	step(&st.Pause.Stop)
	resumed := false
	defer func() {
		if resumed {
			return
		}
		// Never leave the guest paused, whatever failed.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if cerr := p.mon.Execute(cctx, "cont", nil, nil); cerr != nil {
			err = errors.Join(err, fmt.Errorf("checkpoint: epoch %d: cont after failure: %w", n, cerr))
		}
	}()
	p.fault(FaultPaused, n)

	if out := p.cfg.Output; out != nil {
		if err := out.Cut(ctx, n); err != nil {
			return nil, fmt.Errorf("checkpoint: epoch %d: cut network output: %w", n, err)
		}
		if n == 1 {
			// Output from before the session's first pause needs no
			// holding: every state the backup can resume includes it.
			out.Hold()
		}
	}
	step(&st.Pause.Cut)
	var disk []transport.DiskWrite
	if p.cfg.Disk != nil {
		disk = p.cfg.Disk.Cut()
		for _, w := range disk {
			st.DiskBytes += int64(w.Length)
		}
		st.DiskWrites = len(disk)
	}

	set, err := p.tracker.Harvest(ctx)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: epoch %d: harvest dirty pages: %w", n, err)
	}
	step(&st.Pause.Harvest)

	count := set.Count()
	buf := make([]byte, count*dirtypages.PageSize)
	pages := make([]transport.Page, 0, count)
	for i := range set.All() {
		off := i * dirtypages.PageSize
		data := buf[len(pages)*dirtypages.PageSize : (len(pages)+1)*dirtypages.PageSize]
		copy(data, p.ram[off:off+dirtypages.PageSize])
		pages = append(pages, transport.Page{Index: uint64(i), Data: data})
	}
	step(&st.Pause.Copy)

	dev, err := p.saveDevices(ctx, n)
	if err != nil {
		return nil, err
	}
	step(&st.Pause.Save)

	if err := p.mon.Execute(ctx, "cont", nil, nil); err != nil {
		return nil, fmt.Errorf("checkpoint: epoch %d: cont: %w", n, err)
	}
	resumed = true
	step(&st.Pause.Cont)
	st.DirtyPages, st.DeviceBytes = count, len(dev)
	p.fault(FaultResumed, n)
	return &epochData{stats: st, epoch: transport.Epoch{Number: n, Pages: pages, DeviceState: dev, Disk: disk}, resume: time.Now()}, nil
}

func (p *Primary) saveDevices(ctx context.Context, n uint64) ([]byte, error) {
	path := filepath.Join(p.cfg.StateDir, "devices.state")
	os.Remove(path)
	switch p.cfg.Saver {
	case SaveXen:
		if err := p.mon.Execute(ctx, "xen-save-devices-state", map[string]any{"filename": path, "live": false}, nil); err != nil {
			return nil, fmt.Errorf("checkpoint: epoch %d: save device state: %w", n, err)
		}
	case SaveMigrate:
		if err := p.migrateToFile(ctx, path); err != nil {
			return nil, fmt.Errorf("checkpoint: epoch %d: save device state: %w", n, err)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: epoch %d: read device state: %w", n, err)
	}
	return data, nil
}

// migrateToFile saves the device state with a migration that skips shared
// RAM, for QEMU builds without xen-save-devices-state.
func (p *Primary) migrateToFile(ctx context.Context, path string) error {
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
	if err := p.mon.Execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
		return fmt.Errorf("migrate-set-capabilities x-ignore-shared: %w", err)
	}
	uri := failover.OutgoingURI(path, p.cfg.QEMUVersion.Major, p.cfg.QEMUVersion.Minor)
	if err := p.mon.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		return fmt.Errorf("migrate to %s: %w", path, err)
	}
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := p.mon.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return fmt.Errorf("query-migrate: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration to %s %s: %s", path, st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
}

// ship sends one epoch's frames in order.
func (p *Primary) ship(ctx context.Context, link Link, ed *epochData, enc *transport.DeltaEncoder) shipped {
	n := ed.epoch.Number
	if p.cfg.OnPages != nil {
		p.cfg.OnPages(n, ed.epoch.Pages)
	}
	frames, err := ed.epoch.FramesWith(enc)
	if err != nil {
		return shipped{epoch: n, err: err}
	}
	var bytes int64
	total := len(frames)
	progressEvery := 0
	if total > 1000 {
		progressEvery = total / 10
	}
	for i, f := range frames {
		if i == total/2 {
			p.fault(FaultShipping, n)
		}
		if err := link.Send(ctx, f); err != nil {
			return shipped{epoch: n, err: err}
		}
		bytes += int64(len(f.Payload) + transport.Overhead)
		if progressEvery > 0 && (i+1)%progressEvery == 0 {
			p.log.Info("shipping epoch", "epoch", n, "frames_sent", i+1, "frames", total, "bytes_sent", bytes)
		}
	}
	return shipped{epoch: n, wireBytes: bytes, ship: time.Since(ed.resume)}
}

// received is a frame, or the error that ended the connection, in the order
// they came off the link.
type received struct {
	f   transport.Frame
	err error
}

// backupsReason looks briefly among the frames still arriving for the
// Error frame in which a backup says why it ends the session, and returns it
// as an error matching ErrPeerRejected; nil when none comes.
func backupsReason(ctx context.Context, frames <-chan received) error {
	ctx, cancel := context.WithTimeout(ctx, reasonWait)
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return nil
		case r := <-frames:
			if r.err != nil {
				return nil
			}
			if r.f.Type != transport.TypeError {
				continue
			}
			m, err := transport.Decode(r.f)
			if err != nil {
				return fmt.Errorf("%w: from backup: %w", ErrPeerRejected, err)
			}
			return rejected(r.f.Epoch, m.(transport.Error))
		}
	}
}

// rejected is the error for a backup's Error frame.
func rejected(epoch uint64, e transport.Error) error {
	return fmt.Errorf("%w: epoch %d: %s: %s", ErrPeerRejected, epoch, e.Code, e.Message)
}

// reasonWait bounds how long a primary whose sends failed waits for the
// backup's explanation.
const reasonWait = 500 * time.Millisecond

// receive reads frames from link until it fails or ctx ends, marking each
// one heard. The error comes on the same channel, after every frame that
// preceded it.
func receive(ctx context.Context, link Link, live *liveness) <-chan received {
	c := make(chan received, 64)
	go func() {
		for {
			f, err := link.Recv(ctx)
			if err == nil {
				live.heard()
			}
			select {
			case c <- received{f, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return c
}

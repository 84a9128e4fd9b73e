package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/transport"
)

// BackupConfig configures the backup side of one VM.
type BackupConfig struct {
	VMName string
	// RAMImage is the file that holds the guest RAM as of the last committed
	// epoch (on a tmpfs such as /dev/shm). On failover QEMU runs on it.
	RAMImage string
	// StateFile holds the device state of the last committed epoch.
	StateFile string
	Heartbeat failover.DetectorConfig
	// Disk, when set, receives the guest's disk writes: those of the
	// initial copy at once, an epoch's held until it commits
	// (diskmirror.Journal).
	Disk DiskJournal
	// OnCommit, when set, is called after each epoch is applied, before it
	// is acknowledged. It must not block.
	OnCommit func(epoch uint64, pages int)
	Logger   *slog.Logger
}

// DiskJournal is the backup's disk image with the writes of the epoch in
// flight held back.
type DiskJournal interface {
	// Direct applies a write of the initial copy (epoch 0) at once.
	Direct(w transport.DiskWrite) error
	// Add holds a write of the epoch being received.
	Add(w transport.DiskWrite) error
	// Commit applies the held writes, in order, durably.
	Commit() error
	// Discard drops the held writes.
	Discard()
}

// Committed describes the newest committed checkpoint the backup holds.
type Committed struct {
	Epoch     uint64
	RAMImage  string
	StateFile string
	RAMSize   uint64
}

// PrimaryLost is returned by Serve when the primary stopped being heard.
type PrimaryLost struct {
	Committed Committed
	// LastHeard is when the last frame came from the primary; DeclaredAt is
	// when the heartbeat timeout ran out.
	LastHeard, DeclaredAt time.Time
	// Cause is what was seen first (a closed connection, or silence).
	Cause error
}

func (e *PrimaryLost) Error() string {
	return fmt.Sprintf("checkpoint: primary lost after epoch %d (silent %v): %v",
		e.Committed.Epoch, e.DeclaredAt.Sub(e.LastHeard).Round(time.Millisecond), e.Cause)
}

// Is makes a *PrimaryLost match ErrPeerLost.
func (e *PrimaryLost) Is(target error) bool { return target == ErrPeerLost }

var (
	errEpochRejected = errors.New("discarded epoch")
	errApply         = errors.New("checkpoint: apply")
)

// Backup receives epochs from the primary and applies each only when it has
// arrived whole and verified: the RAM image and the device state file
// always hold one committed epoch.
type Backup struct {
	cfg       BackupConfig
	log       *slog.Logger
	ram       []byte
	ramSize   uint64
	committed uint64
}

// NewBackup prepares a backup. Nothing is created until a primary connects.
func NewBackup(cfg BackupConfig) (*Backup, error) {
	if cfg.RAMImage == "" || cfg.StateFile == "" || cfg.VMName == "" {
		return nil, errors.New("checkpoint: backup needs VMName, RAMImage and StateFile")
	}
	if err := cfg.Heartbeat.Validate(); err != nil {
		return nil, err
	}
	cfg.Heartbeat = cfg.Heartbeat.WithDefaults()
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backup{cfg: cfg, log: log.With("vm", cfg.VMName, "role", "backup")}, nil
}

// Committed is the newest checkpoint the backup holds (Epoch 0: none).
func (b *Backup) Committed() Committed {
	return Committed{Epoch: b.committed, RAMImage: b.cfg.RAMImage, StateFile: b.cfg.StateFile, RAMSize: b.ramSize}
}

// Close unmaps the RAM image.
func (b *Backup) Close() error {
	if b.ram != nil {
		err := unix.Munmap(b.ram)
		b.ram = nil
		return err
	}
	return nil
}

// Serve runs one session with a primary over link. A new session starts
// from a full copy of RAM (epoch 1) and replaces what an earlier session
// left only when that epoch commits. Serve returns a *PrimaryLost (matching
// ErrPeerLost) when the primary stops being heard for the heartbeat
// timeout: the caller then fails over to Committed(). A broken connection
// alone is not taken as the primary's death; the timeout still runs from
// the last frame heard, so a failover never comes sooner than the timeout.
func (b *Backup) Serve(ctx context.Context, link Link) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The disk writes of an epoch that did not commit are never applied.
	defer b.discardDisk()
	live := startLiveness(ctx, b.cfg.Heartbeat, link)
	frames := receive(ctx, link, live)

	var stage *transport.Stage
	var cause error
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case r := <-frames:
			if r.err == nil {
				var err error
				stage, err = b.handle(ctx, link, stage, r.f)
				if err != nil {
					reply(ctx, link, r.f.Epoch, err)
					return err
				}
				live.committed.Store(b.committed)
				continue
			}
			err := r.err
			var fe *transport.FrameError
			if errors.As(err, &fe) && !errors.Is(err, io.ErrUnexpectedEOF) {
				// The stream itself is damaged: the epoch in flight is
				// discarded and the primary is told; this is no failure
				// of the primary.
				err = fmt.Errorf("checkpoint: %w %d: %w", errEpochRejected, fe.Epoch, err)
				reply(ctx, link, fe.Epoch, err)
				return err
			}
			// A connection that breaks (also mid-frame) is what a dead
			// primary looks like, but so is a broken link: only the
			// heartbeat timeout decides.
			frames = nil
			cause = fmt.Errorf("receive from primary: %w", err)
			b.log.Warn("connection to primary broken; waiting out the heartbeat timeout", "err", err)
		case <-live.dead:
			lastHeard, deadAt, silence := live.verdict()
			if cause == nil {
				cause = fmt.Errorf("no frame for %v", silence.Round(time.Millisecond))
			}
			return &PrimaryLost{Committed: b.Committed(), LastHeard: lastHeard, DeclaredAt: deadAt, Cause: cause}
		}
	}
}

// reply tells the primary why the session ends.
func reply(ctx context.Context, link Link, epoch uint64, err error) {
	code := transport.CodeProtocol
	switch {
	case errors.Is(err, errEpochRejected):
		code = transport.CodeEpoch
	case errors.Is(err, ErrPeerRejected):
		code = transport.CodeMismatch
	case errors.Is(err, errApply):
		code = transport.CodeInternal
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	msg := err.Error()
	if len(msg) > transport.MaxErrorMessage {
		msg = msg[:transport.MaxErrorMessage]
	}
	sendMessage(ctx, link, epoch, transport.Error{Code: code, Message: msg})
}

func (b *Backup) handle(ctx context.Context, link Link, stage *transport.Stage, f transport.Frame) (*transport.Stage, error) {
	if stage == nil {
		return b.hello(ctx, link, f)
	}
	switch f.Type {
	case transport.TypeHeartbeat:
		return stage, nil
	case transport.TypeDiskWrite:
		return stage, b.diskWrite(stage, f)
	case transport.TypeRAMDelta:
		// Compressed pages: XORed ones are against the committed image,
		// which holds the version the primary sent last (epochs commit in
		// order). The Commit's digest covers the expanded pages.
		m, err := transport.Decode(f)
		var pages transport.RAMPages
		if err == nil {
			pages, err = m.(transport.RAMDelta).Expand(b.basePage)
		}
		if err == nil {
			err = stage.AddPages(f.Epoch, pages)
		}
		if err != nil {
			stage.Reset()
			b.discardDisk()
			return stage, fmt.Errorf("checkpoint: %w %d: %w", errEpochRejected, f.Epoch, err)
		}
		return stage, nil
	case transport.TypeError:
		m, err := transport.Decode(f)
		if err != nil {
			return stage, fmt.Errorf("checkpoint: from primary: %w", err)
		}
		e := m.(transport.Error)
		return stage, fmt.Errorf("%w: primary: %s: %s", ErrPeerRejected, e.Code, e.Message)
	}
	ep, done, err := stage.Add(f)
	if err != nil {
		b.discardDisk()
		return stage, fmt.Errorf("checkpoint: %w %d: %w", errEpochRejected, f.Epoch, err)
	}
	if !done {
		return stage, nil
	}
	if err := b.apply(ep); err != nil {
		return stage, fmt.Errorf("%w: %w", errApply, err)
	}
	if err := sendMessage(ctx, link, ep.Number, transport.Ack{}); err != nil {
		return stage, fmt.Errorf("checkpoint: epoch %d: send ack: %w", ep.Number, err)
	}
	return stage, nil
}

// diskWrite takes a DiskWrite frame: applied at once in epoch 0 (the
// initial copy), else staged with its epoch and held in the journal.
func (b *Backup) diskWrite(stage *transport.Stage, f transport.Frame) error {
	m, err := transport.Decode(f)
	if err != nil {
		b.discardDisk()
		return fmt.Errorf("checkpoint: %w %d: %w", errEpochRejected, f.Epoch, err)
	}
	w := m.(transport.DiskWrite)
	if b.cfg.Disk == nil {
		return fmt.Errorf("%w: the primary mirrors a disk; this backup has no disk image", ErrPeerRejected)
	}
	if f.Epoch == 0 {
		if _, staging := stage.Staging(); staging || stage.Committed() > 0 {
			return fmt.Errorf("checkpoint: %w 0: a write of the initial disk copy after the first epoch began", errEpochRejected)
		}
		if err := b.cfg.Disk.Direct(w); err != nil {
			return fmt.Errorf("%w: %w", errApply, err)
		}
		return nil
	}
	if err := stage.AddDiskWrite(f.Epoch, w); err != nil {
		b.discardDisk()
		return fmt.Errorf("checkpoint: %w %d: %w", errEpochRejected, f.Epoch, err)
	}
	if err := b.cfg.Disk.Add(w); err != nil {
		return fmt.Errorf("%w: %w", errApply, err)
	}
	return nil
}

// basePage returns the committed version of a page, nil beyond RAM.
func (b *Backup) basePage(idx uint64) []byte {
	off := idx * transport.PageSize
	if idx > transport.MaxPageIndex || off+transport.PageSize > uint64(len(b.ram)) {
		return nil
	}
	return b.ram[off : off+transport.PageSize]
}

func (b *Backup) discardDisk() {
	if b.cfg.Disk != nil {
		b.cfg.Disk.Discard()
	}
}

func (b *Backup) hello(ctx context.Context, link Link, f transport.Frame) (*transport.Stage, error) {
	m, err := transport.Decode(f)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: primary's hello: %w", err)
	}
	h, ok := m.(transport.Hello)
	if !ok && f.Type == transport.TypeAuth {
		return nil, fmt.Errorf("%w: %w: the primary authenticates and this backup has no key (give both the same --key-file)", ErrPeerRejected, transport.ErrAuth)
	}
	if !ok {
		return nil, fmt.Errorf("%w: primary sent %s before its hello", ErrPeerRejected, f.Type)
	}
	if h.Role != transport.RolePrimary || h.VMName != b.cfg.VMName {
		return nil, fmt.Errorf("%w: peer is %s for VM %q; this backup protects %q", ErrPeerRejected, h.Role, h.VMName, b.cfg.VMName)
	}
	if err := b.mapRAM(h.RAMSize); err != nil {
		return nil, err
	}
	// A new session starts again from a full copy, numbered from 1. What an
	// earlier session committed is stale now (the primary ran on without
	// protection in between and the world saw its output), so it is no
	// longer a checkpoint to fail over to: until this session's first epoch
	// commits, the backup holds nothing it may resume.
	b.committed = 0
	b.discardDisk()
	stage, err := transport.NewStage(h.RAMSize, 0)
	if err != nil {
		return nil, err
	}
	if err := sendMessage(ctx, link, 0, transport.Hello{Version: transport.Version, Role: transport.RoleBackup,
		VMName: b.cfg.VMName, RAMSize: h.RAMSize, PageSize: transport.PageSize, LastCommitted: b.committed}); err != nil {
		return nil, fmt.Errorf("checkpoint: send hello: %w", err)
	}
	b.log.Info("primary connected", "ram_bytes", h.RAMSize)
	return stage, nil
}

// mapRAM creates (or reuses) the RAM image and maps it.
func (b *Backup) mapRAM(size uint64) error {
	if b.ram != nil {
		if b.ramSize == size {
			return nil
		}
		return fmt.Errorf("%w: primary announced %d bytes of RAM; this backup holds %d", ErrPeerRejected, size, b.ramSize)
	}
	f, err := os.OpenFile(b.cfg.RAMImage, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("checkpoint: RAM image: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		return fmt.Errorf("checkpoint: size RAM image %s: %w", b.cfg.RAMImage, err)
	}
	ram, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("checkpoint: map RAM image %s: %w", b.cfg.RAMImage, err)
	}
	b.ram, b.ramSize = ram, size
	return nil
}

// apply writes a verified epoch into the RAM image and the device state
// file. It runs to completion before a failover can start (the same
// goroutine decides both), so a failover sees either all of an epoch or
// none of it.
func (b *Backup) apply(ep transport.Epoch) error {
	if b.cfg.Disk != nil {
		if err := b.cfg.Disk.Commit(); err != nil {
			// Part of the epoch may be on the disk now: neither it nor
			// the one before is a state to resume.
			b.committed = 0
			return fmt.Errorf("checkpoint: epoch %d: disk: %w", ep.Number, err)
		}
	}
	for _, pg := range ep.Pages {
		off := pg.Index * transport.PageSize
		copy(b.ram[off:off+transport.PageSize], pg.Data)
	}
	if err := (failover.StateFile{Path: b.cfg.StateFile}).Save(ep.DeviceState); err != nil {
		return fmt.Errorf("checkpoint: epoch %d: %w", ep.Number, err)
	}
	b.committed = ep.Number
	if b.cfg.OnCommit != nil {
		b.cfg.OnCommit(ep.Number, len(ep.Pages))
	}
	return nil
}

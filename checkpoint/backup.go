package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
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
	// RAMFixed: RAMImage is a standby QEMU's guest RAM (its memory
	// backend's file, or its memfd through /proc): it is never created or
	// resized, and a primary announcing another size is refused.
	RAMFixed bool
	// StateFile holds the device state of the last committed epoch.
	StateFile string
	Heartbeat failover.DetectorConfig
	// Disk, when set, receives the guest's disk writes: those of the
	// initial copy at once, an epoch's held until it commits
	// (diskmirror.Journal).
	Disk DiskJournal
	// Fence, when set, fences the primary's host (given as host:port)
	// before the guest is resumed after the primary went silent; an error
	// means it may be alive, and the guest is not resumed (the fence is
	// tried again).
	Fence func(ctx context.Context, primary string) error
	// Claim, when set, claims the witness for this backup before the guest
	// is resumed after the primary went silent (package witness): nil when
	// it holds it now; held when a live lease names the primary (it runs);
	// another error when the witness could not be reached. The guest is
	// resumed only after a claim succeeded (or, with Fence, a fence when
	// the witness cannot be reached).
	Claim func(ctx context.Context) (held bool, err error)
	// DiskSize is the size of the backup's disk image (0: none); a
	// primary that mirrors a disk of another size is refused.
	DiskSize uint64
	// StageMemory bounds the bytes of pages an epoch holds in memory while
	// it arrives; beyond it they go to StageFile and are applied from
	// there. 0: no bound (StageFile unused).
	StageMemory int64
	// StageFile is where pages beyond StageMemory wait for their epoch's
	// commit (default: beside StateFile).
	StageFile string
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
	// when the heartbeat timeout ran out; ClearedAt, when the witness was
	// claimed or the primary fenced (zero: neither was needed).
	LastHeard, DeclaredAt, ClearedAt time.Time
	// Cause is what was seen first (a closed connection, or silence).
	Cause error
}

func (e *PrimaryLost) Error() string {
	return fmt.Sprintf("checkpoint: primary lost after epoch %d (silent %v): %v",
		e.Committed.Epoch, e.DeclaredAt.Sub(e.LastHeard).Round(time.Millisecond), e.Cause)
}

// Is makes a *PrimaryLost match ErrPeerLost.
func (e *PrimaryLost) Is(target error) bool { return target == ErrPeerLost }

// Backup is the backup's driver: it feeds a Standby the primary's
// connections and frames and carries out its decisions. It stages an epoch
// until it arrived whole and verified, applies it to the RAM image and the
// device state file, and resumes the guest only when the Standby says so.
type Backup struct {
	cfg BackupConfig
	log *slog.Logger
	sb  *Standby

	ram     []byte
	ramSize uint64

	conns  map[ConnID]*backupConn
	nextID ConnID
	stage  *transport.Stage
	staged transport.Epoch // the epoch the stage completed, until applied
	spill  *spill          // pages of the staged epoch beyond StageMemory
	ended  error           // why the last session ended (Serve)
	lost   *PrimaryLost    // the Standby's failover decision

	// An epoch is applied beside the loop, which meanwhile sends
	// heartbeats; what arrives is held until it ends (the next epoch's
	// deltas need this one in the image), its frames counted as heard.
	applying  *Apply
	applyDone chan error
	// A fence runs beside the loop as an apply does.
	fencing     bool
	fenceDone   chan error
	claiming    bool
	claimDone   chan ClaimDone
	primaryAddr string // the session's primary, for the fence
	deferred    []backupEvent
}

// backupConn is one connection from a primary (or anyone).
type backupConn struct {
	id   ConnID
	link Link
	// session: the Standby answered its hello; its frames are the
	// session's.
	session  bool
	cancel   context.CancelFunc
	lastRecv *atomic.Int64 // Unix ns of the newest frame, set by its reader
}

// HelloTimeout bounds how long a new connection may take to send its hello;
// until then it is not a session and nothing it does counts.
const HelloTimeout = 5 * time.Second

// NewBackup prepares a backup. Nothing is created until a primary connects.
func NewBackup(cfg BackupConfig) (*Backup, error) {
	if cfg.RAMImage == "" || cfg.StateFile == "" || cfg.VMName == "" {
		return nil, errors.New("checkpoint: backup needs VMName, RAMImage and StateFile")
	}
	sb, err := NewStandby(StandbyConfig{VMName: cfg.VMName, DiskSize: cfg.DiskSize, Heartbeat: cfg.Heartbeat, Fence: cfg.Fence != nil, Witness: cfg.Claim != nil})
	if err != nil {
		return nil, err
	}
	cfg.Heartbeat = cfg.Heartbeat.WithDefaults()
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.StageFile == "" {
		cfg.StageFile = cfg.StateFile + ".staging"
	}
	return &Backup{cfg: cfg, sb: sb, conns: map[ConnID]*backupConn{}, applyDone: make(chan error, 1), fenceDone: make(chan error, 1), claimDone: make(chan ClaimDone, 1),
		spill: &spill{path: cfg.StageFile}, log: log.With("role", "backup")}, nil
}

// Committed is the newest checkpoint the backup may resume (Epoch 0: none).
func (b *Backup) Committed() Committed {
	return Committed{Epoch: b.sb.Committed(), RAMImage: b.cfg.RAMImage, StateFile: b.cfg.StateFile, RAMSize: b.ramSize}
}

// State is the Standby's state.
func (b *Backup) State() StandbyState { return b.sb.State() }

// Close unmaps the RAM image and removes the staging file.
func (b *Backup) Close() error {
	err := b.spill.close()
	if b.ram != nil {
		err = errors.Join(err, unix.Munmap(b.ram))
		b.ram = nil
	}
	return err
}

// backupEvent is what a connection's reader hands the loop.
type backupEvent struct {
	at    time.Time // when it came off the connection
	id    ConnID
	link  Link // set on a connection's first event
	f     transport.Frame
	err   error
	hello bool // f is the connection's first frame
}

// Serve runs one connection's session with a primary: it returns a
// *PrimaryLost (matching ErrPeerLost) when the Standby decides to fail over
// (the caller then resumes Committed()), the reason when the session ends
// otherwise (a goodbye, a rejected epoch), or ctx's error.
func (b *Backup) Serve(ctx context.Context, link Link) error {
	conns := make(chan Link, 1)
	conns <- link
	return b.loop(ctx, conns, nil, true)
}

// Run serves the primaries that connect through conns (authenticated
// already, where a key is set) until ctx ends. Any number may connect at
// once; only a connection whose hello the Standby accepts is a session.
// When the Standby decides to fail over, Run calls failOver (in its own
// goroutine) and then goes on refusing primaries until ctx ends: a primary
// agent that comes back after the failover is told the guest runs here.
func (b *Backup) Run(ctx context.Context, conns <-chan Link, failOver func(context.Context, *PrimaryLost) error) error {
	return b.loop(ctx, conns, failOver, false)
}

func (b *Backup) loop(ctx context.Context, conns <-chan Link, failOver func(context.Context, *PrimaryLost) error, single bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer func() {
		if b.applying != nil {
			<-b.applyDone // never leave an apply running
			b.applying = nil
		}
		if b.fencing {
			<-b.fenceDone
			b.fencing = false
		}
		if b.claiming {
			<-b.claimDone
			b.claiming = false
		}
		for _, c := range b.conns {
			b.closeConn(ctx, c, "the backup stops")
		}
		b.discard()
	}()
	events := make(chan backupEvent, 64)
	tick := time.NewTicker(b.cfg.Heartbeat.Interval / 4)
	defer tick.Stop()
	hadSession := false
	for {
		var acts []any
		select {
		case <-ctx.Done():
			return ctx.Err()
		case link, ok := <-conns:
			if !ok {
				conns = nil
				continue
			}
			b.nextID++
			c := &backupConn{id: b.nextID, link: link, lastRecv: new(atomic.Int64)}
			var cctx context.Context
			cctx, c.cancel = context.WithCancel(ctx)
			b.conns[c.id] = c
			go readConn(cctx, c, events)
			continue
		case now := <-tick.C:
			// Frames still queued count as heard when they came.
			var heard time.Time
			if c := b.conns[b.sb.Session()]; c != nil {
				if ns := c.lastRecv.Load(); ns != 0 {
					heard = time.Unix(0, ns)
				}
			}
			acts = b.sb.Step(Tick{Now: now, Heard: heard})
		case err := <-b.applyDone:
			a := b.applying
			b.applying = nil
			acts = b.sb.Step(Applied{Now: time.Now(), Conn: a.Conn, Epoch: a.Epoch, Err: err})
		case err := <-b.fenceDone:
			b.fencing = false
			if err == nil {
				b.log.Warn("fenced the primary's host", "primary", b.primaryAddr)
			}
			acts = b.sb.Step(FenceDone{Now: time.Now(), Err: err})
		case done := <-b.claimDone:
			b.claiming = false
			done.Now = time.Now()
			acts = b.sb.Step(done)
		case ev := <-events:
			if err := b.handle(ctx, ev); err != nil {
				return err
			}
		}
		if err := b.do(ctx, acts); err != nil {
			return err
		}
		if err := b.replay(ctx); err != nil {
			return err
		}
		if b.sb.Session() != 0 {
			hadSession = true
		}
		if b.lost != nil {
			if single || failOver == nil {
				return b.lost
			}
			if err := failOver(ctx, b.lost); err != nil {
				return err
			}
			b.lost = nil
		}
		if single && hadSession && b.sb.State() == Waiting {
			return b.ended
		}
	}
}

// handle takes one event from a connection: held while the backup is busy
// (an apply, a fence, a claim; its frame counted as heard), else turned
// into the Standby's events and carried out.
func (b *Backup) handle(ctx context.Context, ev backupEvent) error {
	if b.busy() || len(b.deferred) > 0 {
		if c := b.conns[ev.id]; c != nil && c.session && ev.err == nil {
			b.sb.Step(FrameHeard{Now: ev.at, Conn: ev.id})
		}
		b.deferred = append(b.deferred, ev)
		return b.replay(ctx)
	}
	if b.lost != nil {
		return nil
	}
	return b.do(ctx, b.event(ev))
}

// busy reports work under way beside the loop (an apply, a fence, a
// witness claim) that events from the connections wait for.
func (b *Backup) busy() bool { return b.applying != nil || b.fencing || b.claiming }

// replay takes what arrived while the backup was busy, once it is not.
func (b *Backup) replay(ctx context.Context) error {
	for !b.busy() && len(b.deferred) > 0 && b.lost == nil {
		ev := b.deferred[0]
		b.deferred = b.deferred[1:]
		if err := b.do(ctx, b.event(ev)); err != nil {
			return err
		}
	}
	return nil
}

// readConn reads a connection's frames into events; the first one must be
// a hello and come within HelloTimeout.
func readConn(ctx context.Context, c *backupConn, events chan<- backupEvent) {
	id, link := c.id, c.link
	hctx, cancel := context.WithTimeout(ctx, HelloTimeout)
	f, err := link.Recv(hctx)
	cancel()
	ev := backupEvent{at: time.Now(), id: id, link: link, f: f, err: err, hello: true}
	for {
		select {
		case events <- ev:
		case <-ctx.Done():
			return
		}
		if ev.err != nil {
			return
		}
		f, err := link.Recv(ctx)
		ev = backupEvent{at: time.Now(), id: id, f: f, err: err}
		if err == nil {
			c.lastRecv.Store(ev.at.UnixNano())
		}
	}
}

// event turns what a connection delivered into the Standby's events.
func (b *Backup) event(ev backupEvent) []any {
	c := b.conns[ev.id]
	if c == nil {
		return nil
	}
	now := ev.at
	if ev.hello {
		return b.helloIn(c, ev, now)
	}
	if ev.err != nil {
		var fe *transport.FrameError
		if errors.As(ev.err, &fe) && !errors.Is(ev.err, io.ErrUnexpectedEOF) {
			// The stream itself is damaged: the epoch in flight is
			// discarded and the primary told; no failure of the primary.
			return b.sb.Step(EpochRejected{Now: now, Conn: c.id, Epoch: fe.Epoch, Err: ev.err})
		}
		if !c.session {
			b.closeConn(context.Background(), c, "")
			return nil
		}
		return b.sb.Step(ConnClosed{Now: now, Conn: c.id, Err: ev.err})
	}
	if !c.session {
		return nil
	}
	acts := b.sb.Step(FrameHeard{Now: now, Conn: c.id})
	return append(acts, b.frame(c, ev.f, now)...)
}

func (b *Backup) helloIn(c *backupConn, ev backupEvent, now time.Time) []any {
	refuse := func(code transport.ErrorCode, err error) []any {
		b.log.Warn("refused a connection", "from", remoteAddr(c.link), "err", err)
		return []any{Reject{Conn: c.id, Code: code, Err: err}}
	}
	if ev.err != nil {
		b.log.Info("a connection closed before its hello", "from", remoteAddr(c.link), "err", ev.err)
		b.closeConn(context.Background(), c, "")
		return nil
	}
	m, err := transport.Decode(ev.f)
	if err != nil {
		return refuse(transport.CodeProtocol, fmt.Errorf("checkpoint: primary's hello: %w", err))
	}
	h, ok := m.(transport.Hello)
	switch {
	case !ok && ev.f.Type == transport.TypeAuth:
		return refuse(transport.CodeMismatch, fmt.Errorf("%w: %w: the primary authenticates and this backup has no key (give both the same --key-file)", ErrPeerRejected, transport.ErrAuth))
	case !ok:
		return refuse(transport.CodeProtocol, fmt.Errorf("%w: primary sent %s before its hello", ErrPeerRejected, ev.f.Type))
	}
	if b.sb.State() != FailedOver && h.Role == transport.RolePrimary && h.VMName == b.cfg.VMName {
		if err := b.mapRAM(h.RAMSize); err != nil {
			return refuse(transport.CodeMismatch, err)
		}
	}
	return b.sb.Step(HelloIn{Now: now, Conn: c.id, Hello: h})
}

// frame handles one frame of the session.
func (b *Backup) frame(c *backupConn, f transport.Frame, now time.Time) []any {
	rejected := func(err error) []any {
		return b.sb.Step(EpochRejected{Now: now, Conn: c.id, Epoch: f.Epoch, Err: err})
	}
	if f.Epoch == 0 && (f.Type == transport.TypeRAMPages || f.Type == transport.TypeRAMDelta) {
		if err := b.livePages(f); err != nil {
			return rejected(err)
		}
		return nil
	}
	switch f.Type {
	case transport.TypeHeartbeat:
		return nil
	case transport.TypeError:
		m, err := transport.Decode(f)
		if err != nil {
			return rejected(err)
		}
		e := m.(transport.Error)
		// A primary that reports an error ends the session alive: its
		// guest runs on, so it counts as a goodbye, unless it hands over.
		return b.sb.Step(GoodbyeIn{Now: now, Conn: c.id, TakeOver: e.Code == transport.CodeTakeOver, Reason: fmt.Sprintf("%s: %s", e.Code, e.Message)})
	case transport.TypeDiskWrite:
		if err := b.diskWrite(f); err != nil {
			return rejected(err)
		}
		return nil
	case transport.TypeRAMDelta:
		// The Commit's digest covers the expanded pages.
		pages, err := b.decodePages(f)
		if err == nil {
			err = b.stage.AddPages(f.Epoch, pages)
		}
		if err == nil {
			err = b.boundStage()
		}
		if err != nil {
			return rejected(err)
		}
		return nil
	}
	ep, done, err := b.stage.Add(f)
	if err == nil && !done {
		err = b.boundStage()
	}
	if err != nil {
		return rejected(err)
	}
	if !done {
		return nil
	}
	b.staged = ep
	return b.sb.Step(EpochStaged{Now: now, Conn: c.id, Epoch: ep.Number})
}

// boundStage moves the staged epoch's pages to the staging file once they
// take more than StageMemory.
func (b *Backup) boundStage() error {
	if b.cfg.StageMemory <= 0 || int64(b.stage.StagedPages())*transport.PageSize < b.cfg.StageMemory {
		return nil
	}
	return b.spill.write(b.stage.TakePages())
}

// do carries out the Standby's actions, feeding back what they report.
func (b *Backup) do(ctx context.Context, acts []any) error {
	for len(acts) > 0 {
		a := acts[0]
		acts = acts[1:]
		switch a := a.(type) {
		case SendHello:
			c := b.conns[a.Conn]
			stage, err := transport.NewStage(b.ramSize, 0)
			if err != nil {
				return err
			}
			b.stage = stage
			if err := b.spill.reset(); err != nil {
				return fmt.Errorf("checkpoint: empty the staging file: %w", err)
			}
			c.session = true
			if err := b.send(ctx, c, 0, transport.Hello{Version: transport.Version, Role: transport.RoleBackup,
				VMName: b.cfg.VMName, RAMSize: b.ramSize, DiskSize: b.cfg.DiskSize, PageSize: transport.PageSize}); err != nil {
				acts = append(acts, b.sb.Step(ConnClosed{Now: time.Now(), Conn: c.id, Err: err})...)
				continue
			}
			b.primaryAddr = remoteAddr(c.link)
			b.log.Info("primary connected", "from", b.primaryAddr, "ram_bytes", b.ramSize)
		case Reject:
			if c := b.conns[a.Conn]; c != nil {
				if c.session {
					b.ended = a.Err
					b.log.Error("session with the primary ended; nothing is resumable until a new session commits", "err", a.Err)
				}
				b.sendError(ctx, c, a.Epoch, a.Code, a.Err.Error())
				b.closeConn(ctx, c, a.Err.Error())
			}
		case CloseConn:
			if c := b.conns[a.Conn]; c != nil {
				b.closeConn(ctx, c, a.Reason)
			}
		case Discard:
			b.discard()
		case Apply:
			ep := b.staged
			b.staged = transport.Epoch{}
			b.applying = &a
			go func() { b.applyDone <- b.apply(ep) }()
		case SendAck:
			if c := b.conns[a.Conn]; c != nil {
				if err := b.send(ctx, c, a.Epoch, transport.Ack{}); err != nil {
					acts = append(acts, b.sb.Step(ConnClosed{Now: time.Now(), Conn: c.id, Err: err})...)
				}
			}
		case SendHeartbeat:
			if c := b.conns[a.Conn]; c != nil {
				// A heartbeat that cannot leave shows as the
				// connection's read error soon enough.
				b.send(ctx, c, 0, transport.Heartbeat{SentUnixNano: time.Now().UnixNano(), LastCommitted: a.Committed})
			}
		case SendGoodbye:
			if c := b.conns[a.Conn]; c != nil {
				b.ended = fmt.Errorf("%w: the primary said goodbye", ErrPeerRejected)
				b.sendError(ctx, c, 0, transport.CodeGoodbye, a.Reason)
			}
		case Note:
			if a.Err != nil {
				b.log.Warn(a.Msg, "err", a.Err)
			} else {
				b.log.Info(a.Msg)
			}
		case Fence:
			if b.cfg.Fence == nil {
				return errors.New("checkpoint: the Standby asked for a fence and none is configured")
			}
			b.fencing = true
			b.log.Warn("primary lost: fencing its host before resuming the guest", "primary", b.primaryAddr, "committed_epoch", a.Epoch, "cause", a.Cause)
			go func(primary string) { b.fenceDone <- b.cfg.Fence(ctx, primary) }(b.primaryAddr)
		case Claim:
			if b.cfg.Claim == nil {
				return errors.New("checkpoint: the Standby asked for a witness claim and none is configured")
			}
			b.claiming = true
			if !a.Retry {
				b.log.Warn("primary lost: claiming the witness before resuming the guest", "committed_epoch", a.Epoch)
			}
			go func() {
				held, err := b.cfg.Claim(ctx)
				b.claimDone <- ClaimDone{Held: held, Err: err}
			}()
		case FailOver:
			b.lost = &PrimaryLost{Committed: b.Committed(), LastHeard: a.LastHeard, DeclaredAt: a.Declared, ClearedAt: a.Cleared, Cause: a.Cause}
		}
	}
	return nil
}

func (b *Backup) send(ctx context.Context, c *backupConn, epoch uint64, m transport.Message) error {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Heartbeat.Timeout)
	defer cancel()
	return sendMessage(ctx, c.link, epoch, m)
}

func (b *Backup) sendError(ctx context.Context, c *backupConn, epoch uint64, code transport.ErrorCode, msg string) {
	if len(msg) > transport.MaxErrorMessage {
		msg = msg[:transport.MaxErrorMessage]
	}
	b.send(ctx, c, epoch, transport.Error{Code: code, Message: msg})
}

// closeConn ends a connection: it half-closes so that the peer reads the
// last frame (an Error) before the end, then closes, without holding up the
// loop.
func (b *Backup) closeConn(ctx context.Context, c *backupConn, reason string) {
	delete(b.conns, c.id)
	c.cancel()
	go func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		if s, ok := c.link.(interface{ Shutdown(context.Context) error }); ok {
			s.Shutdown(sctx)
			return
		}
		c.link.Close()
	}()
}

func remoteAddr(l Link) string {
	if a, ok := l.(interface{ RemoteAddr() net.Addr }); ok && a.RemoteAddr() != nil {
		return a.RemoteAddr().String()
	}
	return "?"
}

// diskWrite takes a DiskWrite frame: applied at once in epoch 0 (the
// initial copy), else staged with its epoch and held in the journal.
func (b *Backup) diskWrite(f transport.Frame) error {
	m, err := transport.Decode(f)
	if err != nil {
		return err
	}
	w := m.(transport.DiskWrite)
	if b.cfg.Disk == nil {
		return fmt.Errorf("%w: the primary mirrors a disk; this backup has no disk image", ErrPeerRejected)
	}
	if f.Epoch == 0 {
		if _, staging := b.stage.Staging(); staging || b.stage.Committed() > 0 {
			return errors.New("a write of the initial disk copy after the first epoch began")
		}
		return b.cfg.Disk.Direct(w)
	}
	if err := b.stage.AddDiskWrite(f.Epoch, w); err != nil {
		return err
	}
	return b.cfg.Disk.Add(w)
}

// livePages takes pages of the primary's live first sync (epoch 0): they go
// into the RAM image at once. Nothing of the session is resumable before
// its first epoch commits (the Standby counts nothing committed since the
// hello), and that epoch carries every page written after these were read.
func (b *Backup) livePages(f transport.Frame) error {
	if _, staging := b.stage.Staging(); staging || b.stage.Committed() > 0 {
		return errors.New("checkpoint: a page of the live first sync after the first epoch began")
	}
	pages, err := b.decodePages(f)
	if err != nil {
		return err
	}
	for _, pg := range pages.Pages {
		dst := b.basePage(pg.Index)
		if dst == nil {
			return fmt.Errorf("%w: live sync page %d beyond the %d bytes of RAM", transport.ErrMalformed, pg.Index, len(b.ram))
		}
		copy(dst, pg.Data)
	}
	return nil
}

// decodePages decodes a RAMPages or RAMDelta frame into its pages. A
// RAMDelta's XORed pages are against the image, which holds the version the
// primary sent last (epochs commit in order; the live sync's pages are
// written at once).
func (b *Backup) decodePages(f transport.Frame) (transport.RAMPages, error) {
	m, err := transport.Decode(f)
	if err != nil {
		return transport.RAMPages{}, err
	}
	switch m := m.(type) {
	case transport.RAMPages:
		return m, nil
	case transport.RAMDelta:
		return m.Expand(b.basePage)
	}
	return transport.RAMPages{}, fmt.Errorf("%w: a %s frame does not carry pages", transport.ErrMalformed, f.Type)
}

// basePage returns the image's version of a page, nil beyond RAM.
func (b *Backup) basePage(idx uint64) []byte {
	off := idx * transport.PageSize
	if idx > transport.MaxPageIndex || off+transport.PageSize > uint64(len(b.ram)) {
		return nil
	}
	return b.ram[off : off+transport.PageSize]
}

// discard drops whatever is staged of an epoch not committed.
func (b *Backup) discard() {
	if b.stage != nil {
		b.stage.Reset()
	}
	if err := b.spill.reset(); err != nil {
		b.log.Warn("empty the staging file", "err", err)
	}
	b.staged = transport.Epoch{}
	if b.cfg.Disk != nil {
		b.cfg.Disk.Discard()
	}
}

// mapRAM creates (or reuses) the RAM image and maps it.
func (b *Backup) mapRAM(size uint64) error {
	if b.ram != nil {
		if b.ramSize == size {
			return nil
		}
		return fmt.Errorf("%w: primary announced %d bytes of RAM; this backup holds %d", ErrPeerRejected, size, b.ramSize)
	}
	flags := os.O_RDWR | os.O_CREATE
	if b.cfg.RAMFixed {
		flags = os.O_RDWR
	}
	f, err := os.OpenFile(b.cfg.RAMImage, flags, 0o600)
	if err != nil {
		return fmt.Errorf("checkpoint: RAM image: %w", err)
	}
	defer f.Close()
	if b.cfg.RAMFixed {
		st, err := f.Stat()
		if err != nil {
			return fmt.Errorf("checkpoint: RAM image %s: %w", b.cfg.RAMImage, err)
		}
		if uint64(st.Size()) != size {
			return fmt.Errorf("%w: primary announced %d bytes of RAM; the standby QEMU here has %d", ErrPeerRejected, size, st.Size())
		}
	} else if err := f.Truncate(int64(size)); err != nil {
		return fmt.Errorf("checkpoint: size RAM image %s: %w", b.cfg.RAMImage, err)
	}
	ram, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("checkpoint: map RAM image %s: %w", b.cfg.RAMImage, err)
	}
	b.ram, b.ramSize = ram, size
	return nil
}

// apply writes a verified epoch into the image: the disk first, then RAM,
// then the device state. It runs to completion before the Standby decides
// anything else (one goroutine does both), and the Standby counts nothing
// resumable while it runs or when it fails.
func (b *Backup) apply(ep transport.Epoch) error {
	if b.cfg.Disk != nil {
		if err := b.cfg.Disk.Commit(); err != nil {
			return fmt.Errorf("checkpoint: epoch %d: disk: %w", ep.Number, err)
		}
	}
	// Pages that went to the staging file arrived first.
	if err := b.spill.apply(b.ram); err != nil {
		return fmt.Errorf("checkpoint: epoch %d: %w", ep.Number, err)
	}
	if err := b.spill.reset(); err != nil {
		return fmt.Errorf("checkpoint: epoch %d: empty the staging file: %w", ep.Number, err)
	}
	for _, pg := range ep.Pages {
		off := pg.Index * transport.PageSize
		copy(b.ram[off:off+transport.PageSize], pg.Data)
	}
	if err := (failover.StateFile{Path: b.cfg.StateFile}).Save(ep.DeviceState); err != nil {
		return fmt.Errorf("checkpoint: epoch %d: %w", ep.Number, err)
	}
	if b.cfg.OnCommit != nil {
		b.cfg.OnCommit(ep.Number, len(ep.Pages))
	}
	return nil
}

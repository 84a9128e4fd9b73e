package netbuffer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// FramePort is one side of a Relay that moves whole Ethernet frames: a Tap,
// or a StreamPort over a socket in the -netdev stream format (a test's fake
// network, or later a second relay). ReadFrame and WriteFrame are each
// called from one goroutine at a time, possibly concurrently with each
// other; Close must unblock both.
type FramePort interface {
	// ReadFrame reads one frame into buf, which holds MaxFrameSize bytes,
	// and returns its length.
	ReadFrame(buf []byte) (int, error)
	// WriteFrame sends one frame. An error wrapping ErrFrameRejected drops
	// that frame only; any other error is fatal to the Relay.
	WriteFrame(frame []byte) error
	// Close releases the port and unblocks pending calls.
	Close() error
}

// StreamPort is a FramePort over a connection that speaks the stream format
// (see WriteFrame and FrameReader). Reads must come from one goroutine at a
// time; WriteFrame is safe for concurrent use.
type StreamPort struct {
	conn net.Conn
	fr   *FrameReader

	wmu  sync.Mutex
	wbuf []byte
}

// NewStreamPort returns a StreamPort reading and writing conn. Closing the
// port closes conn.
func NewStreamPort(conn net.Conn) *StreamPort {
	return &StreamPort{conn: conn, fr: NewFrameReader(conn)}
}

// ReadFrame reads one frame into buf; see FrameReader.ReadFrameInto.
func (p *StreamPort) ReadFrame(buf []byte) (int, error) { return p.fr.ReadFrameInto(buf) }

// WriteFrame writes one frame, prefix and frame in a single Write.
func (p *StreamPort) WriteFrame(frame []byte) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	b, err := AppendFrame(p.wbuf[:0], frame)
	if err != nil {
		return err
	}
	p.wbuf = b
	_, err = p.conn.Write(b)
	return err
}

// Close closes the connection.
func (p *StreamPort) Close() error { return p.conn.Close() }

// Direction is a direction of traffic through a Relay.
type Direction int

const (
	// Outbound is from the guest to the host side: the traffic that output
	// commit will hold back until its epoch is acknowledged.
	Outbound Direction = iota
	// Inbound is from the host side to the guest.
	Inbound
)

// String returns "outbound (guest to host)" or "inbound (host to guest)".
func (d Direction) String() string {
	switch d {
	case Outbound:
		return "outbound (guest to host)"
	case Inbound:
		return "inbound (host to guest)"
	}
	return fmt.Sprintf("Direction(%d)", int(d))
}

// Side is one of the two ends of a Relay.
type Side int

const (
	// SideGuest is the guest's connection (QEMU's -netdev stream).
	SideGuest Side = iota
	// SideHost is the host-side FramePort.
	SideHost
)

// String returns "guest" or "host".
func (s Side) String() string {
	switch s {
	case SideGuest:
		return "guest"
	case SideHost:
		return "host"
	}
	return fmt.Sprintf("Side(%d)", int(s))
}

// ErrGuestDisconnected reports that the guest's connection went away: QEMU
// closed it or exited.
var ErrGuestDisconnected = errors.New("netbuffer: guest disconnected")

// RelayError is the error that ends a Relay's Run when one of its sides
// fails: which direction was being copied, which side's read or write
// failed, and why. When the guest went away it also matches
// ErrGuestDisconnected.
type RelayError struct {
	Dir  Direction
	Side Side
	// Op is "read" or "write".
	Op string
	// GuestDisconnected is set when the failure means the guest closed its
	// connection (end of stream, reset, broken pipe).
	GuestDisconnected bool
	Err               error
}

// Error implements error, e.g. "netbuffer: relay outbound (guest to host):
// read from guest: guest disconnected: EOF".
func (e *RelayError) Error() string {
	prep := "from"
	if e.Op == "write" {
		prep = "to"
	}
	gone := ""
	if e.GuestDisconnected {
		gone = "guest disconnected: "
	}
	return fmt.Sprintf("netbuffer: relay %s: %s %s %s: %s%v", e.Dir, e.Op, prep, e.Side, gone, e.Err)
}

// Unwrap returns Err, and ErrGuestDisconnected when the guest went away.
func (e *RelayError) Unwrap() []error {
	if e.GuestDisconnected {
		return []error{ErrGuestDisconnected, e.Err}
	}
	return []error{e.Err}
}

// isDisconnect reports whether err from the guest's connection means that
// the other end went away.
func isDisconnect(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// FlowStats counts the frames of one direction.
type FlowStats struct {
	// Frames and Bytes count frames delivered and their lengths (Ethernet
	// frames, without the stream format's length prefix).
	Frames, Bytes uint64
	// Dropped counts frames the receiving side rejected (ErrFrameRejected).
	Dropped uint64
}

// Stats counts a Relay's traffic in both directions.
type Stats struct {
	Outbound, Inbound FlowStats
}

type flowCounters struct {
	frames, bytes, dropped atomic.Uint64
}

func (c *flowCounters) snapshot() FlowStats {
	return FlowStats{Frames: c.frames.Load(), Bytes: c.bytes.Load(), Dropped: c.dropped.Load()}
}

// Relay copies Ethernet frames between the guest's connection (QEMU's
// -netdev stream socket) and a host-side FramePort. Inbound frames (host to
// guest) pass at once. Outbound frames (guest to host) pass at once in
// PassThrough mode; in Holding mode each is held until the epoch during
// which the guest sent it is committed (Hold, Cut, Commit; see the package
// documentation for how the epoch boundaries are kept exact).
type Relay struct {
	guest     net.Conn
	guestRaw  syscall.RawConn // for the bytes still in the socket at a cut
	guestPort *StreamPort
	host      FramePort
	log       *slog.Logger
	now       func() time.Time

	started atomic.Bool
	flows   [2]flowCounters // indexed by Direction

	cuts chan cutRequest // to the outbound reader

	mu       sync.Mutex
	wake     *sync.Cond // queue changed, a cut was asked for, or the relay stopped
	q        outQueue
	stopped  bool
	pressure backpressure
}

// cutRequest asks the outbound reader to close an epoch.
type cutRequest struct {
	epoch uint64
	done  chan error
}

// backpressure counts the times the Relay stopped reading from the guest
// because it held its cap of bytes.
type backpressure struct {
	episodes uint64
	total    time.Duration
	since    time.Time // zero unless the guest is being held back now
}

// Option configures a Relay.
type Option func(*Relay)

// WithHoldCap bounds the bytes of outbound frames the Relay holds for
// commits (default DefaultHoldCap). At the cap it stops reading from the
// guest, which then waits (its socket fills, QEMU queues and the virtio
// queue backs up) instead of anything being dropped.
func WithHoldCap(bytes int64) Option { return func(r *Relay) { r.q.cap = bytes } }

// WithClock sets the clock that timestamps held frames (default time.Now).
func WithClock(now func() time.Time) Option { return func(r *Relay) { r.now = now } }

// NewRelay returns a Relay between guest, a connection speaking the stream
// format, and host. It starts in PassThrough mode. The Relay owns both
// sides: Run closes them when it returns. A nil logger discards the logs.
// Cut needs guest to be a socket (a syscall.Conn, as unix and TCP
// connections are).
func NewRelay(guest net.Conn, host FramePort, log *slog.Logger, opts ...Option) *Relay {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Relay{guest: guest, guestPort: NewStreamPort(guest), host: host, log: log, now: time.Now,
		cuts: make(chan cutRequest, 1)}
	r.q.cap = DefaultHoldCap
	r.wake = sync.NewCond(&r.mu)
	if sc, ok := guest.(syscall.Conn); ok {
		r.guestRaw, _ = sc.SyscallConn()
	}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Stats returns the counts so far. It is safe to call at any time, also
// while Run runs.
func (r *Relay) Stats() Stats {
	return Stats{Outbound: r.flows[Outbound].snapshot(), Inbound: r.flows[Inbound].snapshot()}
}

// Status is a Relay's state for operators.
type Status struct {
	Mode Mode
	// HeldFrames and HeldBytes are waiting for a commit now; PeakBytes is
	// the most the Relay ever queued (held or about to be written).
	HeldFrames int
	HeldBytes  int64
	PeakBytes  int64
	Cap        int64
	// Backpressure counts the times the Relay stopped reading from the
	// guest at the cap, and for how long in all; BackpressureNow is set
	// while it does.
	Backpressure      uint64
	BackpressureTotal time.Duration
	BackpressureNow   bool
}

// Status returns the Relay's mode and buffer figures.
func (r *Relay) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	frames, bytes := r.q.held()
	st := Status{Mode: r.q.mode, HeldFrames: frames, HeldBytes: bytes, PeakBytes: r.q.peak, Cap: r.q.cap,
		Backpressure: r.pressure.episodes, BackpressureTotal: r.pressure.total, BackpressureNow: !r.pressure.since.IsZero()}
	if st.BackpressureNow {
		st.BackpressureTotal += r.now().Sub(r.pressure.since)
	}
	return st
}

// Hold switches to Holding: outbound frames read from now on wait for the
// commit of their epoch. The first Cut after Hold closes the first epoch.
func (r *Relay) Hold() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.q.mode != Holding {
		r.q.hold()
		r.log.Info("holding the guest's output until each epoch commits")
	}
}

// PassThrough releases every held frame, in order, and switches to
// PassThrough mode: the guest's output is no longer protected.
func (r *Relay) PassThrough() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.q.mode == PassThrough {
		return
	}
	n := r.q.passThrough()
	r.wake.Broadcast()
	r.log.Warn("output passes straight through: the guest is not protected", "released_uncommitted_frames", n)
}

// Cut closes epoch: every outbound frame the guest sent before now belongs
// to it. Call it while the guest is paused (after QMP stop returned, before
// cont), with epochs increasing. It waits until the frames already in the
// guest's socket have been read, so that they go with this epoch and not
// the next; see the package documentation. In PassThrough mode, and once
// the Relay stopped, it does nothing.
func (r *Relay) Cut(ctx context.Context, epoch uint64) error {
	r.mu.Lock()
	if r.stopped || r.q.mode != Holding {
		r.mu.Unlock()
		return nil
	}
	r.mu.Unlock()
	req := cutRequest{epoch: epoch, done: make(chan error, 1)}
	select {
	case r.cuts <- req:
	case <-ctx.Done():
		return fmt.Errorf("netbuffer: cut epoch %d: %w", epoch, ctx.Err())
	}
	// Wake the reader: out of a Read (the deadline) or out of a wait at the
	// cap (the condition variable).
	r.guest.SetReadDeadline(time.Unix(1, 0))
	r.mu.Lock()
	r.wake.Broadcast()
	r.mu.Unlock()
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("netbuffer: cut epoch %d: %w", epoch, ctx.Err())
	}
}

// Commit releases the frames of every epoch up to and including epoch, in
// the order the guest sent them, and reports them. It does not wait for
// them to be written.
func (r *Relay) Commit(epoch uint64) Release {
	r.mu.Lock()
	defer r.mu.Unlock()
	rel := r.q.commit(epoch, r.now())
	if rel.Frames > 0 {
		r.wake.Broadcast()
	}
	return rel
}

// Run copies frames both ways until ctx is done or a side fails, then
// closes both sides and returns once both copies have stopped. When a side
// fails it returns a *RelayError naming the direction, the side and the
// operation (matching ErrGuestDisconnected when the guest went away);
// when ctx ends first it returns ctx.Err(). Run may be called once.
func (r *Relay) Run(ctx context.Context) error {
	if !r.started.CompareAndSwap(false, true) {
		return errors.New("netbuffer: Relay.Run called more than once")
	}
	r.log.Info("relay started", "guest", r.guest.LocalAddr().String())
	errc := make(chan error, 3)
	go func() { errc <- r.readGuest() }()
	go func() { errc <- r.writeHost() }()
	go func() { errc <- r.copyInbound() }()

	var err error
	pending := 3
	select {
	case <-ctx.Done():
		err = ctx.Err()
	case err = <-errc:
		pending--
	}
	// Closing both sides unblocks the other copies; what they return then
	// is a consequence of the close, not news.
	r.mu.Lock()
	r.stopped = true
	r.wake.Broadcast()
	r.mu.Unlock()
	r.guestPort.Close()
	r.host.Close()
	for ; pending > 0; pending-- {
		<-errc
	}
	// A Cut waiting for the reader gets its answer.
	select {
	case req := <-r.cuts:
		req.done <- nil
	default:
	}
	s := r.Stats()
	r.log.Info("relay stopped",
		"outbound_frames", s.Outbound.Frames, "outbound_bytes", s.Outbound.Bytes, "outbound_dropped", s.Outbound.Dropped,
		"inbound_frames", s.Inbound.Frames, "inbound_bytes", s.Inbound.Bytes, "inbound_dropped", s.Inbound.Dropped)
	return err
}

// readGuest reads the guest's outbound frames into the queue, serving cuts
// between reads.
func (r *Relay) readGuest() error {
	sp := &frameSplitter{}
	buf := make([]byte, 64<<10)
	for {
		if err := r.waitRoom(sp); err != nil {
			return err
		}
		n, err := r.guest.Read(buf)
		if n > 0 {
			if ferr := r.enqueue(sp, buf[:n]); ferr != nil {
				return r.fail(Outbound, SideGuest, "read", ferr)
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// Woken for a cut (served at the top of the loop), or
				// the wake-up of a cut that was already served.
				r.guest.SetReadDeadline(time.Time{})
				continue
			}
			if isDisconnect(err) && sp.partial() {
				err = io.ErrUnexpectedEOF
			}
			return r.fail(Outbound, SideGuest, "read", err)
		}
	}
}

// waitRoom serves pending cuts and waits while the queue holds its cap.
func (r *Relay) waitRoom(sp *frameSplitter) error {
	for {
		select {
		case req := <-r.cuts:
			req.done <- r.serveCut(sp, req.epoch)
			continue
		default:
		}
		r.mu.Lock()
		if r.stopped {
			r.mu.Unlock()
			return errStopped
		}
		if !r.q.full() {
			if !r.pressure.since.IsZero() {
				d := r.now().Sub(r.pressure.since)
				r.pressure.total += d
				r.pressure.since = time.Time{}
				r.log.Info("reading from the guest again", "held_back_for", d)
			}
			r.mu.Unlock()
			return nil
		}
		if r.pressure.since.IsZero() {
			r.pressure.since = r.now()
			r.pressure.episodes++
			r.log.Warn("holding the cap of outbound bytes: the guest waits until an epoch commits", "cap", r.q.cap)
		}
		r.wake.Wait()
		r.mu.Unlock()
	}
}

// errStopped ends the reader and the writer when Run stops the Relay.
var errStopped = errors.New("netbuffer: relay stopped")

// enqueue feeds bytes read from the guest to the splitter and queues the
// frames it completes.
func (r *Relay) enqueue(sp *frameSplitter, p []byte) error {
	sp.feed(p)
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	added := false
	for {
		f, err := sp.next()
		if err != nil {
			return err
		}
		if f == nil {
			break
		}
		r.q.add(f, now)
		added = true
	}
	if added {
		r.wake.Broadcast()
	}
	return nil
}

// cutDrainTimeout bounds the wait for the rest of a frame that was partly
// in the guest's socket at a cut. QEMU writes a frame whole unless the
// socket is full, and then finishes it from its main loop, paused guest or
// not, so the rest comes at once.
const cutDrainTimeout = time.Second

// serveCut reads what is in the guest's socket now, and the rest of a frame
// begun, then closes epoch. Frames still in QEMU's own queue are read
// after the cut and go with the next epoch: later, never earlier.
func (r *Relay) serveCut(sp *frameSplitter, epoch uint64) error {
	buf := make([]byte, 64<<10)
	until := time.Now().Add(cutDrainTimeout)
	for {
		pending, err := r.inSocket()
		if err != nil {
			return fmt.Errorf("netbuffer: cut epoch %d: %w", epoch, err)
		}
		if pending == 0 && !sp.partial() {
			break
		}
		r.guest.SetReadDeadline(until)
		n, err := r.guest.Read(buf)
		if n > 0 {
			if ferr := r.enqueue(sp, buf[:n]); ferr != nil {
				return fmt.Errorf("netbuffer: cut epoch %d: %w", epoch, ferr)
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if time.Now().Before(until) {
					continue // Cut's own wake-up, set after this cut began
				}
				r.log.Warn("cut: a frame from the guest stayed incomplete; it goes with the next epoch", "epoch", epoch)
				break
			}
			// The reader's next Read reports the failure.
			break
		}
	}
	r.guest.SetReadDeadline(time.Time{})
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.q.closeEpoch(epoch)
}

// inSocket returns the bytes waiting in the guest socket's receive queue.
func (r *Relay) inSocket() (int, error) {
	if r.guestRaw == nil {
		return 0, errors.New("the guest connection is not a socket: cannot see what is in flight")
	}
	var n int
	var ierr error
	if err := r.guestRaw.Control(func(fd uintptr) {
		n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	}); err != nil {
		return 0, err
	}
	if ierr != nil {
		return 0, fmt.Errorf("SIOCINQ: %w", ierr)
	}
	return n, nil
}

// writeHost writes released outbound frames to the host side, in order.
func (r *Relay) writeHost() error {
	for {
		r.mu.Lock()
		for len(r.q.ready) == 0 && !r.stopped {
			r.wake.Wait()
		}
		if r.stopped {
			r.mu.Unlock()
			return errStopped
		}
		batch := r.q.take()
		r.mu.Unlock()
		for i, f := range batch {
			if err := r.deliver(Outbound, r.host, f.data); err != nil {
				var rest int64
				for _, g := range batch[i:] {
					rest += int64(len(g.data))
				}
				r.mu.Lock()
				r.q.written(rest)
				r.mu.Unlock()
				return err
			}
			r.mu.Lock()
			r.q.written(int64(len(f.data)))
			if !r.q.full() {
				r.wake.Broadcast()
			}
			r.mu.Unlock()
		}
	}
}

// copyInbound moves frames from the host side to the guest until one of
// them fails.
func (r *Relay) copyInbound() error {
	buf := make([]byte, MaxFrameSize)
	for {
		n, err := r.host.ReadFrame(buf)
		if err != nil {
			return r.fail(Inbound, SideHost, "read", err)
		}
		if err := r.deliver(Inbound, r.guestPort, buf[:n]); err != nil {
			return err
		}
	}
}

// deliver writes one frame of dir to dst and counts it. A frame dst refuses
// by itself (ErrFrameRejected) is dropped and counted; any other failure
// is returned as the Relay's error.
func (r *Relay) deliver(dir Direction, dst FramePort, frame []byte) error {
	c := &r.flows[dir]
	err := dst.WriteFrame(frame)
	switch {
	case err == nil:
		c.frames.Add(1)
		c.bytes.Add(uint64(len(frame)))
	case errors.Is(err, ErrFrameRejected):
		c.dropped.Add(1)
		r.log.Debug("frame dropped", "direction", dir.String(), "len", len(frame), "err", err)
	default:
		dstSide := SideHost
		if dir == Inbound {
			dstSide = SideGuest
		}
		return r.fail(dir, dstSide, "write", err)
	}
	return nil
}

func (r *Relay) fail(dir Direction, side Side, op string, err error) error {
	return &RelayError{Dir: dir, Side: side, Op: op, GuestDisconnected: side == SideGuest && isDisconnect(err), Err: err}
}

// ListenUnix listens on the unix socket path for QEMU's
// `-netdev stream,server=off,addr.type=unix,addr.path=PATH` to connect to.
// A socket file left at path by an earlier run is replaced when nothing
// listens on it any more; any other file there is an error. The socket
// file is removed when the listener is closed.
func ListenUnix(path string) (*net.UnixListener, error) {
	addr := &net.UnixAddr{Name: path, Net: "unix"}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("netbuffer: listen on %s: a file that is not a socket is in the way", path)
		}
		c, err := net.DialUnix("unix", nil, addr)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("netbuffer: listen on %s: another process is listening there", path)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("netbuffer: listen on %s: probe existing socket: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("netbuffer: listen on %s: remove stale socket: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", addr)
	if err != nil {
		return nil, fmt.Errorf("netbuffer: %w", err)
	}
	return ln, nil
}

// AcceptGuest waits for the guest's QEMU to connect to ln and returns the
// connection. When ctx ends first it returns an error wrapping ctx.Err(),
// and ln stays usable if it supports deadlines (unix and TCP listeners do);
// any other listener is closed to unblock the accept.
func AcceptGuest(ctx context.Context, ln net.Listener) (net.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("netbuffer: accept guest on %s: %w", ln.Addr(), err)
	}
	dl, canDeadline := ln.(interface{ SetDeadline(time.Time) error })
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		if canDeadline {
			dl.SetDeadline(time.Unix(1, 0))
		} else {
			ln.Close()
		}
	})
	conn, err := ln.Accept()
	if !stop() {
		// ctx ended while accepting: the callback ran or is running.
		<-fired
		if canDeadline {
			dl.SetDeadline(time.Time{})
		}
		if conn != nil {
			conn.Close()
		}
		return nil, fmt.Errorf("netbuffer: accept guest on %s: %w", ln.Addr(), ctx.Err())
	}
	if err != nil {
		return nil, fmt.Errorf("netbuffer: accept guest on %s: %w", ln.Addr(), err)
	}
	return conn, nil
}

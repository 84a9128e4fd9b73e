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
// -netdev stream socket) and a host-side FramePort, one frame at a time and
// without holding any back yet.
type Relay struct {
	guest     net.Conn
	guestPort *StreamPort
	host      FramePort
	log       *slog.Logger

	started atomic.Bool
	flows   [2]flowCounters // indexed by Direction
}

// NewRelay returns a Relay between guest, a connection speaking the stream
// format, and host. The Relay owns both: Run closes them when it returns.
// A nil logger discards the logs.
func NewRelay(guest net.Conn, host FramePort, log *slog.Logger) *Relay {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Relay{guest: guest, guestPort: NewStreamPort(guest), host: host, log: log}
}

// Stats returns the counts so far. It is safe to call at any time, also
// while Run runs.
func (r *Relay) Stats() Stats {
	return Stats{Outbound: r.flows[Outbound].snapshot(), Inbound: r.flows[Inbound].snapshot()}
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
	errc := make(chan error, 2)
	go func() { errc <- r.copy(Outbound, r.guestPort, r.host) }()
	go func() { errc <- r.copy(Inbound, r.host, r.guestPort) }()

	var err error
	pending := 2
	select {
	case <-ctx.Done():
		err = ctx.Err()
	case err = <-errc:
		pending--
	}
	// Closing both sides unblocks the other copy; what it returns then is
	// a consequence of the close, not news.
	r.guestPort.Close()
	r.host.Close()
	for ; pending > 0; pending-- {
		<-errc
	}
	s := r.Stats()
	r.log.Info("relay stopped",
		"outbound_frames", s.Outbound.Frames, "outbound_bytes", s.Outbound.Bytes, "outbound_dropped", s.Outbound.Dropped,
		"inbound_frames", s.Inbound.Frames, "inbound_bytes", s.Inbound.Bytes, "inbound_dropped", s.Inbound.Dropped)
	return err
}

// copy moves frames from src to dst until one of them fails.
func (r *Relay) copy(dir Direction, src, dst FramePort) error {
	srcSide, dstSide := SideGuest, SideHost
	if dir == Inbound {
		srcSide, dstSide = SideHost, SideGuest
	}
	c := &r.flows[dir]
	buf := make([]byte, MaxFrameSize)
	for {
		n, err := src.ReadFrame(buf)
		if err != nil {
			return r.fail(dir, srcSide, "read", err)
		}
		if err := dst.WriteFrame(buf[:n]); err != nil {
			if errors.Is(err, ErrFrameRejected) {
				c.dropped.Add(1)
				r.log.Debug("frame dropped", "direction", dir.String(), "len", n, "err", err)
				continue
			}
			return r.fail(dir, dstSide, "write", err)
		}
		c.frames.Add(1)
		c.bytes.Add(uint64(n))
	}
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

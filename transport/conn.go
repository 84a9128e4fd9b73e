package transport

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Conn speaks the frame protocol over a net.Conn: Send numbers and writes
// frames, Recv reads and checks them. Send is safe for concurrent use, and
// so is Recv; one Send and one Recv may run at the same time. Conn owns the
// net.Conn's deadlines.
type Conn struct {
	nc net.Conn

	sendTurn chan struct{} // holds a token while a Send writes
	seq      uint64        // seq of the last frame sent whole
	sendErr  error         // set once a write stopped part-way through a frame
	scratch  frameScratch

	recvTurn chan struct{} // holds a token while a Recv reads
	r        *Reader

	// sendMAC and recvMAC are set by Authenticate; each is used only under
	// its turn. sendMAC keys this side's direction, recvMAC the peer's.
	sendMAC, recvMAC hash.Hash
	// authErr is set when Authenticate failed: Send and Recv refuse.
	authErr error

	closeOnce sync.Once
	closeErr  error
}

// NewConn returns a Conn over nc. The first frame sent in each direction has
// seq 1.
func NewConn(nc net.Conn) *Conn {
	return &Conn{
		nc:       nc,
		r:        NewReader(nc),
		sendTurn: make(chan struct{}, 1),
		recvTurn: make(chan struct{}, 1),
	}
}

// LocalAddr returns the local network address.
func (c *Conn) LocalAddr() net.Addr { return c.nc.LocalAddr() }

// RemoteAddr returns the peer's network address.
func (c *Conn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }

// Send assigns f the next sequence number and writes it. Concurrent Sends
// are serialized; ctx's deadline bounds the wait for the other Sends as
// well as the write, and cancelling ctx interrupts either. If the write
// fails before any byte of the frame went out, the sequence number is not
// used and the Conn stays usable; if it fails part-way through, the stream
// is broken and every later Send returns an error matching ErrBroken.
func (c *Conn) Send(ctx context.Context, f Frame) error {
	checked := f
	checked.Seq = 1 // assigned below
	if err := checked.check(); err != nil {
		return fmt.Errorf("transport: send %s: %w", f.Type, err)
	}
	if err := take(ctx, c.sendTurn); err != nil {
		return fmt.Errorf("transport: send %s (epoch %d): waiting for another Send: %w", f.Type, f.Epoch, err)
	}
	defer func() { <-c.sendTurn }()
	if c.authErr != nil {
		return fmt.Errorf("transport: send %s (epoch %d): %w", f.Type, f.Epoch, c.authErr)
	}
	f.Seq = c.seq + 1
	if c.sendMAC != nil {
		if len(f.Payload) > MaxMessage {
			return fmt.Errorf("transport: send %s (epoch %d): %w: payload of %d bytes leaves no room for the tag (max %d)",
				f.Type, f.Epoch, ErrTooLarge, len(f.Payload), MaxMessage)
		}
		f = c.seal(f)
	}
	if c.sendErr != nil {
		return fmt.Errorf("transport: send %s (epoch %d): %w", f.Type, f.Epoch, c.sendErr)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("transport: send seq %d (%s, epoch %d): %w", f.Seq, f.Type, f.Epoch, context.Cause(ctx))
	}
	stop := watchDeadline(ctx, c.nc.SetWriteDeadline)
	n, err := c.scratch.write(c.nc, f)
	stop()
	if err != nil {
		err = ctxError(ctx, err)
		if n > 0 {
			c.sendErr = fmt.Errorf("%w: frame seq %d (%s, epoch %d) stopped after %d of %d bytes: %w",
				ErrBroken, f.Seq, f.Type, f.Epoch, n, Overhead+len(f.Payload), err)
			return fmt.Errorf("transport: send: %w", c.sendErr)
		}
		return fmt.Errorf("transport: send seq %d (%s, epoch %d): %w", f.Seq, f.Type, f.Epoch, err)
	}
	c.seq = f.Seq
	return nil
}

// SendMessage sends m in a frame for epoch; see NewFrame and Send.
func (c *Conn) SendMessage(ctx context.Context, epoch uint64, m Message) error {
	f, err := NewFrame(epoch, m)
	if err != nil {
		return fmt.Errorf("transport: send %s: %w", m.Type(), err)
	}
	return c.Send(ctx, f)
}

// Recv reads the next frame; see Reader.Next for what it checks and the
// errors it returns (io.EOF when the peer closed between frames). ctx's
// deadline bounds the read and cancelling ctx interrupts it with an error
// matching ctx's; a frame that was partly read then is continued by the
// next Recv, so the Conn stays usable. Concurrent Recvs are serialized,
// each waiting only as long as its ctx allows.
func (c *Conn) Recv(ctx context.Context) (Frame, error) {
	if err := take(ctx, c.recvTurn); err != nil {
		return Frame{}, fmt.Errorf("transport: recv: waiting for another Recv: %w", err)
	}
	defer func() { <-c.recvTurn }()
	if c.authErr != nil {
		return Frame{}, fmt.Errorf("transport: recv: %w", c.authErr)
	}
	if err := ctx.Err(); err != nil {
		return Frame{}, fmt.Errorf("transport: recv: %w", context.Cause(ctx))
	}
	stop := watchDeadline(ctx, c.nc.SetReadDeadline)
	f, err := c.r.Next()
	stop()
	if err != nil {
		if cerr := ctxError(ctx, err); cerr != err {
			return Frame{}, fmt.Errorf("transport: recv: %w", cerr)
		}
		return Frame{}, err // Reader's errors say what failed
	}
	switch {
	case c.recvMAC != nil:
		return c.open(f)
	case f.Flags&FlagAuthenticated != 0:
		return Frame{}, fmt.Errorf("%w: the peer authenticates its frames and this side has no key (give both sides the same key)", ErrAuth)
	}
	return f, nil
}

// Close closes the underlying connection, interrupting Sends and Recvs in
// progress. Calling it again returns the first call's result.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		if err := c.nc.Close(); err != nil {
			c.closeErr = fmt.Errorf("transport: close: %w", err)
		}
	})
	return c.closeErr
}

// Shutdown ends the connection gracefully after a last frame such as an
// Error: it half-closes the sending side, so the peer reads every frame sent
// and then a clean end of stream, and discards what the peer still sends
// until the peer closes or ctx ends. Closing at once instead, with the
// peer's frames unread, makes the kernel reset the connection, and a reset
// can overtake the last frame on its way. Shutdown then closes the Conn.
func (c *Conn) Shutdown(ctx context.Context) error {
	if hc, ok := c.nc.(interface{ CloseWrite() error }); ok {
		if err := hc.CloseWrite(); err == nil {
			if take(ctx, c.recvTurn) == nil {
				stop := watchDeadline(ctx, c.nc.SetReadDeadline)
				io.Copy(io.Discard, c.nc)
				stop()
				<-c.recvTurn
			}
		}
	}
	return c.Close()
}

// take puts a token in turn, waiting for room unless ctx is done first.
func take(ctx context.Context, turn chan struct{}) error {
	select {
	case turn <- struct{}{}:
		return nil
	default:
	}
	select {
	case turn <- struct{}{}:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// longAgo is a deadline in the past, to interrupt an I/O call at once.
var longAgo = time.Unix(1, 0)

// watchDeadline sets the deadline to ctx's (none if it has none) and, until
// the returned stop is called, moves it into the past when ctx is done.
// stop waits for that to have happened if it started, so a later call's
// deadline is never overwritten by this one.
func watchDeadline(ctx context.Context, set func(time.Time) error) (stop func()) {
	dl, _ := ctx.Deadline()
	_ = set(dl) // an error here (closed conn) shows in the I/O that follows
	if ctx.Done() == nil {
		return func() {}
	}
	fired := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		_ = set(longAgo)
		close(fired)
	})
	return func() {
		if !stopAfter() {
			<-fired
		}
	}
}

// ctxError returns ctx's error (its cause) in place of a deadline error
// that ctx caused, err otherwise. The read deadline can pass an instant before ctx's
// own timer reports it, hence the clock check.
func ctxError(ctx context.Context, err error) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return err
}

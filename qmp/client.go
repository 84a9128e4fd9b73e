package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Client is a connection to one QEMU monitor in QMP mode. It is safe for
// concurrent use. Create one with Dial or New; Close it when done.
type Client struct {
	conn net.Conn
	log  *slog.Logger
	opts options

	// Set by the handshake, read-only afterwards.
	version      Version
	capabilities []string

	greeting chan message // the first message, from the reader; buffer 1

	// wsem holds a token while one command is being written, so writes
	// never interleave; it is a channel so that waiting honours ctx.
	wsem chan struct{}

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]*call
	err     *closedError // why the connection closed; set before done closes

	closeOnce  sync.Once
	done       chan struct{}
	readerDone chan struct{}

	subMu      sync.Mutex
	subs       map[*Subscription]struct{}
	subsClosed bool
	dropped    atomic.Uint64
}

// call is a command waiting for its reply.
type call struct {
	command string
	reply   chan message // buffer 1: the reader never blocks on it
	// abandoned is set, under Client.mu, when the caller stopped waiting;
	// the reader then discards the reply when it comes.
	abandoned bool
}

// Dial connects to the QMP unix socket at socketPath and does the handshake
// (see New). ctx bounds connecting and the handshake, not the life of the
// client.
func Dial(ctx context.Context, socketPath string, opts ...Option) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
	}
	return New(ctx, conn, opts...)
}

// New takes over conn, a fresh connection to a QMP server, and does the
// handshake: it reads the greeting, sends qmp_capabilities and waits for its
// return. ctx bounds the handshake only. On error conn is closed.
func New(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	c := &Client{
		conn:       conn,
		log:        o.logger,
		opts:       o,
		greeting:   make(chan message, 1),
		wsem:       make(chan struct{}, 1),
		pending:    make(map[uint64]*call),
		done:       make(chan struct{}),
		readerDone: make(chan struct{}),
		subs:       make(map[*Subscription]struct{}),
	}
	go c.readLoop()
	if err := c.handshake(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (c *Client) handshake(ctx context.Context) error {
	peer := "QMP server"
	if a := c.conn.RemoteAddr(); a != nil && a.String() != "" {
		peer = a.String()
	}
	var g message
	select {
	case g = <-c.greeting:
	default:
		select {
		case g = <-c.greeting:
		case <-c.done:
			return fmt.Errorf("qmp: handshake with %s: read greeting: %w", peer, c.closeCause())
		case <-ctx.Done():
			return fmt.Errorf("qmp: handshake with %s: wait for greeting: %w", peer, ctx.Err())
		}
	}
	c.version, c.capabilities = g.version, g.capabilities
	if mv := c.opts.minVersion; mv != nil && !c.version.AtLeast(*mv) {
		return fmt.Errorf("qmp: handshake with %s: QEMU %s is older than the required %d.%d.%d",
			peer, c.version, mv.Major, mv.Minor, mv.Micro)
	}
	return c.Execute(ctx, "qmp_capabilities", nil, nil)
}

// Version returns the QEMU version announced in the greeting.
func (c *Client) Version() Version { return c.version }

// Capabilities returns the QMP capabilities announced in the greeting (QEMU
// 7.2 announces ["oob"]). None of them is enabled: commands run in order.
func (c *Client) Capabilities() []string { return slices.Clone(c.capabilities) }

// Execute runs command with args and waits for its reply.
//
// args, if not nil, must marshal to a JSON object; it becomes the command's
// "arguments". If result is not nil the "return" value is unmarshalled into
// it; otherwise it is discarded. A QMP error reply is returned as *Error.
//
// If ctx ends before the reply arrives, Execute returns an error wrapping
// ctx.Err(). The command may still run in QEMU; its reply, when it comes, is
// read and discarded, never handed to another command. If the connection
// closes first, the error wraps ErrClosed and says why.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	return c.execute(ctx, command, args, result, nil)
}

// ExecuteWithFile is Execute with f's descriptor passed along with the
// command (SCM_RIGHTS), as QMP's getfd and add-fd expect. It needs a
// connection on a unix socket (Dial's).
func (c *Client) ExecuteWithFile(ctx context.Context, command string, args, result any, f *os.File) error {
	if _, ok := c.conn.(*net.UnixConn); !ok {
		return fmt.Errorf("qmp: %s: passing a file needs a unix socket connection, not %T", command, c.conn)
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("qmp: %s: %w", command, err)
	}
	var oob []byte
	if err := raw.Control(func(fd uintptr) { oob = unix.UnixRights(int(fd)) }); err != nil {
		return fmt.Errorf("qmp: %s: %w", command, err)
	}
	// f stays open until the command is written: its descriptor is copied
	// into the message.
	defer runtime.KeepAlive(f)
	return c.execute(ctx, command, args, result, oob)
}

func (c *Client) execute(ctx context.Context, command string, args, result any, oob []byte) error {
	if command == "" {
		return errors.New("qmp: Execute: empty command name")
	}
	var rawArgs json.RawMessage
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("qmp: %s: encode arguments: %w", command, err)
		}
		if string(b) != "null" {
			if !isObject(b) {
				return fmt.Errorf("qmp: %s: arguments must encode as a JSON object, got %s", command, truncate(b, 40))
			}
			rawArgs = b
		}
	}

	cl := &call{command: command, reply: make(chan message, 1)}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.closedError(command)
	}
	c.nextID++
	id := c.nextID
	c.pending[id] = cl
	c.mu.Unlock()

	req, err := json.Marshal(request{Execute: command, Arguments: rawArgs, ID: id})
	if err != nil { // cannot happen: every part is already valid JSON
		c.forget(id)
		return fmt.Errorf("qmp: %s: encode command: %w", command, err)
	}
	if err := c.write(ctx, command, append(req, '\n'), oob); err != nil {
		c.forget(id)
		return err
	}

	select {
	case m := <-cl.reply:
		return finish(command, m, result)
	case <-c.done:
		select {
		case m := <-cl.reply:
			return finish(command, m, result)
		default:
			return c.closedError(command)
		}
	case <-ctx.Done():
		c.mu.Lock()
		if _, ok := c.pending[id]; ok {
			cl.abandoned = true
		}
		c.mu.Unlock()
		// The reader delivers under c.mu, so if the call was no longer
		// pending its reply is already in the channel.
		select {
		case m := <-cl.reply:
			return finish(command, m, result)
		default:
			return fmt.Errorf("qmp: %s: no reply: %w", command, ctx.Err())
		}
	}
}

// Run executes command with args and returns its "return" value decoded
// into a T. See Client.Execute.
func Run[T any](ctx context.Context, c *Client, command string, args any) (T, error) {
	var v T
	err := c.Execute(ctx, command, args, &v)
	return v, err
}

// request is a command as written to QEMU.
type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
	ID        uint64          `json:"id"`
}

func finish(command string, m message, result any) error {
	if m.kind == kindError {
		return &Error{Command: command, Class: m.errClass, Desc: m.errDesc}
	}
	if result == nil {
		return nil
	}
	if err := json.Unmarshal(m.ret, result); err != nil {
		return fmt.Errorf("qmp: %s: decode return value %s: %w", command, truncate(m.ret, 64), err)
	}
	return nil
}

// forget drops a pending call whose command was never sent.
func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// aLongTimeAgo is a deadline in the past: setting it makes a blocked Write
// return at once.
var aLongTimeAgo = time.Unix(1, 0)

// write sends one encoded command. Writes are serialized. If ctx ends
// before any byte is written, write returns the ctx error and the
// connection stays usable; a write that fails part way leaves the stream
// corrupt, so it closes the connection.
func (c *Client) write(ctx context.Context, command string, b, oob []byte) error {
	select {
	case c.wsem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("qmp: %s: not sent: %w", command, ctx.Err())
	case <-c.done:
		return c.closedError(command)
	}
	defer func() { <-c.wsem }()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("qmp: %s: not sent: %w", command, err)
	}

	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetWriteDeadline(aLongTimeAgo)
		close(fired)
	})
	var n int
	var err error
	if len(oob) > 0 {
		// The descriptor goes with the first byte; a short write (it
		// would take a full socket buffer) sends the rest plainly.
		n, _, err = c.conn.(*net.UnixConn).WriteMsgUnix(b, oob, nil)
		if err == nil && n < len(b) {
			var m int
			m, err = c.conn.Write(b[n:])
			n += m
		}
	} else {
		n, err = c.conn.Write(b)
	}
	if !stop() {
		<-fired
		c.conn.SetWriteDeadline(time.Time{})
	}
	if err == nil {
		return nil
	}
	if n == 0 && ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("qmp: %s: not sent: %w", command, ctx.Err())
	}
	c.shutdown(fmt.Errorf("write %s: %w", command, err))
	return c.closedError(command)
}

// readLoop is the only reader of the connection. It decodes messages one by
// one, hands replies to their callers by id and events to subscribers, and
// closes the client when the stream ends or breaks.
func (c *Client) readLoop() {
	defer close(c.readerDone)
	lr := &limitedReader{r: c.conn}
	dec := json.NewDecoder(lr)
	first := true
	for {
		lr.limit = dec.InputOffset() + c.opts.maxMessage
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			c.shutdown(c.readError(err, dec))
			return
		}
		m, err := decodeMessage(raw)
		if err != nil {
			c.shutdown(&protocolError{msg: "malformed message " + truncate(raw, 64), err: err})
			return
		}
		if first {
			first = false
			if m.kind != kindGreeting {
				c.shutdown(&protocolError{msg: fmt.Sprintf("expected the QMP greeting, got %s message %s", m.kind, truncate(raw, 64))})
				return
			}
			c.greeting <- m
			continue
		}
		c.dispatch(m)
	}
}

// readError turns a decoder error into the reason the connection closes.
func (c *Client) readError(err error, dec *json.Decoder) error {
	if errors.Is(err, errMessageTooLarge) {
		return &protocolError{msg: fmt.Sprintf("message larger than %d bytes", c.opts.maxMessage)}
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		bad, _ := io.ReadAll(io.LimitReader(dec.Buffered(), 256))
		for len(bad) > 0 && (bad[0] == ' ' || bad[0] == '\t' || bad[0] == '\r' || bad[0] == '\n') {
			bad = bad[1:]
		}
		return &protocolError{msg: "malformed JSON " + truncate(bad, 64), err: err}
	}
	return err
}

func (c *Client) dispatch(m message) {
	switch m.kind {
	case kindEvent:
		c.publish(m.event)
		return
	case kindGreeting:
		c.log.Warn("qmp: ignoring a second greeting", "version", m.version.String())
		return
	}
	id, ok := parseID(m.id)
	if !ok {
		c.logStray("qmp: dropping a reply that carries no id of this client", m)
		return
	}
	c.mu.Lock()
	cl, ok := c.pending[id]
	if ok {
		delete(c.pending, id)
		if !cl.abandoned {
			cl.reply <- m
		}
	}
	c.mu.Unlock()
	switch {
	case !ok:
		c.logStray("qmp: dropping a reply to no pending command", m)
	case cl.abandoned:
		c.log.Debug("qmp: discarded late reply", "command", cl.command, "id", id, "kind", m.kind.String())
	}
}

func (c *Client) logStray(msg string, m message) {
	attrs := []any{"kind", m.kind.String(), "id", string(m.id)}
	if m.kind == kindError {
		attrs = append(attrs, "class", m.errClass, "desc", m.errDesc)
	}
	c.log.Warn(msg, attrs...)
}

// shutdown records why the connection ends, closes it, fails every waiting
// caller and ends every subscription. Only the first call has an effect.
func (c *Client) shutdown(cause error) {
	c.closeOnce.Do(func() {
		ce := &closedError{cause: cause}
		c.mu.Lock()
		c.err = ce
		clear(c.pending)
		c.mu.Unlock()
		c.conn.Close()
		close(c.done)

		c.subMu.Lock()
		c.subsClosed = true
		for s := range c.subs {
			s.closed = ce
			close(s.ch)
		}
		clear(c.subs)
		c.subMu.Unlock()
	})
}

// closeCause returns why the connection closed, or nil while it is open.
func (c *Client) closeCause() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		return nil
	}
	return c.err
}

func (c *Client) closedError(command string) error {
	return fmt.Errorf("qmp: %s: %w", command, c.closeCause())
}

// Done returns a channel that is closed when the connection has closed, for
// whatever reason. Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns nil while the connection is open and, once Done is closed, an
// error wrapping ErrClosed that says why it closed (for example
// "qmp: connection closed: EOF" when QEMU exited).
func (c *Client) Err() error {
	cause := c.closeCause()
	if cause == nil {
		return nil
	}
	return fmt.Errorf("qmp: %w", cause)
}

// Close closes the connection, fails pending and future commands with
// ErrClosed, ends all subscriptions and waits for the reader goroutine to
// exit. It is idempotent and always returns nil.
func (c *Client) Close() error {
	c.shutdown(errClosedByClient)
	<-c.readerDone
	return nil
}

// errMessageTooLarge is returned by limitedReader past its limit.
var errMessageTooLarge = errors.New("message too large")

// limitedReader fails reads past limit, an absolute offset in the stream.
// The reader goroutine moves limit forward before each message, so it caps
// the size of a single message, not the stream.
type limitedReader struct {
	r     io.Reader
	n     int64 // bytes read so far
	limit int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n >= l.limit {
		return 0, errMessageTooLarge
	}
	if int64(len(p)) > l.limit-l.n {
		p = p[:l.limit-l.n]
	}
	n, err := l.r.Read(p)
	l.n += int64(n)
	return n, err
}

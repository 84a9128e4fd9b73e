// Package qmptest provides a fake QEMU QMP server for tests of code that
// drives QEMU through package qmp.
//
// The fake plays QEMU's side of the protocol over net.Pipe (NewPipe,
// NewClient) or a unix socket (ListenUnix): it sends a greeting, insists on
// qmp_capabilities first, and then answers each command, in the order
// received like QEMU without OOB, from (in this order of precedence) a
// reply queued with Server.Enqueue, the Handler set with WithHandler or
// Server.SetHandler, or Server.DefaultHandler, which emulates query-status,
// stop, cont (with their STOP and RESUME events) and query-version.
//
// Writes to the client (replies, events, raw bytes) are serialized; over
// net.Pipe each one returns only once the client has read it, which a
// qmp.Client, whose reader never stops, always does.
//
// Tests can emit events at any time (Server.Event), write arbitrary bytes
// (Server.WriteRaw), hold a command's reply until they release it
// (Server.Hold), close the connection in the middle of a command
// (Server.Close) and inspect what the client sent (Server.Commands).
package qmptest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/qmp"
)

// Handler answers one command: it returns the value for "return" (nil means
// {}) or, if err is not nil, the QMP error to reply with. A handler may call
// Server.Event to emit events before its reply, as QEMU does for stop.
type Handler func(cmd string, args json.RawMessage) (result any, err *qmp.Error)

// Reply is a scripted answer for Server.Enqueue: Error if not nil, else
// Return (nil means {}).
type Reply struct {
	Return any
	Error  *qmp.Error
}

// Command is a command the fake received.
type Command struct {
	// Name is the "execute" member.
	Name string
	// Args is the "arguments" member, nil when absent.
	Args json.RawMessage
	// ID is the "id" member, nil when absent.
	ID json.RawMessage
	// Raw is the whole request as received.
	Raw json.RawMessage
}

// DefaultVersion is the version the fake announces unless WithVersion says
// otherwise: QEMU 7.2.22, as in Debian 12.
var DefaultVersion = qmp.Version{Major: 7, Minor: 2, Micro: 22, Package: "qmptest"}

// ErrNotConnected is returned by writes before a client has connected to a
// ListenUnix server.
var ErrNotConnected = errors.New("qmptest: no client connected")

// Option configures a Server.
type Option func(*Server)

// WithVersion sets the version and capabilities announced in the greeting.
// By default they are DefaultVersion and ["oob"].
func WithVersion(v qmp.Version, capabilities ...string) Option {
	return func(s *Server) {
		s.version = v
		s.capabilities = capabilities
	}
}

// WithGreeting makes the fake send raw, verbatim, instead of a well-formed
// greeting; an empty raw sends nothing. For testing bad handshakes.
func WithGreeting(raw string) Option {
	return func(s *Server) {
		s.rawGreeting = &raw
	}
}

// WithHandler sets the handler for commands after negotiation (see
// Server.SetHandler).
func WithHandler(h Handler) Option {
	return func(s *Server) { s.handler = h }
}

// WithConcurrentReplies makes the fake answer every command in its own
// goroutine, so replies can come in any order and a held command does not
// delay the others. Real QEMU (without OOB) answers in order.
func WithConcurrentReplies() Option {
	return func(s *Server) { s.concurrent = true }
}

// WithClock sets the clock used for event timestamps (time.Now by default).
func WithClock(now func() time.Time) Option {
	return func(s *Server) { s.now = now }
}

// WithClientOptions sets the options NewClient passes to qmp.New.
func WithClientOptions(opts ...qmp.Option) Option {
	return func(s *Server) { s.clientOpts = append(s.clientOpts, opts...) }
}

// Server is a fake QMP server serving one connection. Its methods are safe
// for concurrent use.
type Server struct {
	// configuration, fixed after construction
	version      qmp.Version
	capabilities []string
	rawGreeting  *string
	concurrent   bool
	now          func() time.Time
	clientOpts   []qmp.Option

	mu         sync.Mutex
	conn       net.Conn // nil until a client connects
	listener   net.Listener
	handler    Handler
	script     map[string][]Reply
	holds      map[string][]*Gate
	commands   []Command
	negotiated bool
	status     string // for DefaultHandler: "running" or "paused"

	wmu sync.Mutex // serializes writes to conn

	connected chan struct{} // closed when a client has connected
	done      chan struct{} // closed when the connection has ended
	closing   chan struct{} // closed by Close
	closeOnce sync.Once
	doneOnce  sync.Once
	wg        sync.WaitGroup
}

func newServer(opts []Option) *Server {
	s := &Server{
		version:      DefaultVersion,
		capabilities: []string{"oob"},
		now:          time.Now,
		script:       make(map[string][]Reply),
		holds:        make(map[string][]*Gate),
		status:       "running",
		connected:    make(chan struct{}),
		done:         make(chan struct{}),
		closing:      make(chan struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

// NewPipe starts a fake server on one end of a net.Pipe and returns it with
// the other end, for qmp.New. The server is closed in t.Cleanup.
func NewPipe(t testing.TB, opts ...Option) (*Server, net.Conn) {
	t.Helper()
	s := newServer(opts)
	server, client := net.Pipe()
	s.start(server)
	t.Cleanup(s.Close)
	return s, client
}

// NewClient starts a fake server over net.Pipe and connects a qmp.Client to
// it, failing the test if the handshake fails. Both are closed in
// t.Cleanup. It must be called from the test's goroutine.
func NewClient(t testing.TB, opts ...Option) (*qmp.Client, *Server) {
	t.Helper()
	s, conn := NewPipe(t, opts...)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := qmp.New(ctx, conn, s.clientOpts...)
	if err != nil {
		t.Fatalf("qmptest: connect a client to the fake QMP server: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, s
}

// ListenUnix starts a fake server listening on the unix socket path. It
// serves the first client that connects (like QEMU, one client at a time)
// and stops listening then. The server is closed in t.Cleanup.
func ListenUnix(t testing.TB, path string, opts ...Option) *Server {
	t.Helper()
	s := newServer(opts)
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("qmptest: listen on %s: %v", path, err)
	}
	s.listener = l
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		conn, err := l.Accept()
		l.Close()
		if err != nil {
			s.markDone()
			return
		}
		s.start(conn)
	}()
	t.Cleanup(s.Close)
	return s
}

// start serves conn in new goroutines.
func (s *Server) start(conn net.Conn) {
	s.mu.Lock()
	select {
	case <-s.closing:
		s.mu.Unlock()
		conn.Close()
		s.markDone()
		return
	default:
	}
	s.conn = conn
	s.mu.Unlock()
	close(s.connected)

	queue := make(chan pendingCommand, 1024)
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		defer close(queue)
		if err := s.sendGreeting(); err != nil {
			s.markDone()
			return
		}
		s.readLoop(conn, queue)
	}()
	go func() {
		defer s.wg.Done()
		for pc := range queue {
			if s.concurrent {
				s.wg.Add(1)
				go func() {
					defer s.wg.Done()
					s.answer(pc)
				}()
				continue
			}
			s.answer(pc)
		}
	}()
}

func (s *Server) sendGreeting() error {
	if s.rawGreeting != nil {
		if *s.rawGreeting == "" {
			return nil
		}
		return s.WriteRaw([]byte(*s.rawGreeting))
	}
	caps := s.capabilities
	if caps == nil {
		caps = []string{}
	}
	return s.writeJSON(map[string]any{
		"QMP": map[string]any{"version": s.version, "capabilities": caps},
	})
}

type pendingCommand struct {
	cmd  Command
	gate *Gate
	err  *qmp.Error // a malformed request, answered with this error
}

// readLoop reads requests, records them, releases Arrived of matching
// holds and queues them for answering. It ends when the connection ends or
// carries invalid JSON (then it closes the connection).
func (s *Server) readLoop(conn net.Conn, queue chan<- pendingCommand) {
	defer s.markDone()
	dec := json.NewDecoder(conn)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			conn.Close()
			return
		}
		pc := parseRequest(raw)
		s.mu.Lock()
		s.commands = append(s.commands, pc.cmd)
		if hs := s.holds[pc.cmd.Name]; len(hs) > 0 && pc.err == nil {
			pc.gate = hs[0]
			s.holds[pc.cmd.Name] = hs[1:]
		}
		s.mu.Unlock()
		if pc.gate != nil {
			pc.gate.cmd = pc.cmd
			close(pc.gate.arrived)
		}
		select {
		case queue <- pc:
		case <-s.closing:
			return
		}
	}
}

func parseRequest(raw json.RawMessage) pendingCommand {
	pc := pendingCommand{cmd: Command{Raw: raw}}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(raw, &top); err != nil {
		pc.err = &qmp.Error{Class: "GenericError", Desc: "QMP input must be a JSON object"}
		return pc
	}
	pc.cmd.ID = top["id"]
	if a, ok := top["arguments"]; ok {
		pc.cmd.Args = a
		if len(a) == 0 || a[0] != '{' {
			pc.err = &qmp.Error{Class: "GenericError", Desc: "QMP input member 'arguments' must be an object"}
		}
	}
	ex, ok := top["execute"]
	if !ok {
		pc.err = &qmp.Error{Class: "GenericError", Desc: "QMP input lacks member 'execute'"}
		return pc
	}
	if err := json.Unmarshal(ex, &pc.cmd.Name); err != nil {
		pc.err = &qmp.Error{Class: "GenericError", Desc: "QMP input member 'execute' must be a string"}
	}
	return pc
}

// answer works out the reply to one command and sends it.
func (s *Server) answer(pc pendingCommand) {
	if g := pc.gate; g != nil {
		select {
		case <-g.release:
		case <-s.closing:
			return
		}
	}
	result, qerr := s.respond(pc)
	var reply map[string]any
	if qerr != nil {
		reply = map[string]any{"error": map[string]string{"class": qerr.Class, "desc": qerr.Desc}}
	} else {
		if result == nil {
			result = struct{}{}
		}
		reply = map[string]any{"return": result}
	}
	if pc.cmd.ID != nil {
		reply["id"] = pc.cmd.ID
	}
	s.writeJSON(reply) // fails only when the connection is gone
}

func (s *Server) respond(pc pendingCommand) (any, *qmp.Error) {
	if pc.err != nil {
		return nil, pc.err
	}
	name := pc.cmd.Name
	s.mu.Lock()
	if q := s.script[name]; len(q) > 0 {
		r := q[0]
		s.script[name] = q[1:]
		if name == "qmp_capabilities" && r.Error == nil {
			s.negotiated = true
		}
		s.mu.Unlock()
		return r.Return, r.Error
	}
	negotiated := s.negotiated
	switch {
	case !negotiated && name == "qmp_capabilities":
		s.negotiated = true
		s.mu.Unlock()
		return nil, nil
	case !negotiated:
		s.mu.Unlock()
		return nil, &qmp.Error{Class: "CommandNotFound", Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"}
	case name == "qmp_capabilities":
		s.mu.Unlock()
		return nil, &qmp.Error{Class: "CommandNotFound", Desc: "Capabilities negotiation is already complete, command ignored"}
	}
	h := s.handler
	s.mu.Unlock()
	if h == nil {
		h = s.DefaultHandler
	}
	return h(name, pc.cmd.Args)
}

// DefaultHandler emulates a few of QEMU 7.2's commands: query-status,
// stop and cont (emitting STOP or RESUME, before the return, when the run
// state changes, as QEMU does) and query-version. Every other command gets
// CommandNotFound. A custom Handler can fall back to it.
func (s *Server) DefaultHandler(cmd string, args json.RawMessage) (any, *qmp.Error) {
	switch cmd {
	case "query-status":
		s.mu.Lock()
		st := s.status
		s.mu.Unlock()
		return map[string]any{"status": st, "singlestep": false, "running": st == "running"}, nil
	case "stop", "cont":
		from, to, event := "running", "paused", "STOP"
		if cmd == "cont" {
			from, to, event = "paused", "running", "RESUME"
		}
		s.mu.Lock()
		changed := s.status == from
		s.status = to
		s.mu.Unlock()
		if changed {
			s.Event(event, nil)
		}
		return nil, nil
	case "query-version":
		return s.version, nil
	}
	return nil, &qmp.Error{Class: "CommandNotFound", Desc: fmt.Sprintf("The command %s has not been found", cmd)}
}

// SetHandler sets the handler for commands after negotiation, replacing
// DefaultHandler; nil restores DefaultHandler.
func (s *Server) SetHandler(h Handler) {
	s.mu.Lock()
	s.handler = h
	s.mu.Unlock()
}

// Enqueue scripts the answer to the next cmd received; several answers
// queue up in order. A scripted answer takes precedence over the handler
// and over negotiation (so Enqueue("qmp_capabilities", Reply{Error: ...})
// makes the handshake fail).
func (s *Server) Enqueue(cmd string, r Reply) {
	s.mu.Lock()
	s.script[cmd] = append(s.script[cmd], r)
	s.mu.Unlock()
}

// Gate holds the reply to one command until released; see Server.Hold.
type Gate struct {
	arrived     chan struct{}
	release     chan struct{}
	releaseOnce sync.Once
	cmd         Command // set before arrived is closed
}

// Hold makes the fake hold its reply to the next cmd it receives until the
// returned Gate is released. With in-order replies (the default) the
// commands received after it wait too, as in QEMU. Holds queue up per
// command name.
func (s *Server) Hold(cmd string) *Gate {
	g := &Gate{arrived: make(chan struct{}), release: make(chan struct{})}
	s.mu.Lock()
	s.holds[cmd] = append(s.holds[cmd], g)
	s.mu.Unlock()
	return g
}

// Arrived returns a channel closed when the held command has been received.
func (g *Gate) Arrived() <-chan struct{} { return g.arrived }

// Command returns the held command; valid once Arrived is closed.
func (g *Gate) Command() Command {
	<-g.arrived
	return g.cmd
}

// Release lets the reply go. It is idempotent.
func (g *Gate) Release() {
	g.releaseOnce.Do(func() { close(g.release) })
}

// Event sends the event name with data (omitted when nil) and a timestamp
// from the server's clock.
func (s *Server) Event(name string, data any) error {
	now := s.now()
	ev := map[string]any{
		"event": name,
		"timestamp": map[string]int64{
			"seconds":      now.Unix(),
			"microseconds": int64(now.Nanosecond() / 1000),
		},
	}
	if data != nil {
		ev["data"] = data
	}
	return s.writeJSON(ev)
}

// WriteRaw writes b to the client verbatim.
func (s *Server) WriteRaw(b []byte) error {
	s.mu.Lock()
	conn := s.conn
	s.mu.Unlock()
	if conn == nil {
		return ErrNotConnected
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("qmptest: write: %w", err)
	}
	return nil
}

// writeJSON writes v as one line terminated by CRLF, as QEMU does.
func (s *Server) writeJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("qmptest: encode: %w", err)
	}
	return s.WriteRaw(append(b, '\r', '\n'))
}

// Commands returns the commands received so far, in order, including
// qmp_capabilities.
func (s *Server) Commands() []Command {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Command(nil), s.commands...)
}

// CommandNames returns the names of the commands received so far.
func (s *Server) CommandNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, len(s.commands))
	for i, c := range s.commands {
		names[i] = c.Name
	}
	return names
}

// Connected returns a channel closed once a client is connected.
func (s *Server) Connected() <-chan struct{} { return s.connected }

// Done returns a channel closed when the connection has ended, whichever
// side closed it.
func (s *Server) Done() <-chan struct{} { return s.done }

func (s *Server) markDone() {
	s.doneOnce.Do(func() { close(s.done) })
}

// Close closes the connection (as QEMU exiting would, also in the middle
// of a command: held replies are never sent) and waits for the server's
// goroutines to finish. It is idempotent. It must not be called from a
// Handler.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.closing)
		s.mu.Lock()
		if s.listener != nil {
			s.listener.Close()
		}
		if s.conn != nil {
			s.conn.Close()
		}
		s.mu.Unlock()
	})
	s.wg.Wait()
	s.markDone()
}

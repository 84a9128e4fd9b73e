package qmp_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/qmp/qmptest"
)

func TestHandshake(t *testing.T) {
	t.Run("good greeting", func(t *testing.T) {
		v := qmp.Version{Major: 7, Minor: 2, Micro: 22, Package: "Debian 1:7.2+dfsg-7+deb12u18+b3"}
		c, srv := qmptest.NewClient(t, qmptest.WithVersion(v, "oob"))
		if got := c.Version(); got != v {
			t.Errorf("Version() = %+v, want %+v", got, v)
		}
		if got := c.Capabilities(); !slices.Equal(got, []string{"oob"}) {
			t.Errorf("Capabilities() = %q, want [oob]", got)
		}
		cmds := srv.Commands()
		if len(cmds) != 1 || cmds[0].Name != "qmp_capabilities" {
			t.Fatalf("server received %q, want just qmp_capabilities", srv.CommandNames())
		}
		if cmds[0].Args != nil || cmds[0].ID == nil {
			t.Errorf("qmp_capabilities request %s: want an id and no arguments", cmds[0].Raw)
		}
		if c.Err() != nil {
			t.Errorf("Err() = %v on an open client", c.Err())
		}
	})

	tests := []struct {
		name      string
		opts      []qmptest.Option
		clientOps []qmp.Option
		setup     func(*qmptest.Server) // before the client connects
		ctx       func(*testing.T, *qmptest.Server) context.Context
		wantIs    []error
		wantText  string
		wantClass string // when the error is a *qmp.Error
	}{
		{
			name:     "not JSON",
			opts:     []qmptest.Option{qmptest.WithGreeting("hello there\r\n")},
			wantIs:   []error{qmp.ErrClosed, qmp.ErrProtocol},
			wantText: `qmp: handshake with pipe: read greeting: connection closed: protocol error: malformed JSON "hello there\r\n"`,
		},
		{
			name:     "a return instead of a greeting",
			opts:     []qmptest.Option{qmptest.WithGreeting(`{"return": {}, "id": 1}` + "\r\n")},
			wantIs:   []error{qmp.ErrClosed, qmp.ErrProtocol},
			wantText: "expected the QMP greeting, got return message",
		},
		{
			name:     "greeting without version",
			opts:     []qmptest.Option{qmptest.WithGreeting(`{"QMP": {"capabilities": []}}` + "\r\n")},
			wantIs:   []error{qmp.ErrProtocol},
			wantText: `greeting message: no "version" member`,
		},
		{
			name:     "greeting with a string version",
			opts:     []qmptest.Option{qmptest.WithGreeting(`{"QMP": {"version": "7.2.0", "capabilities": []}}` + "\r\n")},
			wantIs:   []error{qmp.ErrProtocol},
			wantText: "version: want a JSON object",
		},
		{
			name:     "EOF before the greeting",
			opts:     []qmptest.Option{qmptest.WithGreeting("")},
			setup:    func(s *qmptest.Server) { s.Close() },
			wantIs:   []error{qmp.ErrClosed, io.EOF},
			wantText: "read greeting: connection closed: EOF",
		},
		{
			name: "no greeting before the deadline",
			opts: []qmptest.Option{qmptest.WithGreeting("")},
			ctx: func(t *testing.T, _ *qmptest.Server) context.Context {
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
				t.Cleanup(cancel)
				return ctx
			},
			wantIs:   []error{context.DeadlineExceeded},
			wantText: "wait for greeting",
		},
		{
			name: "qmp_capabilities never answered",
			ctx: func(t *testing.T, s *qmptest.Server) context.Context {
				g := s.Hold("qmp_capabilities")
				ctx, cancel := context.WithCancel(t.Context())
				t.Cleanup(cancel)
				go func() {
					<-g.Arrived()
					cancel()
				}()
				return ctx
			},
			wantIs:   []error{context.Canceled},
			wantText: "qmp: qmp_capabilities: no reply: context canceled",
		},
		{
			name: "qmp_capabilities refused",
			setup: func(s *qmptest.Server) {
				s.Enqueue("qmp_capabilities", qmptest.Reply{Error: &qmp.Error{Class: "GenericError", Desc: "nope"}})
			},
			wantText:  "qmp: qmp_capabilities: GenericError: nope",
			wantClass: "GenericError",
		},
		{
			name:      "QEMU too old",
			opts:      []qmptest.Option{qmptest.WithVersion(qmp.Version{Major: 6, Minor: 2})},
			clientOps: []qmp.Option{qmp.WithMinVersion(qmp.Version{Major: 7, Minor: 2})},
			wantText:  "QEMU 6.2.0 is older than the required 7.2.0",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, conn := qmptest.NewPipe(t, tt.opts...)
			if tt.setup != nil {
				tt.setup(srv)
			}
			ctx := testContext(t)
			if tt.ctx != nil {
				ctx = tt.ctx(t, srv)
			}
			c, err := qmp.New(ctx, conn, tt.clientOps...)
			if err == nil {
				c.Close()
				t.Fatal("New succeeded, want an error")
			}
			if !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("New error = %q, want it to contain %q", err, tt.wantText)
			}
			for _, target := range tt.wantIs {
				if !errors.Is(err, target) {
					t.Errorf("New error = %q, want errors.Is(err, %v)", err, target)
				}
			}
			var qe *qmp.Error
			if got := errors.As(err, &qe); got != (tt.wantClass != "") || (got && qe.Class != tt.wantClass) {
				t.Errorf("New error = %#v, want a *qmp.Error with class %q: %v", err, tt.wantClass, got)
			}
			// New closes the connection it was given.
			waitClosed(t, srv.Done(), "the server to see the connection closed")
		})
	}
}

func TestExecute(t *testing.T) {
	type status struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	tests := []struct {
		name     string
		command  string
		args     any
		result   any    // pointer to decode into, or nil
		want     any    // what result should point to afterwards
		wantArgs string // the "arguments" the server should see; "" for none
		wantErr  string
		wantSent bool
	}{
		{
			name: "result decoded", command: "query-status",
			result: &status{}, want: &status{Status: "running", Running: true}, wantSent: true,
		},
		{name: "result discarded", command: "query-status", wantSent: true},
		{
			name: "arguments sent", command: "echo",
			args:     map[string]any{"filename": "/dev/shm/dev.state", "live": false},
			result:   &map[string]any{},
			want:     &map[string]any{"filename": "/dev/shm/dev.state", "live": false},
			wantArgs: `{"filename":"/dev/shm/dev.state","live":false}`, wantSent: true,
		},
		{
			name: "struct arguments", command: "echo",
			args: struct {
				Device string `json:"device"`
			}{"drive0"},
			wantArgs: `{"device":"drive0"}`, wantSent: true,
		},
		{
			name: "raw arguments", command: "echo",
			args: json.RawMessage(`{"a": [1, 2]}`), wantArgs: `{"a":[1,2]}`, wantSent: true,
		},
		{name: "typed nil map means no arguments", command: "echo", args: map[string]any(nil), wantSent: true},
		{
			name: "arguments that are not an object", command: "echo", args: []int{1},
			wantErr: "qmp: echo: arguments must encode as a JSON object, got \"[1]\"",
		},
		{
			name: "arguments that do not encode", command: "echo", args: map[string]any{"f": func() {}},
			wantErr: "qmp: echo: encode arguments: json: unsupported type",
		},
		{
			name: "return value of the wrong type", command: "query-status", result: &[]string{},
			wantErr: "qmp: query-status: decode return value", wantSent: true,
		},
		{name: "empty command name", command: "", wantErr: "qmp: Execute: empty command name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, srv := qmptest.NewClient(t)
			srv.SetHandler(func(cmd string, args json.RawMessage) (any, *qmp.Error) {
				if cmd == "echo" {
					return args, nil
				}
				return srv.DefaultHandler(cmd, args)
			})
			before := len(srv.Commands())
			err := c.Execute(testContext(t), tt.command, tt.args, tt.result)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Execute error = %v, want one containing %q", err, tt.wantErr)
				}
			} else if err != nil {
				t.Fatalf("Execute: %v", err)
			}
			if tt.want != nil {
				if got, _ := json.Marshal(tt.result); !bytes.Equal(got, mustMarshal(t, tt.want)) {
					t.Errorf("result = %s, want %s", got, mustMarshal(t, tt.want))
				}
			}
			cmds := srv.Commands()[before:]
			if !tt.wantSent {
				if len(cmds) != 0 {
					t.Fatalf("server received %d commands, want none", len(cmds))
				}
				return
			}
			if len(cmds) != 1 {
				t.Fatalf("server received %d commands, want 1", len(cmds))
			}
			got := cmds[0]
			if got.Name != tt.command {
				t.Errorf("server received %q, want %q", got.Name, tt.command)
			}
			if tt.wantArgs == "" && got.Args != nil {
				t.Errorf("request %s has arguments, want none", got.Raw)
			}
			if tt.wantArgs != "" && compactJSON(t, got.Args) != tt.wantArgs {
				t.Errorf("arguments = %s, want %s", got.Args, tt.wantArgs)
			}
		})
	}
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func compactJSON(t *testing.T, b []byte) string {
	t.Helper()
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		t.Fatalf("compact %q: %v", b, err)
	}
	return buf.String()
}

func TestRun(t *testing.T) {
	c, _ := qmptest.NewClient(t)
	v, err := qmp.Run[qmp.Version](testContext(t), c, "query-version", nil)
	if err != nil {
		t.Fatalf("Run query-version: %v", err)
	}
	if v != c.Version() {
		t.Errorf("query-version = %+v, greeting said %+v", v, c.Version())
	}
	_, err = qmp.Run[struct{}](testContext(t), c, "no-such-command", nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("Run no-such-command error = %v, want CommandNotFound", err)
	}
}

func TestQMPError(t *testing.T) {
	c, srv := qmptest.NewClient(t)
	srv.Enqueue("stop", qmptest.Reply{Error: &qmp.Error{Class: "GenericError", Desc: "Device 'x' is busy"}})
	err := c.Execute(testContext(t), "stop", nil, nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		t.Fatalf("Execute error = %#v, want a *qmp.Error", err)
	}
	want := qmp.Error{Command: "stop", Class: "GenericError", Desc: "Device 'x' is busy"}
	if *qe != want {
		t.Errorf("error = %+v, want %+v", *qe, want)
	}
	if got, want := err.Error(), "qmp: stop: GenericError: Device 'x' is busy"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if errors.Is(err, qmp.ErrClosed) {
		t.Errorf("a QMP error must not read as ErrClosed")
	}
	// The connection stays usable after a QMP error.
	if err := c.Execute(testContext(t), "stop", nil, nil); err != nil {
		t.Errorf("stop after a QMP error: %v", err)
	}
}

func TestMalformedInputClosesClient(t *testing.T) {
	tests := []struct {
		name     string
		input    string
		opts     []qmp.Option
		wantText string
	}{
		{name: "invalid JSON", input: "{bad json}\r\n", wantText: `protocol error: malformed JSON "{bad json}\r\n": invalid character 'b'`},
		{name: "not an object", input: "[1, 2]\r\n", wantText: `malformed message "[1, 2]": not a JSON object`},
		{name: "no QMP member", input: `{"hello": "world"}` + "\r\n", wantText: "not a QMP message"},
		{name: "bad event", input: `{"event": 42}` + "\r\n", wantText: `event message: "event" is not a string`},
		{name: "a second greeting that is broken", input: `{"QMP": {}}`, wantText: `no "version" member`},
		{
			name:     "oversized message",
			input:    `{"return": "` + strings.Repeat("x", 4096) + `", "id": 99}`,
			opts:     []qmp.Option{qmp.WithMaxMessageSize(1024)},
			wantText: "protocol error: message larger than 1024 bytes",
		},
		{
			name:     "endless string",
			input:    `{"event": "` + strings.Repeat("y", 8192),
			opts:     []qmp.Option{qmp.WithMaxMessageSize(2048)},
			wantText: "message larger than 2048 bytes",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, srv := qmptest.NewClient(t, qmptest.WithClientOptions(tt.opts...))
			sub := c.Subscribe()
			g := srv.Hold("query-status")
			errc := executeAsync(testContext(t), c, "query-status", nil, nil)
			<-g.Arrived()
			if err := srv.WriteRaw([]byte(tt.input)); err != nil && !errors.Is(err, io.ErrClosedPipe) {
				t.Fatalf("WriteRaw: %v", err)
			}
			err := receive(t, errc, "Execute to fail")
			if !errors.Is(err, qmp.ErrClosed) || !errors.Is(err, qmp.ErrProtocol) {
				t.Errorf("Execute error = %v, want ErrClosed and ErrProtocol", err)
			}
			if !strings.HasPrefix(err.Error(), "qmp: query-status: connection closed: ") || !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("Execute error = %q, want it to name the command and contain %q", err, tt.wantText)
			}
			waitClosed(t, c.Done(), "Done")
			if cerr := c.Err(); !errors.Is(cerr, qmp.ErrProtocol) || !strings.Contains(cerr.Error(), tt.wantText) {
				t.Errorf("Err() = %v, want the protocol error", cerr)
			}
			if _, ok := <-sub.Events(); ok {
				t.Errorf("subscription still open after the client closed")
			}
			err = c.Execute(testContext(t), "query-status", nil, nil)
			if !errors.Is(err, qmp.ErrClosed) {
				t.Errorf("Execute after close = %v, want ErrClosed", err)
			}
		})
	}
}

func TestLateReplyIsDiscarded(t *testing.T) {
	type who struct{ Who string }
	logger, logs := newLogger()
	c, srv := qmptest.NewClient(t, qmptest.WithClientOptions(qmp.WithLogger(logger)))
	srv.Enqueue("stop", qmptest.Reply{Return: who{"stop"}})
	srv.Enqueue("cont", qmptest.Reply{Return: who{"cont"}})
	holdStop, holdCont := srv.Hold("stop"), srv.Hold("cont")

	stopCtx, cancelStop := context.WithCancel(testContext(t))
	var stopResult who
	stopErr := executeAsync(stopCtx, c, "stop", nil, &stopResult)
	<-holdStop.Arrived()
	cancelStop()
	err := receive(t, stopErr, "stop to give up")
	if !errors.Is(err, context.Canceled) || err.Error() != "qmp: stop: no reply: context canceled" {
		t.Fatalf("stop error = %v, want \"qmp: stop: no reply: context canceled\"", err)
	}

	var contResult who
	contErr := executeAsync(testContext(t), c, "cont", nil, &contResult)
	<-holdCont.Arrived()
	// QEMU answers in order: the late stop reply goes out before cont's.
	holdStop.Release()
	holdCont.Release()
	if err := receive(t, contErr, "cont"); err != nil {
		t.Fatalf("cont: %v", err)
	}
	if contResult.Who != "cont" {
		t.Errorf("cont got the reply meant for %q", contResult.Who)
	}
	if stopResult.Who != "" {
		t.Errorf("the abandoned stop's result was written after Execute returned: %+v", stopResult)
	}
	if got := logs.find(slog.LevelDebug, "discarded late reply"); len(got) != 1 || !strings.Contains(got[0], "command=stop") {
		t.Errorf("debug log = %q, want one discarded late reply to stop", got)
	}
	if got := logs.find(slog.LevelWarn, ""); len(got) != 0 {
		t.Errorf("unexpected warnings: %q", got)
	}
}

func TestEventBetweenCommandAndReply(t *testing.T) {
	c, srv := qmptest.NewClient(t)
	srv.SetHandler(func(cmd string, args json.RawMessage) (any, *qmp.Error) {
		if cmd == "blockdev-mirror" {
			srv.Event("BLOCK_JOB_READY", map[string]any{"device": "mirror0", "len": 64 << 20, "type": "mirror"})
			return nil, nil
		}
		return srv.DefaultHandler(cmd, args) // stop: STOP event, then the return
	})
	ctx := testContext(t)
	stops := c.Subscribe("STOP")
	jobs := c.Subscribe("BLOCK_JOB_READY")
	resumes := c.Subscribe("RESUME")
	all := c.Subscribe()

	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatalf("stop: %v", err)
	}
	ev, err := stops.Wait(ctx, nil)
	if err != nil {
		t.Fatalf("wait for STOP: %v", err)
	}
	if ev.Name != "STOP" || ev.Data != nil || ev.Time.IsZero() {
		t.Errorf("STOP event = %+v", ev)
	}

	if err := c.Execute(ctx, "blockdev-mirror", map[string]any{"job-id": "mirror0"}, nil); err != nil {
		t.Fatalf("blockdev-mirror: %v", err)
	}
	ev, err = jobs.Wait(ctx, nil)
	if err != nil {
		t.Fatalf("wait for BLOCK_JOB_READY: %v", err)
	}
	var data struct {
		Device string `json:"device"`
		Len    int64  `json:"len"`
	}
	if err := ev.DecodeData(&data); err != nil || data.Device != "mirror0" || data.Len != 64<<20 {
		t.Errorf("BLOCK_JOB_READY data = %+v, %v", data, err)
	}

	if n := len(resumes.Events()); n != 0 {
		t.Errorf("RESUME subscription got %d events, want 0", n)
	}
	var names []string
	for len(all.Events()) > 0 {
		names = append(names, (<-all.Events()).Name)
	}
	if want := []string{"STOP", "BLOCK_JOB_READY"}; !slices.Equal(names, want) {
		t.Errorf("catch-all subscription got %q, want %q", names, want)
	}
}

func TestEventsNeedNotBeOnePerLine(t *testing.T) {
	c, srv := qmptest.NewClient(t)
	sub := c.Subscribe()
	for _, chunk := range []string{
		`{"event": "A", "timestamp": {"seconds": 1, "microseconds": 2}}{"event": "B"}  `,
		`{"event":`,
		"\n\"C\", \"data\": {\"x\":\n1}}\r\n",
	} {
		if err := srv.WriteRaw([]byte(chunk)); err != nil {
			t.Fatal(err)
		}
	}
	ctx := testContext(t)
	var got []string
	for range 3 {
		ev, err := sub.Wait(ctx, nil)
		if err != nil {
			t.Fatalf("Wait: %v", err)
		}
		got = append(got, ev.Name+string(ev.Data))
		if ev.Name == "A" && !ev.Time.Equal(time.Unix(1, 2000)) {
			t.Errorf("A.Time = %v, want 1.000002s after the epoch", ev.Time)
		}
	}
	if want := []string{"A", "B", `C{"x":1}`}; !slices.Equal(got, want) {
		t.Errorf("events = %q, want %q", got, want)
	}
	if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Errorf("query-status after the events: %v", err)
	}
}

func TestCloseMidCommand(t *testing.T) {
	c, srv := qmptest.NewClient(t)
	g := srv.Hold("xen-save-devices-state")
	ctx := testContext(t)
	errc := executeAsync(ctx, c, "xen-save-devices-state", map[string]any{"filename": "/tmp/x", "live": false}, nil)
	<-g.Arrived()
	srv.Close()
	err := receive(t, errc, "Execute to fail")
	if !errors.Is(err, qmp.ErrClosed) || !errors.Is(err, io.EOF) {
		t.Fatalf("Execute error = %v, want ErrClosed wrapping EOF", err)
	}
	if got, want := err.Error(), "qmp: xen-save-devices-state: connection closed: EOF"; got != want {
		t.Errorf("error = %q, want %q", got, want)
	}
	waitClosed(t, c.Done(), "Done")
	if got, want := fmt.Sprint(c.Err()), "qmp: connection closed: EOF"; got != want {
		t.Errorf("Err() = %q, want %q", got, want)
	}
	if err := c.Execute(ctx, "cont", nil, nil); !errors.Is(err, qmp.ErrClosed) || err.Error() != "qmp: cont: connection closed: EOF" {
		t.Errorf("Execute after EOF = %v, want ErrClosed", err)
	}
}

func TestClose(t *testing.T) {
	c, srv := qmptest.NewClient(t)
	sub := c.Subscribe("STOP")
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	waitClosed(t, c.Done(), "Done")
	waitClosed(t, srv.Done(), "the server to see the connection closed")
	ctx := testContext(t)
	err := c.Execute(ctx, "query-status", nil, nil)
	if !errors.Is(err, qmp.ErrClosed) || err.Error() != "qmp: query-status: connection closed: closed by client" {
		t.Errorf("Execute after Close = %v", err)
	}
	for _, s := range []*qmp.Subscription{sub, c.Subscribe("RESUME")} {
		if _, err := s.Wait(ctx, nil); !errors.Is(err, qmp.ErrClosed) {
			t.Errorf("Wait after Close = %v, want ErrClosed", err)
		}
	}
}

func TestSubscriptionClose(t *testing.T) {
	c, srv := qmptest.NewClient(t)
	closed, open := c.Subscribe("STOP"), c.Subscribe("STOP")
	closed.Close()
	closed.Close()
	ctx := testContext(t)
	if _, err := closed.Wait(ctx, nil); err == nil || errors.Is(err, qmp.ErrClosed) || !strings.Contains(err.Error(), "qmp: wait for STOP: subscription closed") {
		t.Errorf("Wait on a closed subscription = %v", err)
	}
	// Events after Close go to the open subscription only (and must not
	// panic by sending on the closed channel).
	if err := srv.Event("STOP", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := open.Wait(ctx, nil); err != nil {
		t.Errorf("Wait on the open subscription: %v", err)
	}
}

func TestWaitMatchAndContext(t *testing.T) {
	c, srv := qmptest.NewClient(t)
	sub := c.Subscribe("MIGRATION")
	for _, st := range []string{"setup", "active", "completed"} {
		if err := srv.Event("MIGRATION", map[string]string{"status": st}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := testContext(t)
	ev, err := sub.Wait(ctx, func(ev qmp.Event) bool {
		var d struct{ Status string }
		return ev.DecodeData(&d) == nil && d.Status == "completed"
	})
	if err != nil || compactJSON(t, ev.Data) != `{"status":"completed"}` {
		t.Fatalf("Wait = %+v, %v; want the completed event", ev, err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := sub.Wait(cctx, nil); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "qmp: wait for MIGRATION") {
		t.Errorf("Wait with a cancelled context = %v", err)
	}
}

func TestSlowSubscriberDoesNotBlockReplies(t *testing.T) {
	logger, logs := newLogger()
	c, srv := qmptest.NewClient(t, qmptest.WithClientOptions(qmp.WithEventBuffer(2), qmp.WithLogger(logger)))
	stuck := c.Subscribe()       // never read
	other := c.Subscribe("STOP") // not interested in these events
	const events = 10
	for i := range events {
		if err := srv.Event("RTC_CHANGE", map[string]int{"offset": i}); err != nil {
			t.Fatal(err)
		}
	}
	// The reply comes after the events on the stream, so once Execute
	// returns all of them have been dispatched.
	if err := c.Execute(testContext(t), "query-status", nil, nil); err != nil {
		t.Fatalf("query-status behind a stuck subscriber: %v", err)
	}
	if got := stuck.Dropped(); got != events-2 {
		t.Errorf("stuck.Dropped() = %d, want %d", got, events-2)
	}
	if got := other.Dropped(); got != 0 {
		t.Errorf("other.Dropped() = %d, want 0", got)
	}
	if got := c.Dropped(); got != events-2 {
		t.Errorf("client Dropped() = %d, want %d", got, events-2)
	}
	// Logged on the 1st, 2nd, 4th and 8th drop.
	warns := logs.find(slog.LevelWarn, "not keeping up")
	if len(warns) != 4 || !strings.Contains(warns[3], "event=RTC_CHANGE dropped=8 buffer=2") {
		t.Errorf("warnings = %q, want 4, the last with dropped=8", warns)
	}
	// The buffered events are the first two, in order.
	for i := range 2 {
		var d struct{ Offset int }
		if err := (<-stuck.Events()).DecodeData(&d); err != nil || d.Offset != i {
			t.Errorf("buffered event %d: offset %d, %v", i, d.Offset, err)
		}
	}
}

func TestConcurrentExecute(t *testing.T) {
	c, srv := qmptest.NewClient(t, qmptest.WithConcurrentReplies())
	srv.SetHandler(func(cmd string, args json.RawMessage) (any, *qmp.Error) {
		if cmd == "fail" {
			return nil, &qmp.Error{Class: "GenericError", Desc: string(args)}
		}
		return args, nil
	})
	const workers, each = 32, 20
	ctx := testContext(t)
	errc := make(chan error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				n := w*each + i
				if n%7 == 0 {
					err := c.Execute(ctx, "fail", map[string]int{"n": n}, nil)
					var qe *qmp.Error
					if !errors.As(err, &qe) || qe.Desc != fmt.Sprintf(`{"n":%d}`, n) {
						errc <- fmt.Errorf("fail %d: got %v", n, err)
						return
					}
					continue
				}
				var got struct{ N int }
				if err := c.Execute(ctx, fmt.Sprintf("echo-%d", n), map[string]int{"n": n}, &got); err != nil {
					errc <- fmt.Errorf("echo %d: %w", n, err)
					return
				}
				if got.N != n {
					errc <- fmt.Errorf("echo %d got the reply to %d", n, got.N)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if got := len(srv.Commands()); got != workers*each+1 {
		t.Errorf("server received %d commands, want %d", got, workers*each+1)
	}
}

func TestRepliesOutOfOrder(t *testing.T) {
	c, srv := qmptest.NewClient(t, qmptest.WithConcurrentReplies())
	srv.Enqueue("slow", qmptest.Reply{Return: "slow"})
	srv.Enqueue("fast", qmptest.Reply{Return: "fast"})
	g := srv.Hold("slow")
	ctx := testContext(t)
	var slow string
	slowErr := executeAsync(ctx, c, "slow", nil, &slow)
	<-g.Arrived()
	var fast string
	if err := c.Execute(ctx, "fast", nil, &fast); err != nil || fast != "fast" {
		t.Fatalf("fast = %q, %v", fast, err)
	}
	g.Release()
	if err := receive(t, slowErr, "slow"); err != nil || slow != "slow" {
		t.Fatalf("slow = %q, %v", slow, err)
	}
}

func TestStrayRepliesAreDropped(t *testing.T) {
	logger, logs := newLogger()
	c, srv := qmptest.NewClient(t, qmptest.WithClientOptions(qmp.WithLogger(logger)))
	for _, raw := range []string{
		`{"return": {}, "id": 4242}`,
		`{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'json'"}}`,
		`{"return": {}, "id": "not-ours"}`,
		`{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}`,
	} {
		if err := srv.WriteRaw([]byte(raw + "\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	var st struct{ Status string }
	if err := c.Execute(testContext(t), "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Fatalf("query-status after stray replies = %+v, %v", st, err)
	}
	warns := logs.find(slog.LevelWarn, "qmp: ")
	if len(warns) != 4 {
		t.Fatalf("warnings = %q, want 4", warns)
	}
	for i, want := range []string{"id=4242", "class=GenericError", `id="not-ours"`, "second greeting"} {
		if !strings.Contains(warns[i], want) {
			t.Errorf("warning %d = %q, want it to mention %s", i, warns[i], want)
		}
	}
}

// TestWriteHonoursContext plays a QEMU that stops reading its socket: the
// command cannot be written, Execute gives up with the context's error, and
// the connection stays usable because not a byte was sent.
func TestWriteHonoursContext(t *testing.T) {
	serverEnd, clientEnd := net.Pipe()
	t.Cleanup(func() { serverEnd.Close() })
	type result struct {
		line string
		err  error
	}
	// The fake's side runs in a goroutine that reports back on channels.
	greeted := make(chan error, 1)
	go func() {
		_, err := serverEnd.Write([]byte(`{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""}, "capabilities": []}}` + "\r\n"))
		greeted <- err
	}()
	answer := func() <-chan result { // read one command, reply {} to it
		ch := make(chan result, 1)
		go func() {
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			err := json.NewDecoder(serverEnd).Decode(&req)
			if err == nil {
				_, err = fmt.Fprintf(serverEnd, `{"return": {}, "id": %s}`+"\r\n", req.ID)
			}
			ch <- result{req.Execute, err}
		}()
		return ch
	}
	first := answer()
	ctx := testContext(t)
	c, err := qmp.New(ctx, clientEnd)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	if err := receive(t, greeted, "greeting"); err != nil {
		t.Fatal(err)
	}
	if r := receive(t, first, "qmp_capabilities"); r.err != nil || r.line != "qmp_capabilities" {
		t.Fatalf("server read %q, %v", r.line, r.err)
	}

	// Nobody reads now.
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	err = c.Execute(short, "stop", nil, nil)
	if !errors.Is(err, context.DeadlineExceeded) || err.Error() != "qmp: stop: not sent: context deadline exceeded" {
		t.Fatalf("Execute to a peer that does not read = %v", err)
	}
	if c.Err() != nil {
		t.Fatalf("client closed after an unsent command: %v", c.Err())
	}

	// Reading resumes: the next command goes through.
	next := answer()
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatalf("cont after the failed write: %v", err)
	}
	if r := receive(t, next, "cont"); r.err != nil || r.line != "cont" {
		t.Fatalf("server read %q, %v", r.line, r.err)
	}
}

func TestDialUnix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	srv := qmptest.ListenUnix(t, path)
	ctx := testContext(t)
	c, err := qmp.Dial(ctx, path)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if got := srv.CommandNames(); !slices.Equal(got, []string{"qmp_capabilities", "stop"}) {
		t.Errorf("server received %q", got)
	}

	missing := filepath.Join(t.TempDir(), "absent.sock")
	if _, err := qmp.Dial(ctx, missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("Dial of a missing socket = %v, want an error naming %s", err, missing)
	}
}

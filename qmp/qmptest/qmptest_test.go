package qmptest_test

import (
	"bufio"
	"encoding/json"
	"net"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/qmp/qmptest"
)

// rawPeer speaks to the fake line by line, as a minimal QMP client would.
type rawPeer struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func newRawPeer(t *testing.T, conn net.Conn) *rawPeer {
	t.Helper()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawPeer{t: t, conn: conn, r: bufio.NewReader(conn)}
}

// send writes line and a newline.
func (p *rawPeer) send(line string) {
	p.t.Helper()
	if _, err := p.conn.Write([]byte(line + "\n")); err != nil {
		p.t.Fatalf("send %s: %v", line, err)
	}
}

// recv reads one line and checks it is CRLF-terminated JSON.
func (p *rawPeer) recv() string {
	p.t.Helper()
	line, err := p.r.ReadString('\n')
	if err != nil {
		p.t.Fatalf("read: %v", err)
	}
	if len(line) < 2 || line[len(line)-2] != '\r' {
		p.t.Errorf("line %q does not end in CRLF", line)
	}
	line = line[:len(line)-2]
	if !json.Valid([]byte(line)) {
		p.t.Fatalf("line %q is not JSON", line)
	}
	return line
}

// expect reads one line and compares it, as JSON, with want.
func (p *rawPeer) expect(want string) {
	p.t.Helper()
	got := p.recv()
	var g, w any
	json.Unmarshal([]byte(got), &g)
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		p.t.Fatalf("bad expectation %s: %v", want, err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if string(gb) != string(wb) {
		p.t.Errorf("got  %s\nwant %s", got, want)
	}
}

func TestNegotiationAndRequestChecks(t *testing.T) {
	srv, conn := qmptest.NewPipe(t, qmptest.WithVersion(qmp.Version{Major: 7, Minor: 2, Micro: 22, Package: "pkg"}, "oob"))
	p := newRawPeer(t, conn)
	p.expect(`{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "pkg"}, "capabilities": ["oob"]}}`)
	for _, step := range []struct{ send, want string }{
		{`{"execute": "query-status", "id": 1}`, `{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`},
		{`{"execute": "qmp_capabilities", "id": "a"}`, `{"return": {}, "id": "a"}`},
		{`{"execute": "qmp_capabilities", "id": 3}`, `{"id": 3, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}`},
		{`{"execute": "query-status", "id": {"x": [1]}}`, `{"return": {"status": "running", "singlestep": false, "running": true}, "id": {"x": [1]}}`},
		{`{"execute": "query-status"}`, `{"return": {"status": "running", "singlestep": false, "running": true}}`},
		{`{"execute": "query-status", "arguments": null, "id": 5}`, `{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}`},
		{`{"id": 6}`, `{"id": 6, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}`},
		{`{"execute": "nope", "id": 7}`, `{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}`},
		{`{"execute": "query-version", "id": 8}`, `{"return": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "pkg"}, "id": 8}`},
	} {
		p.send(step.send)
		p.expect(step.want)
	}
	want := []string{"query-status", "qmp_capabilities", "qmp_capabilities", "query-status", "query-status", "query-status", "", "nope", "query-version"}
	if got := srv.CommandNames(); !slices.Equal(got, want) {
		t.Errorf("CommandNames() = %q, want %q", got, want)
	}
	if got := srv.Commands()[1]; string(got.ID) != `"a"` || got.Args != nil {
		t.Errorf("Commands()[1] = %+v", got)
	}
}

func TestDefaultHandlerRunState(t *testing.T) {
	clock := func() time.Time { return time.Unix(1795423054, 313043000) }
	_, conn := qmptest.NewPipe(t, qmptest.WithClock(clock))
	p := newRawPeer(t, conn)
	p.recv()
	p.send(`{"execute": "qmp_capabilities", "id": 0}`)
	p.expect(`{"return": {}, "id": 0}`)
	// Like QEMU, STOP and RESUME come before the return, and only when the
	// run state changes.
	for _, step := range []struct {
		send string
		want []string
	}{
		{`{"execute": "stop", "id": 1}`, []string{`{"timestamp": {"seconds": 1795423054, "microseconds": 313043}, "event": "STOP"}`, `{"return": {}, "id": 1}`}},
		{`{"execute": "stop", "id": 2}`, []string{`{"return": {}, "id": 2}`}},
		{`{"execute": "query-status", "id": 3}`, []string{`{"return": {"status": "paused", "singlestep": false, "running": false}, "id": 3}`}},
		{`{"execute": "cont", "id": 4}`, []string{`{"timestamp": {"seconds": 1795423054, "microseconds": 313043}, "event": "RESUME"}`, `{"return": {}, "id": 4}`}},
	} {
		p.send(step.send)
		for _, w := range step.want {
			p.expect(w)
		}
	}
}

func TestHoldScriptAndEvents(t *testing.T) {
	srv, conn := qmptest.NewPipe(t, qmptest.WithClock(func() time.Time { return time.Unix(5, 6000) }))
	p := newRawPeer(t, conn)
	p.recv()
	p.send(`{"execute": "qmp_capabilities", "id": 0}`)
	p.expect(`{"return": {}, "id": 0}`)

	srv.Enqueue("x", qmptest.Reply{Return: []int{1}})
	srv.Enqueue("x", qmptest.Reply{Error: &qmp.Error{Class: "GenericError", Desc: "second"}})
	g := srv.Hold("x")
	p.send(`{"execute": "x", "arguments": {"a": 1}, "id": 1}`)
	p.send(`{"execute": "x", "id": 2}`)
	<-g.Arrived()
	if got := g.Command(); got.Name != "x" || string(got.Args) != `{"a": 1}` || string(got.ID) != "1" {
		t.Errorf("held command = %+v", got)
	}
	// Nothing is answered while x is held; an event still goes out. Over
	// net.Pipe a write completes only as the peer reads it, so emit it from
	// another goroutine.
	evErr := make(chan error, 1)
	go func() { evErr <- srv.Event("MIGRATION", map[string]string{"status": "active"}) }()
	p.expect(`{"event": "MIGRATION", "data": {"status": "active"}, "timestamp": {"seconds": 5, "microseconds": 6}}`)
	if err := <-evErr; err != nil {
		t.Fatalf("Event: %v", err)
	}
	g.Release()
	g.Release()
	p.expect(`{"return": [1], "id": 1}`)
	p.expect(`{"id": 2, "error": {"class": "GenericError", "desc": "second"}}`)
	// The script is used up: the handler answers again.
	p.send(`{"execute": "x", "id": 3}`)
	p.expect(`{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}`)

	rawErr := make(chan error, 1)
	go func() { rawErr <- srv.WriteRaw([]byte("raw bytes\n")) }()
	if line, _ := p.r.ReadString('\n'); line != "raw bytes\n" {
		t.Errorf("WriteRaw arrived as %q", line)
	}
	if err := <-rawErr; err != nil {
		t.Fatalf("WriteRaw: %v", err)
	}

	srv.Close()
	<-srv.Done()
	if err := srv.Event("STOP", nil); err == nil {
		t.Errorf("Event after Close succeeded")
	}
}

func TestCloseWhileHeld(t *testing.T) {
	srv, conn := qmptest.NewPipe(t)
	p := newRawPeer(t, conn)
	p.recv()
	g := srv.Hold("qmp_capabilities")
	p.send(`{"execute": "qmp_capabilities", "id": 0}`)
	<-g.Arrived()
	srv.Close() // must not wait for the release
	if _, err := p.r.ReadString('\n'); err == nil {
		t.Errorf("read after Close succeeded")
	}
}

func TestListenUnix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	srv := qmptest.ListenUnix(t, path)
	if err := srv.Event("STOP", nil); err != qmptest.ErrNotConnected {
		t.Errorf("Event before a client connected = %v, want ErrNotConnected", err)
	}
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	p := newRawPeer(t, conn)
	p.recv()
	<-srv.Connected()
	p.send(`{"execute": "qmp_capabilities", "id": 0}`)
	p.expect(`{"return": {}, "id": 0}`)
	conn.Close()
	<-srv.Done()
}

func TestListenUnixClosedBeforeAnyClient(t *testing.T) {
	srv := qmptest.ListenUnix(t, filepath.Join(t.TempDir(), "qmp.sock"))
	srv.Close()
	<-srv.Done()
}

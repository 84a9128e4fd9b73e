package netbuffer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ioTimeout bounds every wait in these tests; nothing should come close.
const ioTimeout = 10 * time.Second

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// peer is the test's end of a stream-format connection: the fake QEMU on
// the guest side, or the fake network on the host side.
type peer struct {
	t    testing.TB
	conn net.Conn
	fr   *FrameReader
}

func newPeer(t testing.TB, c net.Conn) *peer {
	t.Cleanup(func() { c.Close() })
	return &peer{t: t, conn: c, fr: NewFrameReader(c)}
}

func (p *peer) send(frame []byte) {
	p.t.Helper()
	p.conn.SetWriteDeadline(time.Now().Add(ioTimeout))
	if err := WriteFrame(p.conn, frame); err != nil {
		p.t.Fatalf("send frame: %v", err)
	}
}

// recv returns the next frame, failing the test after ioTimeout.
func (p *peer) recv() []byte {
	p.t.Helper()
	f, err := p.recvErr()
	if err != nil {
		p.t.Fatalf("receive frame: %v", err)
	}
	return f
}

func (p *peer) recvErr() ([]byte, error) {
	p.conn.SetReadDeadline(time.Now().Add(ioTimeout))
	f, err := p.fr.ReadFrame()
	return bytes.Clone(f), err
}

// socketPair returns the two ends of a connected unix stream socket.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

// running is a Relay under test.
type running struct {
	relay *Relay
	guest *peer // the fake QEMU
	stop  context.CancelFunc
	done  chan error
}

// wait returns Run's result, failing the test if it takes longer than
// ioTimeout.
func (r *running) wait(t testing.TB) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		return err
	case <-time.After(ioTimeout):
		t.Fatalf("Run did not return within %v", ioTimeout)
		return nil
	}
}

// startRelay runs a Relay between a guest connection accepted the way
// QEMU's is (ListenUnix, AcceptGuest) and host.
func startRelay(t testing.TB, host FramePort) *running {
	t.Helper()
	return startRelayWith(t, host)
}

// startRelayWith is startRelay with options for the Relay.
func startRelayWith(t testing.TB, host FramePort, opts ...Option) *running {
	t.Helper()
	ln, err := ListenUnix(filepath.Join(t.TempDir(), "guest.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	qemu, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	acceptCtx, acceptCancel := context.WithTimeout(ctx, ioTimeout)
	defer acceptCancel()
	guest, err := AcceptGuest(acceptCtx, ln)
	if err != nil {
		t.Fatal(err)
	}
	r := &running{relay: NewRelay(guest, host, testLogger(t), opts...), guest: newPeer(t, qemu), stop: cancel, done: make(chan error, 1)}
	go func() { r.done <- r.relay.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-r.done
	})
	return r
}

// startStreamRelay runs a Relay whose host side is a StreamPort; it returns
// the test's end of the host side too.
func startStreamRelay(t testing.TB) (*running, *peer) {
	t.Helper()
	a, b := socketPair(t)
	return startRelay(t, NewStreamPort(a)), newPeer(t, b)
}

func TestRelayCopiesBothWays(t *testing.T) {
	r, host := startStreamRelay(t)
	out := [][]byte{[]byte("frame one"), bytes.Repeat([]byte{1}, 1514), bytes.Repeat([]byte{2}, MaxFrameSize)}
	in := [][]byte{[]byte("reply"), bytes.Repeat([]byte{3}, 60)}

	for i, f := range out {
		r.guest.send(f)
		if got := host.recv(); !bytes.Equal(got, f) {
			t.Fatalf("outbound frame %d: host got %d bytes, want %d", i, len(got), len(f))
		}
	}
	for _, f := range in {
		host.send(f)
	}
	for i, want := range in {
		if got := r.guest.recv(); !bytes.Equal(got, want) {
			t.Fatalf("inbound frame %d: guest got %q, want %q", i, got, want)
		}
	}
	_ = r.relay.Stats() // concurrently with Run, for the race detector

	r.stop()
	if err := r.wait(t); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run after cancel = %v, want context.Canceled", err)
	}
	want := Stats{
		Outbound: FlowStats{Frames: 3, Bytes: uint64(9 + 1514 + MaxFrameSize)},
		Inbound:  FlowStats{Frames: 2, Bytes: 5 + 60},
	}
	if got := r.relay.Stats(); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}
	// Run closed both sides.
	if _, err := host.recvErr(); err != io.EOF {
		t.Fatalf("host side after Run: %v, want io.EOF", err)
	}
	if _, err := r.guest.recvErr(); err != io.EOF {
		t.Fatalf("guest side after Run: %v, want io.EOF", err)
	}
}

func TestRelayGuestDisconnect(t *testing.T) {
	r, host := startStreamRelay(t)
	r.guest.send([]byte("last words"))
	if got := host.recv(); string(got) != "last words" {
		t.Fatalf("host got %q", got)
	}
	r.guest.conn.Close()

	err := r.wait(t)
	if !errors.Is(err, ErrGuestDisconnected) {
		t.Fatalf("Run = %v, want ErrGuestDisconnected", err)
	}
	var re *RelayError
	if !errors.As(err, &re) || re.Side != SideGuest || re.Op != "read" || re.Dir != Outbound || !re.GuestDisconnected {
		t.Fatalf("Run = %#v, want a RelayError for a read from the guest, outbound", err)
	}
	if !strings.Contains(err.Error(), "guest disconnected") {
		t.Fatalf("error %q does not say the guest disconnected", err)
	}
	if s := r.relay.Stats(); s.Outbound.Frames != 1 {
		t.Fatalf("Stats = %+v, want one outbound frame", s)
	}
	if _, err := host.recvErr(); err != io.EOF {
		t.Fatalf("host side after Run: %v, want io.EOF (closed)", err)
	}
}

func TestRelayBadFramesFromGuest(t *testing.T) {
	tests := []struct {
		name         string
		bytes        []byte
		closeAfter   bool
		want         error
		disconnected bool
		text         string
	}{
		{"oversized length", []byte{0xff, 0xff, 0xff, 0xff, 1, 2, 3}, false, ErrFrameTooLarge, false, "exceeds MaxFrameSize"},
		{"just over the cap", append(lenPrefix(MaxFrameSize+1), 0), false, ErrFrameTooLarge, false, "length 69633"},
		{"zero length", append(lenPrefix(0), "xyz"...), false, ErrEmptyFrame, false, "zero-length"},
		{"cut mid-frame", append(lenPrefix(100), "only ten b"...), true, io.ErrUnexpectedEOF, true, "guest disconnected"},
		{"cut mid-prefix", []byte{0, 0}, true, io.ErrUnexpectedEOF, true, "guest disconnected"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _ := startStreamRelay(t)
			if _, err := r.guest.conn.Write(tt.bytes); err != nil {
				t.Fatal(err)
			}
			if tt.closeAfter {
				r.guest.conn.Close()
			}
			err := r.wait(t)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Run = %v, want %v", err, tt.want)
			}
			if errors.Is(err, ErrGuestDisconnected) != tt.disconnected {
				t.Fatalf("Run = %v: ErrGuestDisconnected match %v, want %v", err, !tt.disconnected, tt.disconnected)
			}
			var re *RelayError
			if !errors.As(err, &re) || re.Side != SideGuest || re.Op != "read" {
				t.Fatalf("Run = %v, want a RelayError for a read from the guest", err)
			}
			if msg := err.Error(); !strings.Contains(msg, "read from guest") || !strings.Contains(msg, tt.text) {
				t.Fatalf("error %q should name the guest read and contain %q", msg, tt.text)
			}
			if s := r.relay.Stats(); s.Outbound.Frames != 0 {
				t.Fatalf("Stats = %+v, want no frames", s)
			}
		})
	}
}

func TestRelayHostFails(t *testing.T) {
	r, host := startStreamRelay(t)
	host.conn.Close()
	err := r.wait(t)
	var re *RelayError
	if !errors.As(err, &re) || re.Side != SideHost || re.Op != "read" || re.Dir != Inbound {
		t.Fatalf("Run = %v, want a RelayError for a read from the host side, inbound", err)
	}
	if errors.Is(err, ErrGuestDisconnected) {
		t.Fatalf("Run = %v: a host failure reported as a guest disconnect", err)
	}
	if !strings.Contains(err.Error(), "inbound (host to guest): read from host") {
		t.Fatalf("error %q does not name the direction and side", err)
	}
	if _, err := r.guest.recvErr(); err != io.EOF {
		t.Fatalf("guest side after Run: %v, want io.EOF (closed)", err)
	}
}

func TestRelayCancelStopsRun(t *testing.T) {
	r, _ := startStreamRelay(t)
	start := time.Now()
	r.stop()
	if err := r.wait(t); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Run took %v to stop after cancel", d)
	}
}

func TestRelayRunOnce(t *testing.T) {
	a, b := socketPair(t)
	defer b.Close()
	c, d := socketPair(t)
	defer d.Close()
	r := NewRelay(a, NewStreamPort(c), nil)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := r.Run(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run with a done ctx = %v, want context.Canceled", err)
	}
	if err := r.Run(t.Context()); err == nil || !strings.Contains(err.Error(), "more than once") {
		t.Fatalf("second Run = %v, want an error", err)
	}
}

// rejectingPort refuses frames that start with 0xee, as a tap refuses
// runt frames.
type rejectingPort struct{ *StreamPort }

func (p rejectingPort) WriteFrame(f []byte) error {
	if f[0] == 0xee {
		return ErrFrameRejected
	}
	return p.StreamPort.WriteFrame(f)
}

func TestRelayDropsRejectedFrames(t *testing.T) {
	a, b := socketPair(t)
	r := startRelay(t, rejectingPort{NewStreamPort(a)})
	host := newPeer(t, b)
	r.guest.send([]byte{0xee, 1})
	r.guest.send([]byte("passes"))
	if got := host.recv(); string(got) != "passes" {
		t.Fatalf("host got %q, want the frame after the rejected one", got)
	}
	r.stop()
	r.wait(t)
	want := FlowStats{Frames: 1, Bytes: 6, Dropped: 1}
	if got := r.relay.Stats().Outbound; got != want {
		t.Fatalf("outbound stats = %+v, want %+v", got, want)
	}
}

func TestAcceptGuestCancel(t *testing.T) {
	ln, err := ListenUnix(filepath.Join(t.TempDir(), "g.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	ctx, cancel := context.WithCancel(t.Context())
	res := make(chan error, 1)
	go func() {
		c, err := AcceptGuest(ctx, ln)
		if c != nil {
			c.Close()
		}
		res <- err
	}()
	cancel()
	select {
	case err := <-res:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("AcceptGuest after cancel = %v, want context.Canceled", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("cancel did not unblock AcceptGuest")
	}

	// The listener is still usable, its deadline cleared.
	qemu, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer qemu.Close()
	ctx2, cancel2 := context.WithTimeout(t.Context(), ioTimeout)
	defer cancel2()
	c, err := AcceptGuest(ctx2, ln)
	if err != nil {
		t.Fatalf("AcceptGuest after an earlier cancel: %v", err)
	}
	c.Close()

	if _, err := AcceptGuest(ctx, ln); !errors.Is(err, context.Canceled) {
		t.Fatalf("AcceptGuest with a done ctx = %v, want context.Canceled", err)
	}
}

// plainListener hides the listener's SetDeadline.
type plainListener struct{ net.Listener }

func TestAcceptGuestCancelClosesPlainListener(t *testing.T) {
	ul, err := ListenUnix(filepath.Join(t.TempDir(), "g.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	ctx, cancel := context.WithCancel(t.Context())
	res := make(chan error, 1)
	go func() {
		_, err := AcceptGuest(ctx, plainListener{ul})
		res <- err
	}()
	cancel()
	select {
	case err := <-res:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("AcceptGuest = %v, want context.Canceled", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("cancel did not unblock AcceptGuest")
	}
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()

	t.Run("stale socket replaced", func(t *testing.T) {
		path := filepath.Join(dir, "stale.sock")
		old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		old.SetUnlinkOnClose(false)
		old.Close()
		ln, err := ListenUnix(path)
		if err != nil {
			t.Fatalf("ListenUnix over a stale socket: %v", err)
		}
		ln.Close()
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("socket file after Close: %v, want it removed", err)
		}
	})
	t.Run("live socket kept", func(t *testing.T) {
		path := filepath.Join(dir, "live.sock")
		live, err := ListenUnix(path)
		if err != nil {
			t.Fatal(err)
		}
		defer live.Close()
		if ln, err := ListenUnix(path); err == nil {
			ln.Close()
			t.Fatal("ListenUnix took over a socket someone listens on")
		} else if !strings.Contains(err.Error(), "another process is listening") {
			t.Fatalf("error %q", err)
		}
	})
	t.Run("regular file kept", func(t *testing.T) {
		path := filepath.Join(dir, "file")
		if err := os.WriteFile(path, []byte("data"), 0o600); err != nil {
			t.Fatal(err)
		}
		if ln, err := ListenUnix(path); err == nil {
			ln.Close()
			t.Fatal("ListenUnix replaced a regular file")
		}
		if b, err := os.ReadFile(path); err != nil || string(b) != "data" {
			t.Fatalf("file after ListenUnix: %q, %v", b, err)
		}
	})
}

func TestRelayErrorText(t *testing.T) {
	err := &RelayError{Dir: Inbound, Side: SideGuest, Op: "write", GuestDisconnected: true, Err: unix.EPIPE}
	if got, want := err.Error(), "netbuffer: relay inbound (host to guest): write to guest: guest disconnected: broken pipe"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(err, unix.EPIPE) || !errors.Is(err, ErrGuestDisconnected) {
		t.Fatal("RelayError does not unwrap to its cause and ErrGuestDisconnected")
	}
}

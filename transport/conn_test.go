package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// connPair returns two Conns joined by net.Pipe, closed when the test ends.
func connPair(t *testing.T) (a, b *Conn) {
	t.Helper()
	c1, c2 := net.Pipe()
	a, b = NewConn(c1), NewConn(c2)
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// recvAll receives n frames in a goroutine and delivers them, or the first
// error, on the returned channel.
func recvAll(ctx context.Context, c *Conn, n int) <-chan any {
	out := make(chan any, 1)
	go func() {
		var frames []Frame
		for range n {
			f, err := c.Recv(ctx)
			if err != nil {
				out <- err
				return
			}
			frames = append(frames, f)
		}
		out <- frames
	}()
	return out
}

func gotFrames(t *testing.T, ch <-chan any) []Frame {
	t.Helper()
	switch v := (<-ch).(type) {
	case error:
		t.Fatalf("recv: %v", v)
	case []Frame:
		return v
	}
	return nil
}

func TestConnExchange(t *testing.T) {
	a, b := connPair(t)
	ctx := t.Context()
	toB := []Message{
		Hello{Version: 1, Role: RolePrimary, VMName: "vm", RAMSize: 1 << 20, PageSize: PageSize},
		RAMPages{Pages: pages(0, 1, MaxPagesPerFrame, 1)},
		RAMPages{Pages: pages(300, 2, 3, 1)},
		DeviceState{Total: 4, Data: []byte("dev!")},
		Commit{PageCount: MaxPagesPerFrame + 3, DeviceStateLen: 4},
	}
	toA := []Message{
		Hello{Version: 1, Role: RoleBackup, VMName: "vm", RAMSize: 1 << 20, PageSize: PageSize},
		Heartbeat{SentUnixNano: 5},
		Ack{},
	}
	atB, atA := recvAll(ctx, b, len(toB)), recvAll(ctx, a, len(toA))
	sendErr := make(chan error, 2)
	send := func(c *Conn, msgs []Message) {
		for _, m := range msgs {
			if err := c.SendMessage(ctx, 1, m); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}
	go send(a, toB)
	go send(b, toA)
	for range 2 {
		if err := <-sendErr; err != nil {
			t.Fatal(err)
		}
	}
	for _, dir := range []struct {
		got  []Frame
		want []Message
	}{{gotFrames(t, atB), toB}, {gotFrames(t, atA), toA}} {
		for i, f := range dir.got {
			if f.Seq != uint64(i+1) || f.Epoch != 1 {
				t.Errorf("frame %d: seq %d epoch %d, want seq %d epoch 1", i, f.Seq, f.Epoch, i+1)
			}
			m, err := Decode(f)
			if err != nil || !reflect.DeepEqual(m, dir.want[i]) {
				t.Errorf("frame %d: decoded %T (err %v), want %T", i, m, err, dir.want[i])
			}
		}
	}
}

func TestConnConcurrentSenders(t *testing.T) {
	a, b := connPair(t)
	ctx := t.Context()
	const senders, each = 8, 50
	got := recvAll(ctx, b, senders*each)
	errs := make(chan error, senders)
	for g := range senders {
		go func() {
			for i := range each {
				// Alternate small and writev-sized frames.
				var m Message = Heartbeat{SentUnixNano: int64(g), LastCommitted: uint64(i)}
				if i%5 == 0 {
					m = Error{Code: CodeInternal, Message: fmt.Sprintf("%d %d %s", g, i, bytes.Repeat([]byte("x"), 1000))}
				}
				if err := a.SendMessage(ctx, uint64(g), m); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range senders {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	next := make([]int, senders)
	for i, f := range gotFrames(t, got) {
		if f.Seq != uint64(i+1) {
			t.Fatalf("frame %d has seq %d", i, f.Seq)
		}
		g := int(f.Epoch)
		m, err := Decode(f)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		var n int
		switch m := m.(type) {
		case Heartbeat:
			n = int(m.LastCommitted)
		case Error:
			fmt.Sscanf(m.Message, "%d %d", &g, &n)
		}
		if n != next[g] {
			t.Fatalf("sender %d: message %d arrived when %d was due", g, n, next[g])
		}
		next[g]++
	}
}

func TestConnRecvCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := connPair(t)
		ctx, cancel := context.WithCancel(t.Context())
		errc := make(chan error)
		go func() {
			_, err := b.Recv(ctx)
			errc <- err
		}()
		synctest.Wait() // Recv is blocked reading
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("Recv after cancel: %v, want context.Canceled", err)
		}
		// A cancelled Recv leaves the connection usable.
		got := recvAll(t.Context(), b, 1)
		if err := a.SendMessage(t.Context(), 0, Heartbeat{SentUnixNano: 1}); err != nil {
			t.Fatal(err)
		}
		if f := gotFrames(t, got); f[0].Seq != 1 || f[0].Type != TypeHeartbeat {
			t.Errorf("after the cancelled Recv: %v", f[0])
		}
		// So does an already cancelled one, without reading.
		if _, err := b.Recv(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("Recv with a cancelled ctx: %v", err)
		}
	})
}

// TestConnRecvTimeoutMidFrame: a Recv whose deadline passes in the middle
// of a frame returns the ctx error; the next Recv finishes the frame.
func TestConnRecvTimeoutMidFrame(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c1, c2 := net.Pipe()
		b := NewConn(c2)
		defer c1.Close()
		defer b.Close()
		f := mustFrame(t, 9, 1, RAMPages{Pages: pages(4, 1, 2, 6)})
		raw := encodeFrames(f)
		half := len(raw) / 2
		wrote := make(chan error, 1)
		go func() {
			_, err := c1.Write(raw[:half])
			wrote <- err
		}()
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		start := time.Now()
		_, err := b.Recv(ctx)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Recv: %v, want context.DeadlineExceeded", err)
		}
		if waited := time.Since(start); waited != time.Second {
			t.Errorf("Recv returned after %v, want the 1s deadline", waited)
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		go func() {
			_, err := c1.Write(raw[half:])
			wrote <- err
		}()
		got, err := b.Recv(t.Context())
		if err != nil {
			t.Fatalf("Recv after the timeout: %v", err)
		}
		if !sameFrame(got, f) {
			t.Errorf("got %v, want %v", got, f)
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
	})
}

// TestConnSendTimeout: a Send that times out before writing anything keeps
// the connection usable and does not use up a seq.
func TestConnSendTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := connPair(t)
		for _, m := range []Message{Heartbeat{}, RAMPages{Pages: pages(0, 1, 4, 0)}} {
			ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
			err := a.SendMessage(ctx, 3, m) // nobody reads
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrBroken) {
				t.Fatalf("Send %T with nobody reading: %v, want context.DeadlineExceeded", m, err)
			}
		}
		got := recvAll(t.Context(), b, 1)
		if err := a.SendMessage(t.Context(), 3, Ack{}); err != nil {
			t.Fatalf("Send after the timeouts: %v", err)
		}
		if f := gotFrames(t, got); f[0].Seq != 1 || f[0].Type != TypeAck {
			t.Errorf("got %v, want the Ack as seq 1", f[0])
		}
	})
}

// TestConnSendCancel: cancelling a blocked Send interrupts it.
func TestConnSendCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, _ := connPair(t)
		ctx, cancel := context.WithCancel(t.Context())
		errc := make(chan error)
		go func() { errc <- a.SendMessage(ctx, 1, Ack{}) }()
		synctest.Wait()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("Send after cancel: %v, want context.Canceled", err)
		}
		if err := a.SendMessage(ctx, 1, Ack{}); !errors.Is(err, context.Canceled) {
			t.Errorf("Send with a cancelled ctx: %v", err)
		}
	})
}

// TestConnSendPartialWrite: a Send that stops part-way through a frame
// breaks the send side for good.
func TestConnSendPartialWrite(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c1, c2 := net.Pipe()
		a := NewConn(c1)
		defer a.Close()
		defer c2.Close()
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		errc := make(chan error)
		go func() { errc <- a.SendMessage(ctx, 1, RAMPages{Pages: pages(0, 1, 2, 0)}) }()
		if _, err := io.ReadFull(c2, make([]byte, 10)); err != nil {
			t.Fatal(err)
		}
		err := <-errc
		if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrBroken) {
			t.Fatalf("partial Send: %v, want context.DeadlineExceeded and ErrBroken", err)
		}
		if err := a.SendMessage(t.Context(), 1, Ack{}); !errors.Is(err, ErrBroken) {
			t.Fatalf("Send after a partial write: %v, want ErrBroken", err)
		}
	})
}

func TestConnClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := connPair(t)
		errc := make(chan error)
		go func() {
			_, err := b.Recv(t.Context())
			errc <- err
		}()
		synctest.Wait()
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; !errors.Is(err, io.ErrClosedPipe) {
			t.Errorf("Recv interrupted by Close: %v, want io.ErrClosedPipe", err)
		}
		if err := b.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		// The peer sees the end of the stream at a frame boundary.
		if _, err := a.Recv(t.Context()); err != io.EOF {
			t.Errorf("Recv from a closed peer: %v, want io.EOF", err)
		}
	})
}

func TestConnRecvCorrupt(t *testing.T) {
	c1, c2 := net.Pipe()
	b := NewConn(c2)
	defer b.Close()
	go func() {
		c1.Write([]byte("RMUS" + string(rune(Version)) + string(make([]byte, 27))))
		c1.Close()
	}()
	_, err := b.Recv(t.Context())
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Recv: %v, want ErrCorrupt", err)
	}
	if _, err2 := b.Recv(t.Context()); err2 != err {
		t.Errorf("second Recv: %v, want the same error", err2)
	}
}

func TestConnSendRejects(t *testing.T) {
	a, _ := connPair(t) // nobody reads: a write would block
	for _, tt := range []struct {
		name string
		send func() error
		want error
	}{
		{"unknown type", func() error { return a.Send(t.Context(), Frame{Type: 77}) }, ErrUnsupported},
		{"reserved flag", func() error { return a.Send(t.Context(), Frame{Type: TypeAck, Flags: FlagCompressed}) }, ErrUnsupported},
		{"version", func() error { return a.Send(t.Context(), Frame{Version: 9, Type: TypeAck}) }, ErrVersion},
		{"oversized", func() error {
			return a.Send(t.Context(), Frame{Type: TypeDeviceState, Payload: make([]byte, MaxPayload+1)})
		}, ErrTooLarge},
		{"invalid message", func() error { return a.SendMessage(t.Context(), 1, RAMPages{}) }, ErrMalformed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.send(); !errors.Is(err, tt.want) {
				t.Errorf("err %v, want %v", err, tt.want)
			}
		})
	}
}

// TestConnTCPEpoch ships an epoch over loopback TCP from a primary to a
// backup that stages it and acks.
func TestConnTCPEpoch(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("no loopback TCP: %v", err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	const ram = 64 << 20
	epoch := Epoch{Number: 1, Pages: pages(100, 3, 1000, 8), DeviceState: bytes.Repeat([]byte("qemu"), 3<<18)}
	frames, err := epoch.Frames()
	if err != nil {
		t.Fatal(err)
	}

	backup := make(chan error, 1)
	go func() {
		backup <- func() error {
			nc, err := ln.Accept()
			if err != nil {
				return err
			}
			c := NewConn(nc)
			defer c.Close()
			st, err := NewStage(ram, 0)
			if err != nil {
				return err
			}
			for {
				f, err := c.Recv(ctx)
				if err != nil {
					return err
				}
				ep, done, err := st.Add(f)
				if err != nil {
					return err
				}
				if done {
					if ep.Number != epoch.Number || len(ep.Pages) != len(epoch.Pages) || !bytes.Equal(ep.DeviceState, epoch.DeviceState) {
						return fmt.Errorf("staged epoch %d with %d pages, %d bytes of device state", ep.Number, len(ep.Pages), len(ep.DeviceState))
					}
					return c.SendMessage(ctx, ep.Number, Ack{})
				}
			}
		}()
	}()

	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := NewConn(nc)
	defer c.Close()
	for _, f := range frames {
		if err := c.Send(ctx, f); err != nil {
			t.Fatal(err)
		}
	}
	f, err := c.Recv(ctx)
	if err != nil {
		t.Fatalf("waiting for the ack: %v (backup: %v)", err, <-backup)
	}
	if f.Type != TypeAck || f.Epoch != 1 {
		t.Errorf("got %v, want the Ack of epoch 1", f)
	}
	if err := <-backup; err != nil {
		t.Fatalf("backup: %v", err)
	}
}

// TestConnWaitBounded: a Send or Recv queued behind a blocked one gives up
// when its ctx does.
func TestConnWaitBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := connPair(t)
		first := make(chan error, 1)
		go func() { first <- a.SendMessage(context.Background(), 0, Heartbeat{}) }()
		synctest.Wait() // the first Send is blocked: nobody reads yet
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		err := a.SendMessage(ctx, 0, Ack{})
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "waiting for another Send") {
			t.Fatalf("queued Send: %v, want a deadline while waiting", err)
		}
		f, err := b.Recv(t.Context())
		if err != nil || f.Type != TypeHeartbeat || f.Seq != 1 {
			t.Fatalf("Recv: %v, %v; want the first Send's Heartbeat as seq 1", f, err)
		}
		if err := <-first; err != nil {
			t.Fatal(err)
		}

		recvd := make(chan error, 1)
		go func() {
			_, err := a.Recv(context.Background())
			recvd <- err
		}()
		synctest.Wait() // the first Recv is blocked: nothing comes
		err = func() error {
			ctx, cancel := context.WithTimeout(t.Context(), time.Second)
			defer cancel()
			_, err := a.Recv(ctx)
			return err
		}()
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "waiting for another Recv") {
			t.Fatalf("queued Recv: %v, want a deadline while waiting", err)
		}
		a.Close()
		if err := <-recvd; !errors.Is(err, io.ErrClosedPipe) {
			t.Fatalf("first Recv after Close: %v", err)
		}
	})
}

// TestConnShutdownDeliversLastFrame: a side that ends the session while the
// peer is still sending (its frames unread) must still get its last frame
// to the peer, followed by a clean end of stream, not a reset.
func TestConnShutdownDeliversLastFrame(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- nc
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sender := NewConn(nc)
	defer sender.Close()
	bnc, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	ender := NewConn(bnc)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// The sender floods the ender, which reads one frame and then ends the
	// session with an Error while megabytes are still unread.
	stopFlood := make(chan struct{})
	flooded := make(chan error, 1)
	go func() {
		m := RAMPages{Pages: pages(0, 1, 64, 1)}
		for epoch := uint64(1); ; epoch++ {
			select {
			case <-stopFlood:
				flooded <- nil
				return
			default:
			}
			if err := sender.SendMessage(ctx, epoch, m); err != nil {
				flooded <- err // expected once the ender is gone
				return
			}
		}
	}()
	if _, err := ender.Recv(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ender.SendMessage(ctx, 1, Error{Code: CodeEpoch, Message: "epoch 1 damaged"}); err != nil {
		t.Fatal(err)
	}
	shut, cancelShut := context.WithTimeout(ctx, 5*time.Second)
	defer cancelShut()
	shutDone := make(chan error, 1)
	go func() { shutDone <- ender.Shutdown(shut) }()

	f, err := sender.Recv(ctx)
	if err != nil {
		t.Fatalf("the last frame did not arrive: %v", err)
	}
	m, err := Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := m.(Error); !ok || e.Message != "epoch 1 damaged" {
		t.Fatalf("got %#v, want the Error frame", m)
	}
	if _, err := sender.Recv(ctx); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
	close(stopFlood)
	<-flooded
	sender.Close()
	if err := <-shutDone; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

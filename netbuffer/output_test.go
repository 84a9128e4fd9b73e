package netbuffer

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestOutQueue(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	frame := func(s string) []byte { return []byte(s) }
	names := func(fs []heldFrame) []string {
		var out []string
		for _, f := range fs {
			out = append(out, string(f.data))
		}
		return out
	}
	q := outQueue{cap: 1 << 20}

	// Pass-through: ready at once.
	q.add(frame("p1"), at(0))
	if got := names(q.take()); fmt.Sprint(got) != "[p1]" {
		t.Fatalf("pass-through: ready %v", got)
	}
	q.written(2)

	q.hold()
	q.add(frame("a1"), at(0))
	q.add(frame("a2"), at(5))
	if err := q.closeEpoch(1); err != nil {
		t.Fatal(err)
	}
	q.add(frame("b1"), at(30))
	if err := q.closeEpoch(2); err != nil {
		t.Fatal(err)
	}
	q.add(frame("c1"), at(60))
	if len(q.take()) != 0 {
		t.Fatal("a held frame was ready before any commit")
	}
	if f, b := q.held(); f != 4 || b != 8 {
		t.Fatalf("held = %d frames %d bytes, want 4 and 8", f, b)
	}
	if err := q.closeEpoch(2); err == nil {
		t.Fatal("cutting epoch 2 twice was accepted")
	}

	// Commit 1 releases epoch 1 only, with the waits measured.
	r := q.commit(1, at(50))
	if r.Frames != 2 || r.Bytes != 4 || r.WaitP50 != 45*time.Millisecond || r.WaitP99 != 50*time.Millisecond {
		t.Fatalf("commit 1 = %+v", r)
	}
	if got := names(q.take()); fmt.Sprint(got) != "[a1 a2]" {
		t.Fatalf("after commit 1: ready %v", got)
	}
	// Committing an older epoch again releases nothing.
	if r := q.commit(1, at(51)); r.Frames != 0 {
		t.Fatalf("commit 1 again released %d frames", r.Frames)
	}
	// Losing the backup: everything held goes, in order.
	if n := q.passThrough(); n != 2 {
		t.Fatalf("passThrough released %d, want 2", n)
	}
	if got := names(q.take()); fmt.Sprint(got) != "[b1 c1]" {
		t.Fatalf("after passThrough: ready %v", got)
	}
	if q.mode != PassThrough || q.closeEpoch(9) != nil || len(q.cut) != 0 {
		t.Fatal("cut in pass-through mode did something")
	}
	if q.peak != 8 {
		t.Fatalf("peak = %d, want 8", q.peak)
	}
}

func TestOutQueueFullOnlyWhenHolding(t *testing.T) {
	q := outQueue{cap: 10}
	q.add(make([]byte, 20), time.Time{})
	if q.full() {
		t.Fatal("full in pass-through mode")
	}
	q.hold()
	if !q.full() {
		t.Fatal("not full at 20 bytes with a cap of 10")
	}
}

// numbered returns a frame carrying n, padded to size bytes.
func numbered(n uint32, size int) []byte {
	f := make([]byte, max(size, 4))
	binary.BigEndian.PutUint32(f, n)
	return f
}

// recvNumbers reads k frames from p and returns their numbers.
func recvNumbers(t *testing.T, p *peer, k int) []uint32 {
	t.Helper()
	var out []uint32
	for range k {
		out = append(out, binary.BigEndian.Uint32(p.recv()))
	}
	return out
}

// expectNothing fails if p receives a frame within d.
func expectNothing(t *testing.T, p *peer, d time.Duration) {
	t.Helper()
	p.conn.SetReadDeadline(time.Now().Add(d))
	f, err := p.fr.ReadFrame()
	if err == nil {
		t.Fatalf("a held frame (%d bytes, number %d) left before its epoch committed", len(f), binary.BigEndian.Uint32(f))
	}
}

func TestRelayHoldsUntilCommit(t *testing.T) {
	r, host := startStreamRelay(t)
	ctx := t.Context()
	r.relay.Hold()
	for i := range 3 {
		r.guest.send(numbered(uint32(i), 100))
	}
	if err := r.relay.Cut(ctx, 1); err != nil {
		t.Fatal(err)
	}
	r.guest.send(numbered(3, 100))
	expectNothing(t, host, 200*time.Millisecond)
	if st := r.relay.Status(); st.Mode != Holding || st.HeldFrames != 4 || st.HeldBytes != 400 {
		t.Fatalf("Status = %+v, want 4 frames, 400 bytes held", st)
	}

	rel := r.relay.Commit(1)
	if rel.Frames != 3 || rel.Bytes != 300 || rel.WaitP99 < 200*time.Millisecond {
		t.Fatalf("Commit(1) = %+v, want 3 frames held at least 200 ms", rel)
	}
	if got := recvNumbers(t, host, 3); fmt.Sprint(got) != "[0 1 2]" {
		t.Fatalf("released %v", got)
	}
	expectNothing(t, host, 100*time.Millisecond)

	// Inbound frames are never held.
	host.send([]byte("inbound"))
	if got := r.guest.recv(); string(got) != "inbound" {
		t.Fatalf("guest got %q", got)
	}

	// The backup is lost: held frames go, and later ones pass at once.
	r.relay.PassThrough()
	if got := recvNumbers(t, host, 1); got[0] != 3 {
		t.Fatalf("after PassThrough got %v", got)
	}
	r.guest.send(numbered(4, 100))
	if got := recvNumbers(t, host, 1); got[0] != 4 {
		t.Fatalf("pass-through got %v", got)
	}
	if st := r.relay.Status(); st.Mode != PassThrough || st.HeldFrames != 0 {
		t.Fatalf("Status = %+v", st)
	}
}

// TestRelayCutTakesFramesInFlight: frames the guest wrote before the pause
// but which the Relay has not read yet (still in the socket, or a frame
// half written) belong to the epoch being cut, never to the next one.
func TestRelayCutTakesFramesInFlight(t *testing.T) {
	r, host := startStreamRelay(t)
	ctx := t.Context()
	r.relay.Hold()

	// A burst written in one go, larger than the socket buffer so that the
	// Relay is still reading it when the cut comes, then the first half of
	// one more frame.
	const burst = 400
	var wire []byte
	for i := range burst {
		wire, _ = AppendFrame(wire, numbered(uint32(i), 1500))
	}
	last, _ := AppendFrame(nil, numbered(burst, 1500))
	half := len(last) / 2
	wire = append(wire, last[:half]...)
	if _, err := r.guest.conn.Write(wire); err != nil {
		t.Fatal(err)
	}
	// The rest of the half-written frame comes while the cut waits for it,
	// as QEMU finishes a frame from its main loop with the guest paused.
	go func() {
		time.Sleep(100 * time.Millisecond)
		r.guest.conn.Write(last[half:])
	}()
	if n, _ := r.relay.inSocket(); n == 0 {
		t.Log("the Relay had read the whole burst before the cut; the case of bytes left in the socket was not exercised")
	}
	if err := r.relay.Cut(ctx, 1); err != nil {
		t.Fatal(err)
	}
	st := r.relay.Status()
	if st.HeldFrames != burst+1 {
		t.Fatalf("epoch 1 holds %d frames after the cut, want %d (the burst and the half-written frame)", st.HeldFrames, burst+1)
	}
	r.guest.send(numbered(9999, 60)) // epoch 2
	if err := r.relay.Cut(ctx, 2); err != nil {
		t.Fatal(err)
	}
	rel := r.relay.Commit(1)
	if rel.Frames != burst+1 {
		t.Fatalf("Commit(1) released %d frames, want %d", rel.Frames, burst+1)
	}
	got := recvNumbers(t, host, burst+1)
	for i, n := range got {
		if n != uint32(i) {
			t.Fatalf("frame %d released as number %d", i, n)
		}
	}
	expectNothing(t, host, 100*time.Millisecond)
	if rel := r.relay.Commit(2); rel.Frames != 1 {
		t.Fatalf("Commit(2) released %d frames, want 1", rel.Frames)
	}
	if got := recvNumbers(t, host, 1); got[0] != 9999 {
		t.Fatalf("epoch 2 released %v", got)
	}
}

// TestRelayBackpressure: at the cap the Relay stops reading from the guest
// and says so; nothing is dropped, and a commit lets the guest go on.
func TestRelayBackpressure(t *testing.T) {
	a, b := socketPair(t)
	host := newPeer(t, b)
	r := startRelayWith(t, NewStreamPort(a), WithHoldCap(10_000))
	ctx := t.Context()
	r.relay.Hold()

	const total = 200 // 200 frames of 1000 bytes: 20 times the cap
	sent := make(chan error, 1)
	go func() {
		for i := range total {
			r.guest.conn.SetWriteDeadline(time.Now().Add(ioTimeout))
			if err := WriteFrame(r.guest.conn, numbered(uint32(i), 1000)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	deadline := time.Now().Add(ioTimeout)
	for !r.relay.Status().BackpressureNow {
		if time.Now().After(deadline) {
			t.Fatalf("no backpressure: %+v", r.relay.Status())
		}
		time.Sleep(time.Millisecond)
	}
	st := r.relay.Status()
	// The cap is checked before each read from the guest's socket, of up
	// to 64 KiB.
	if st.HeldBytes < 10_000 || st.HeldBytes > 10_000+64<<10 || st.Backpressure != 1 {
		t.Fatalf("at the cap: %+v", st)
	}
	var got []uint32
	for epoch := uint64(1); len(got) < total; epoch++ {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d frames came through", len(got), total)
		}
		if err := r.relay.Cut(ctx, epoch); err != nil {
			t.Fatal(err)
		}
		rel := r.relay.Commit(epoch)
		got = append(got, recvNumbers(t, host, rel.Frames)...)
	}
	if err := <-sent; err != nil {
		t.Fatalf("guest write: %v", err)
	}
	for i, n := range got {
		if n != uint32(i) {
			t.Fatalf("frame %d arrived as number %d", i, n)
		}
	}
	// A cut reads what was in flight in the socket even at the cap, so the
	// bound is the cap plus one read plus the socket's receive buffer.
	var rcvbuf int
	r.relay.guestRaw.Control(func(fd uintptr) { rcvbuf, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) })
	if st := r.relay.Status(); st.PeakBytes > int64(10_000+64<<10+rcvbuf) || st.Backpressure < 1 || st.BackpressureTotal <= 0 {
		t.Fatalf("after: %+v (socket receive buffer %d bytes)", st, rcvbuf)
	}
}

func TestRelayCutWhenNotHolding(t *testing.T) {
	r, host := startStreamRelay(t)
	if err := r.relay.Cut(t.Context(), 1); err != nil {
		t.Fatal(err)
	}
	r.guest.send([]byte("straight through"))
	if got := host.recv(); !bytes.Equal(got, []byte("straight through")) {
		t.Fatalf("host got %q", got)
	}
	r.stop()
	r.wait(t)
	r.relay.Hold()
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if err := r.relay.Cut(ctx, 2); err != nil {
		t.Fatalf("Cut on a stopped relay: %v", err)
	}
}

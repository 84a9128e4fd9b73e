package transport

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// authPair returns two Conns over a pipe after Authenticate with the given
// keys, and the errors.
func authPair(t *testing.T, keyA, keyB []byte) (a, b *Conn, errA, errB error) {
	t.Helper()
	c1, c2 := net.Pipe()
	a, b = NewConn(c1), NewConn(c2)
	t.Cleanup(func() { a.Close(); b.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- b.Authenticate(ctx, keyB, false) }()
	errA = a.Authenticate(ctx, keyA, true)
	return a, b, errA, <-done
}

var testKey = []byte("a pre-shared key of enough bytes")

func TestAuthenticatedExchange(t *testing.T) {
	a, b, errA, errB := authPair(t, testKey, testKey)
	if errA != nil || errB != nil {
		t.Fatal(errA, errB)
	}
	ctx := t.Context()
	go func() {
		a.SendMessage(ctx, 3, Heartbeat{SentUnixNano: 42, LastCommitted: 2})
		a.SendMessage(ctx, 4, DeviceState{Total: 3, Data: []byte("dev")})
	}()
	for _, want := range []Type{TypeHeartbeat, TypeDeviceState} {
		f, err := b.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if f.Type != want || f.Flags != 0 {
			t.Fatalf("got %v", f)
		}
		if _, err := Decode(f); err != nil {
			t.Fatalf("decode after the tag was removed: %v", err)
		}
	}
}

// TestAuthWrongKey: the first frame from a peer with another key is refused
// with a clear error, before its content is used.
func TestAuthWrongKey(t *testing.T) {
	_, _, errA, errB := authPair(t, testKey, []byte("another key, also long enough"))
	for _, err := range []error{errA, errB} {
		if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "wrong tag") {
			t.Fatalf("Authenticate with different keys = %v, want ErrAuth with a wrong tag", err)
		}
	}
}

func TestAuthPeerWithoutKey(t *testing.T) {
	c1, c2 := net.Pipe()
	a, b := NewConn(c1), NewConn(c2)
	defer a.Close()
	defer b.Close()
	go func() {
		b.Recv(t.Context()) // the Auth frame, which it does not expect
		b.SendMessage(t.Context(), 0, Hello{Version: 1, Role: RoleBackup, VMName: "vm", RAMSize: PageSize, PageSize: PageSize})
	}()
	err := a.Authenticate(t.Context(), testKey, true)
	if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "does not authenticate") {
		t.Fatalf("Authenticate against a peer without a key = %v", err)
	}
	if err := a.Authenticate(t.Context(), []byte("short"), true); !errors.Is(err, ErrAuth) {
		t.Fatalf("a short key: %v", err)
	}
}

func TestAuthFrameWithoutKey(t *testing.T) {
	c1, c2 := net.Pipe()
	a, b := NewConn(c1), NewConn(c2)
	defer a.Close()
	defer b.Close()
	a.sendMAC = hmac.New(sha256.New, testKey)
	go a.SendMessage(t.Context(), 1, Ack{})
	if _, err := b.Recv(t.Context()); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "no key") {
		t.Fatalf("Recv of an authenticated frame without a key = %v", err)
	}
}

// sentRaw has a send an Ack of epoch and returns the frame as it went on
// the wire (tag included), read past b's checks.
func sentRaw(t *testing.T, a, b *Conn, epoch uint64) Frame {
	t.Helper()
	go a.SendMessage(t.Context(), epoch, Ack{})
	f, err := b.r.Next()
	if err != nil {
		t.Fatal(err)
	}
	f.Payload = bytes.Clone(f.Payload)
	return f
}

// feed makes b read the given frames next, as if its peer sent them.
func feed(b *Conn, frames ...Frame) {
	last := b.r.last
	var raw []byte
	for _, f := range frames {
		raw = AppendFrame(raw, f)
	}
	b.r = NewReader(bytes.NewReader(raw))
	b.r.last = last
}

// TestAuthReplayAndTamper: a frame recorded on an earlier connection, a
// frame changed in flight (checksums fixed up, as an attacker would), and
// a frame sent twice are all refused.
func TestAuthReplayAndTamper(t *testing.T) {
	a1, b1, errA, errB := authPair(t, testKey, testKey)
	if errA != nil || errB != nil {
		t.Fatal(errA, errB)
	}
	old := sentRaw(t, a1, b1, 1)

	_, b2, errA, errB := authPair(t, testKey, testKey)
	if errA != nil || errB != nil {
		t.Fatal(errA, errB)
	}
	feed(b2, old) // same seq as b2 expects, another session's key
	if _, err := b2.Recv(t.Context()); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "wrong tag") {
		t.Fatalf("a frame of an earlier connection: %v", err)
	}

	a3, b3, errA, errB := authPair(t, testKey, testKey)
	if errA != nil || errB != nil {
		t.Fatal(errA, errB)
	}
	g := sentRaw(t, a3, b3, 5)
	b3.r.last = g.Seq - 1
	tampered := g
	tampered.Epoch = 6
	feed(b3, tampered)
	if _, err := b3.Recv(t.Context()); !errors.Is(err, ErrAuth) {
		t.Fatalf("a tampered frame: %v", err)
	}
	b3.r.last = g.Seq - 1
	feed(b3, g, g)
	if _, err := b3.Recv(t.Context()); err != nil {
		t.Fatalf("the genuine frame: %v", err)
	}
	if _, err := b3.Recv(t.Context()); !errors.Is(err, ErrSequence) {
		t.Fatalf("the same frame again: %v, want ErrSequence", err)
	}
}

// TestAuthReflectingPeer: a peer without the key that sends back every
// byte it receives (our own Auth frame, then our key confirmation, tag and
// all) must not pass Authenticate, on either side of the handshake, and no
// frame it sends is accepted afterwards.
func TestAuthReflectingPeer(t *testing.T) {
	for _, tt := range []struct {
		name      string
		initiator bool
	}{
		{"we dialled", true},
		{"we accepted", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c1, c2 := net.Pipe()
			a := NewConn(c1)
			defer a.Close()
			defer c2.Close()
			go io.Copy(c2, c2) // the mirror
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			err := a.Authenticate(ctx, testKey, tt.initiator)
			if !errors.Is(err, ErrAuth) {
				t.Fatalf("Authenticate against a mirror = %v, want ErrAuth", err)
			}
			// Whatever the mirror sends next is refused, and nothing more
			// goes out to it.
			go a.SendMessage(ctx, 1, Heartbeat{SentUnixNano: 1})
			if f, err := a.Recv(ctx); !errors.Is(err, ErrAuth) {
				t.Fatalf("after the failed Authenticate, Recv = %v, %v; want ErrAuth", f, err)
			}
		})
	}
}

// TestAuthReflectedFrame: on an authenticated connection, a frame of our
// own sent back to us in place of the peer's (same seq, tag intact) is
// refused: each direction has its own key.
func TestAuthReflectedFrame(t *testing.T) {
	for _, side := range []string{"initiator", "acceptor"} {
		t.Run(side, func(t *testing.T) {
			a, b, errA, errB := authPair(t, testKey, testKey)
			if errA != nil || errB != nil {
				t.Fatal(errA, errB)
			}
			if side == "acceptor" {
				a, b = b, a
			}
			// a's next frame, as it leaves a, fed back to a as if b
			// sent it (b's next seq is the same: both sent two Auths).
			own := sentRaw(t, a, b, 7)
			if own.Seq != a.r.last+1 {
				t.Fatalf("seq %d, a expects %d", own.Seq, a.r.last+1)
			}
			feed(a, own)
			if f, err := a.Recv(t.Context()); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "wrong tag") {
				t.Fatalf("own frame reflected: %v, %v; want ErrAuth (wrong tag)", f, err)
			}
		})
	}
}

// TestAuthMaxSizeMessages: the largest message of each kind that carries
// bulk data crosses an authenticated connection: the tag fits within
// MaxPayload because message caps leave TagSize bytes for it.
func TestAuthMaxSizeMessages(t *testing.T) {
	fill := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*7 + i/4096)
		}
		return b
	}
	bigState, err := ChunkDeviceState(fill(MaxDeviceChunk + 1))
	if err != nil {
		t.Fatal(err)
	}
	rawPages := make([]PageKind, MaxPagesPerFrame)
	idx := make([]uint64, MaxPagesPerFrame)
	for i := range idx {
		idx[i], rawPages[i] = uint64(i), PageRaw
	}
	tests := []struct {
		name string
		m    Message
	}{
		{"DeviceState full chunk", DeviceState{Total: MaxDeviceState, Data: fill(MaxDeviceChunk)}},
		{"DeviceState first of ChunkDeviceState", bigState[0]},
		{"DeviceStateZ full chunk", DeviceStateZ{DeviceState{Offset: 5, Total: MaxDeviceState, Data: fill(MaxDeviceChunk)}}},
		{"RAMDelta all pages raw", RAMDelta{Indexes: idx, Kinds: rawPages, Codec: CodecNone, RawLen: MaxPagesPerFrame * PageSize, Blob: fill(MaxPagesPerFrame * PageSize)}},
		{"RAMPages full", RAMPages{Pages: pages(0, 1, MaxPagesPerFrame, 4)}},
		{"DiskWrite full chunk", DiskWrite{Offset: 1 << 30, Length: MaxDiskChunk, Data: fill(MaxDiskChunk)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b, errA, errB := authPair(t, testKey, testKey)
			if errA != nil || errB != nil {
				t.Fatal(errA, errB)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			sent := make(chan error, 1)
			go func() { sent <- a.SendMessage(ctx, 3, tt.m) }()
			f, err := b.Recv(ctx)
			if err != nil {
				t.Fatalf("Recv: %v", err)
			}
			if err := <-sent; err != nil {
				t.Fatalf("Send: %v", err)
			}
			got, err := Decode(f)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			want, _ := tt.m.AppendPayload(nil)
			again, _ := got.AppendPayload(nil)
			if got.Type() != tt.m.Type() || !bytes.Equal(again, want) {
				t.Fatalf("received %s of %d bytes, sent %s of %d", got.Type(), len(again), tt.m.Type(), len(want))
			}
		})
	}
	// A hand-made frame whose payload leaves no room for the tag is
	// refused before anything is written, and the Conn stays usable.
	t.Run("raw frame over MaxMessage", func(t *testing.T) {
		a, b, errA, errB := authPair(t, testKey, testKey)
		if errA != nil || errB != nil {
			t.Fatal(errA, errB)
		}
		err := a.Send(t.Context(), Frame{Type: TypeDeviceState, Payload: make([]byte, MaxMessage+1)})
		if !errors.Is(err, ErrTooLarge) {
			t.Fatalf("Send of %d bytes authenticated: %v, want ErrTooLarge", MaxMessage+1, err)
		}
		go a.SendMessage(t.Context(), 1, Ack{})
		if f, err := b.Recv(t.Context()); err != nil || f.Type != TypeAck {
			t.Fatalf("after the refused frame: %v, %v", f, err)
		}
	})
}

// TestAuthDirectionKeys pins the derivation documented in auth.go: one key
// per direction, from the key, a label naming the direction, and both
// nonces, the initiator's first.
func TestAuthDirectionKeys(t *testing.T) {
	var ni, nr [NonceSize]byte
	for i := range ni {
		ni[i], nr[i] = byte(i), byte(100+i)
	}
	want := func(label string) []byte {
		m := hmac.New(sha256.New, testKey)
		m.Write([]byte(label))
		m.Write(ni[:])
		m.Write(nr[:])
		return m.Sum(nil)
	}
	i2r := directionKey(testKey, labelI2R, &ni, &nr)
	r2i := directionKey(testKey, labelR2I, &ni, &nr)
	switch {
	case labelI2R != "remus-kvm v2 initiator->acceptor" || labelR2I != "remus-kvm v2 acceptor->initiator":
		t.Fatalf("labels %q, %q", labelI2R, labelR2I)
	case !bytes.Equal(i2r, want(labelI2R)) || !bytes.Equal(r2i, want(labelR2I)):
		t.Fatal("the keys are not HMAC-SHA256(PSK, label | Ni | Nr)")
	case bytes.Equal(i2r, r2i):
		t.Fatal("both directions have the same key")
	case bytes.Equal(i2r, directionKey(testKey, labelI2R, &nr, &ni)):
		t.Fatal("the key does not depend on which nonce is the initiator's")
	}
}

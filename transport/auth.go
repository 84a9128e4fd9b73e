package transport

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
)

// Authentication is by a pre-shared key, with an HMAC-SHA256 tag on every
// frame. Each side opens the connection with an Auth frame carrying a fresh
// random nonce. A peer whose nonce equals this side's own is refused at
// once: that is this side's Auth frame sent back. Both then derive one key
// per direction,
//
//	K_i2r = HMAC-SHA256(PSK, "remus-kvm v2 initiator->acceptor" | Ni | Nr)
//	K_r2i = HMAC-SHA256(PSK, "remus-kvm v2 acceptor->initiator" | Ni | Nr)
//
// where Ni is the nonce of the initiator (the side that dialled) and Nr the
// acceptor's; the two labels are distinct and of the same length. From
// then on every frame carries FlagAuthenticated and, at the end of its
// payload, HMAC-SHA256(K, type | flags | epoch | seq | payload length |
// payload), where K is the sender's direction's key: the initiator tags
// with K_i2r and checks with K_r2i, the acceptor the other way round. So a
// frame only verifies in the direction it was sent: a peer without the key
// that sends our own frames back (reflection) fails the tag check.
//
// Each side then echoes the other's nonce in a tagged Auth frame (key
// confirmation): a peer with another key fails there, in Authenticate, on
// both sides, before the connection carries anything else, and a reflected
// confirmation fails both its tag and the echo (it carries the peer's
// nonce, not ours). The seq inside the tag makes a replayed, dropped or
// reordered frame fail the Reader's sequence check or the tag; and since
// the keys are new for every connection, frames recorded on one connection
// fail on any other. A Conn whose Authenticate failed sends and accepts no
// frame at all.
//
// This is protocol version 2: version 1 had one session key for both
// directions, HMAC-SHA256(PSK, "remus-kvm session v1" | Ni | Nr), which a
// reflecting peer could pass.

// NonceSize is the size of an Auth nonce, and TagSize of a frame's tag.
const (
	NonceSize = 32
	TagSize   = sha256.Size
	// MinKeySize is the shortest pre-shared key accepted.
	MinKeySize = 16
)

// Auth is the first frame each way on an authenticated connection.
//
// Payload: nonce [32]byte.
type Auth struct {
	Nonce [NonceSize]byte
}

// Type returns TypeAuth.
func (Auth) Type() Type { return TypeAuth }

// AppendPayload implements Message.
func (m Auth) AppendPayload(dst []byte) ([]byte, error) { return append(dst, m.Nonce[:]...), nil }

// DecodeAuth decodes an Auth payload.
func DecodeAuth(p []byte) (Auth, error) {
	if err := wantLen(TypeAuth, p, NonceSize); err != nil {
		return Auth{}, err
	}
	var m Auth
	copy(m.Nonce[:], p)
	return m, nil
}

// Labels of the two directions' keys; see above.
const (
	labelI2R = "remus-kvm v2 initiator->acceptor"
	labelR2I = "remus-kvm v2 acceptor->initiator"
)

// directionKey derives the key of one direction from the pre-shared key and
// both nonces.
func directionKey(psk []byte, label string, initiatorNonce, acceptorNonce *[NonceSize]byte) []byte {
	kdf := hmac.New(sha256.New, psk)
	kdf.Write([]byte(label))
	kdf.Write(initiatorNonce[:])
	kdf.Write(acceptorNonce[:])
	return kdf.Sum(nil)
}

// Authenticate runs the key exchange on a new Conn, before any other frame:
// it sends this side's nonce, reads the peer's, and keys the Conn, whose
// later frames are then tagged and checked. initiator is true on the side
// that dialled; the other side must pass false. A peer that does not
// authenticate gets a clear error on its side, and gives one here.
//
// An error matches ErrAuth, or says what failed on the connection (a
// context or network error). After an error from the exchange the Conn is
// unusable, whatever the peer sends next: Send and Recv return an error
// matching ErrAuth; close it.
func (c *Conn) Authenticate(ctx context.Context, key []byte, initiator bool) error {
	if len(key) < MinKeySize {
		return fmt.Errorf("%w: key of %d bytes, want at least %d", ErrAuth, len(key), MinKeySize)
	}
	if err := c.authenticate(ctx, key, initiator); err != nil {
		c.sendMAC, c.recvMAC = nil, nil
		c.authErr = fmt.Errorf("%w: the connection failed authentication: %w", ErrAuth, err)
		return err
	}
	return nil
}

func (c *Conn) authenticate(ctx context.Context, key []byte, initiator bool) error {
	var mine Auth
	if _, err := rand.Read(mine.Nonce[:]); err != nil {
		return fmt.Errorf("transport: nonce: %w", err)
	}
	// Both sides send first: over a connection without buffering (a pipe)
	// the send must not wait for the receive.
	sent := make(chan error, 1)
	go func() { sent <- c.SendMessage(ctx, 0, mine) }()
	f, err := c.Recv(ctx)
	if serr := <-sent; serr != nil {
		return fmt.Errorf("transport: authenticate: %w", serr)
	}
	if err != nil {
		return fmt.Errorf("transport: authenticate: %w", err)
	}
	if f.Type != TypeAuth {
		return fmt.Errorf("%w: the peer sent %s first: it does not authenticate (give both sides the same key)", ErrAuth, f.Type)
	}
	theirs, err := DecodeAuth(f.Payload)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrAuth, err)
	}
	if hmac.Equal(theirs.Nonce[:], mine.Nonce[:]) {
		return fmt.Errorf("%w: the peer's nonce is this side's own: its Auth frame is ours sent back (reflection)", ErrAuth)
	}
	ni, nr := &mine.Nonce, &theirs.Nonce
	if !initiator {
		ni, nr = nr, ni
	}
	i2r := directionKey(key, labelI2R, ni, nr)
	r2i := directionKey(key, labelR2I, ni, nr)
	if !initiator {
		i2r, r2i = r2i, i2r // send with r2i, check with i2r
	}
	c.sendMAC = hmac.New(sha256.New, i2r)
	c.recvMAC = hmac.New(sha256.New, r2i)

	// Key confirmation: each side echoes the other's nonce in a tagged
	// Auth frame, so a wrong key shows here, on both sides, before the
	// connection is used.
	go func() { sent <- c.SendMessage(ctx, 0, Auth{Nonce: theirs.Nonce}) }()
	f, err = c.Recv(ctx)
	if serr := <-sent; serr != nil && err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("transport: authenticate: %w", err)
	}
	if f.Type != TypeAuth {
		return fmt.Errorf("%w: the peer sent %s in place of its key confirmation", ErrAuth, f.Type)
	}
	echo, err := DecodeAuth(f.Payload)
	if err != nil || !hmac.Equal(echo.Nonce[:], mine.Nonce[:]) {
		return fmt.Errorf("%w: the peer's key confirmation does not echo this side's nonce", ErrAuth)
	}
	return nil
}

// tag computes a frame's tag over payload (without the tag).
func tag(mac hash.Hash, f Frame, payload []byte, dst []byte) []byte {
	var h [23]byte
	h[0] = byte(f.Type)
	binary.BigEndian.PutUint16(h[1:], uint16(f.Flags))
	binary.BigEndian.PutUint64(h[3:], f.Epoch)
	binary.BigEndian.PutUint64(h[11:], f.Seq)
	binary.BigEndian.PutUint32(h[19:], uint32(len(payload)))
	mac.Reset()
	mac.Write(h[:])
	mac.Write(payload)
	return mac.Sum(dst)
}

// seal adds the tag to a frame about to be sent (seq assigned).
func (c *Conn) seal(f Frame) Frame {
	f.Flags |= FlagAuthenticated
	p := f.Payload[:len(f.Payload):len(f.Payload)]
	f.Payload = tag(c.sendMAC, f, p, p)
	return f
}

// open checks and removes the tag of a received frame.
func (c *Conn) open(f Frame) (Frame, error) {
	if f.Flags&FlagAuthenticated == 0 {
		return Frame{}, fmt.Errorf("%w: frame seq %d (%s, epoch %d) carries no tag", ErrAuth, f.Seq, f.Type, f.Epoch)
	}
	if len(f.Payload) < TagSize {
		return Frame{}, fmt.Errorf("%w: frame seq %d (%s) too short for its tag", ErrAuth, f.Seq, f.Type)
	}
	n := len(f.Payload) - TagSize
	got := f.Payload[n:]
	f.Payload = f.Payload[:n:n]
	var buf [TagSize]byte
	if !hmac.Equal(tag(c.recvMAC, f, f.Payload, buf[:0]), got) {
		return Frame{}, fmt.Errorf("%w: frame seq %d (%s, epoch %d): wrong tag (another key, or the frame was changed)", ErrAuth, f.Seq, f.Type, f.Epoch)
	}
	f.Flags &^= FlagAuthenticated
	return f, nil
}

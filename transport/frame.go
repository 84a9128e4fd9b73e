package transport

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"slices"
	"strings"
)

// Protocol versions. A frame carries the version it was written with; a
// Reader accepts MinVersion..MaxVersion.
const (
	// Version is the version this package writes.
	Version uint8 = 2
	// MinVersion is the oldest version this package reads. Both agents
	// ship together, so only the current layout is read: version 2 added
	// Hello's disk size.
	MinVersion uint8 = 2
	// MaxVersion is the newest version this package reads.
	MaxVersion uint8 = 2
)

// Frame layout sizes and caps; see the package documentation for the
// layout.
const (
	// Magic starts every frame.
	Magic = "RMUS"
	// HeaderSize is the size of the fixed header, header CRC included.
	HeaderSize = 32
	// TrailerSize is the size of the payload CRC after the payload.
	TrailerSize = 4
	// Overhead is what a frame adds to its payload.
	Overhead = HeaderSize + TrailerSize
	// MaxPayload caps a frame's payload as it travels, the tag of an
	// authenticated frame included: 8 MiB. A frame that announces more is
	// rejected before anything is allocated for it.
	MaxPayload = 8 << 20
	// MaxMessage caps an encoded message: MaxPayload less room for the
	// tag, so that every message fits in a frame on an authenticated
	// connection as well as on a plain one. NewFrame and Decode refuse a
	// longer one, and the message caps (MaxDeviceChunk, ...) stay within
	// it.
	MaxMessage = MaxPayload - TagSize
)

// Header field offsets.
const (
	offVersion   = 4
	offType      = 5
	offFlags     = 6
	offEpoch     = 8
	offSeq       = 16
	offLength    = 24
	offHeaderCRC = 28
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Type is a frame's type: which message its payload holds.
type Type uint8

// Frame types. The numbers are the protocol: append only, never renumber or
// reuse a value.
const (
	// TypeHello opens each direction of a connection: who the sender is
	// and what it has (Hello).
	TypeHello Type = 1
	// TypeRAMPages carries guest pages of an epoch (RAMPages).
	TypeRAMPages Type = 2
	// TypeDeviceState carries a chunk of an epoch's device state
	// (DeviceState).
	TypeDeviceState Type = 3
	// TypeCommit ends an epoch with its counts and digest (Commit).
	TypeCommit Type = 4
	// TypeAck tells the primary the backup verified and applied the epoch
	// in the header (Ack).
	TypeAck Type = 5
	// TypeHeartbeat shows the sender is alive (Heartbeat).
	TypeHeartbeat Type = 6
	// TypeError reports a failure to the peer (Error).
	TypeError Type = 7
	// TypeDiskWrite carries a guest disk write of the epoch in the header
	// (DiskWrite); in epoch 0, a write of the initial disk copy.
	TypeDiskWrite Type = 8
	// TypeRAMDelta carries compressed pages of the epoch in the header
	// (RAMDelta), in place of RAMPages.
	TypeRAMDelta Type = 9
	// TypeAuth opens an authenticated connection: each side's nonce (Auth).
	TypeAuth Type = 10
	// TypeDeviceStateZ carries a chunk of the epoch's device state
	// compressed with zstd (DeviceStateZ), in place of DeviceState.
	TypeDeviceStateZ Type = 11

	maxType = TypeDeviceStateZ
)

var typeNames = [...]string{
	TypeHello:        "Hello",
	TypeRAMPages:     "RAMPages",
	TypeDeviceState:  "DeviceState",
	TypeCommit:       "Commit",
	TypeAck:          "Ack",
	TypeHeartbeat:    "Heartbeat",
	TypeError:        "Error",
	TypeDiskWrite:    "DiskWrite",
	TypeRAMDelta:     "RAMDelta",
	TypeAuth:         "Auth",
	TypeDeviceStateZ: "DeviceStateZ",
}

// Known reports whether t is a type this version defines.
func (t Type) Known() bool { return t >= TypeHello && t <= maxType }

// String returns the type's name, or "Type(n)" for an unknown one.
func (t Type) String() string {
	if t.Known() {
		return typeNames[t]
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Flags are a frame's flag bits.
type Flags uint16

// Flag bits. The numbers are the protocol: append only, never renumber or
// reuse a bit. Reader rejects a frame that sets a bit this version does not
// implement, and unknown bits.
const (
	// FlagCompressed is reserved (pages are compressed by their own frame
	// type, RAMDelta).
	FlagCompressed Flags = 1 << 0
	// FlagAuthenticated marks a frame whose payload ends in an
	// HMAC-SHA256 tag over its type, flags, epoch, seq and payload, keyed
	// with the key of the direction it travels in (see
	// Conn.Authenticate).
	FlagAuthenticated Flags = 1 << 1

	// flagsDefined are the bits that have a meaning in some version.
	flagsDefined = FlagCompressed | FlagAuthenticated
	// flagsSupported are the bits this version implements.
	flagsSupported = FlagAuthenticated
)

// String returns the names of the set bits joined by "|", unknown bits in
// hex, or "0".
func (f Flags) String() string {
	if f == 0 {
		return "0"
	}
	var names []string
	if f&FlagCompressed != 0 {
		names = append(names, "Compressed")
	}
	if f&FlagAuthenticated != 0 {
		names = append(names, "Authenticated")
	}
	if rest := f &^ flagsDefined; rest != 0 {
		names = append(names, fmt.Sprintf("0x%04x", uint16(rest)))
	}
	return strings.Join(names, "|")
}

// Frame is one frame: the header fields and the payload. The payload is the
// encoded message (see NewFrame and Decode).
type Frame struct {
	// Version is the protocol version; zero means Version when encoding.
	Version uint8
	// Type says which message the payload holds.
	Type Type
	// Flags are the frame's flag bits; none is supported in version 1.
	Flags Flags
	// Epoch is the epoch the frame belongs to, 0 when none.
	Epoch uint64
	// Seq is the sender's sequence number for this frame. Conn assigns it.
	Seq uint64
	// Payload is the encoded message, at most MaxPayload bytes.
	Payload []byte
}

// String describes the frame's header for logs.
func (f Frame) String() string {
	return fmt.Sprintf("%s seq %d epoch %d flags %s payload %d bytes", f.Type, f.Seq, f.Epoch, f.Flags, len(f.Payload))
}

// check reports whether f may be written: a Reader of this version would
// accept it.
func (f Frame) check() error {
	v := f.Version
	if v == 0 {
		v = Version
	}
	switch {
	case v < MinVersion || v > MaxVersion:
		return fmt.Errorf("%w: version %d (supported %d..%d)", ErrVersion, v, MinVersion, MaxVersion)
	case !f.Type.Known():
		return fmt.Errorf("%w: unknown frame type %d", ErrUnsupported, uint8(f.Type))
	case f.Flags&^flagsSupported != 0:
		return fmt.Errorf("%w: flags %s not supported in version %d", ErrUnsupported, f.Flags, v)
	case len(f.Payload) > MaxPayload:
		return fmt.Errorf("%w: payload of %d bytes exceeds MaxPayload (%d)", ErrTooLarge, len(f.Payload), MaxPayload)
	case f.Seq == 0:
		return fmt.Errorf("%w: seq 0 (sequence numbers start at 1)", ErrSequence)
	}
	return nil
}

// putHeader writes f's header, header CRC included, into h.
func putHeader(h []byte, f Frame) {
	_ = h[HeaderSize-1]
	copy(h, Magic)
	h[offVersion] = f.Version
	if h[offVersion] == 0 {
		h[offVersion] = Version
	}
	h[offType] = byte(f.Type)
	binary.BigEndian.PutUint16(h[offFlags:], uint16(f.Flags))
	binary.BigEndian.PutUint64(h[offEpoch:], f.Epoch)
	binary.BigEndian.PutUint64(h[offSeq:], f.Seq)
	binary.BigEndian.PutUint32(h[offLength:], uint32(len(f.Payload)))
	binary.BigEndian.PutUint32(h[offHeaderCRC:], crc32.Checksum(h[:offHeaderCRC], castagnoli))
}

// AppendFrame appends the encoding of f to dst and returns the extended
// slice. It encodes the fields as they are (a zero Version as Version) and
// does not validate them, so it can produce frames a Reader rejects; use
// WriteFrame or Conn.Send to write frames to a peer. It panics if the
// payload exceeds MaxPayload.
func AppendFrame(dst []byte, f Frame) []byte {
	if len(f.Payload) > MaxPayload {
		panic(fmt.Sprintf("transport: AppendFrame: payload of %d bytes exceeds MaxPayload (%d)", len(f.Payload), MaxPayload))
	}
	start := len(dst)
	dst = slices.Grow(dst, Overhead+len(f.Payload))
	dst = append(dst, make([]byte, HeaderSize)...)
	putHeader(dst[start:], f)
	dst = append(dst, f.Payload...)
	return binary.BigEndian.AppendUint32(dst, crc32.Checksum(f.Payload, castagnoli))
}

// WriteFrame writes f to w after checking that a Reader would accept it
// (known type, supported version and flags, payload within MaxPayload, seq
// not zero). Sequence numbers are the caller's business; Conn assigns them.
func WriteFrame(w io.Writer, f Frame) error {
	if err := f.check(); err != nil {
		return fmt.Errorf("transport: write %s frame seq %d: %w", f.Type, f.Seq, err)
	}
	var s frameScratch
	if _, err := s.write(w, f); err != nil {
		return fmt.Errorf("transport: write %s frame seq %d: %w", f.Type, f.Seq, err)
	}
	return nil
}

// smallFrame is the largest payload that frameScratch copies to write the
// frame with a single Write; larger payloads are written from where they
// are.
const smallFrame = 1024

// frameScratch holds what writing a frame needs besides the payload, so
// that a Conn writes without allocating.
type frameScratch struct {
	hdr  [HeaderSize]byte
	tr   [TrailerSize]byte
	buf  []byte
	vec  [3][]byte
	bufs net.Buffers
}

// write writes f to w and returns how many bytes went out.
func (s *frameScratch) write(w io.Writer, f Frame) (int64, error) {
	if len(f.Payload) <= smallFrame {
		s.buf = AppendFrame(s.buf[:0], f)
		n, err := w.Write(s.buf)
		return int64(n), err
	}
	putHeader(s.hdr[:], f)
	binary.BigEndian.PutUint32(s.tr[:], crc32.Checksum(f.Payload, castagnoli))
	s.vec = [3][]byte{s.hdr[:], f.Payload, s.tr[:]}
	s.bufs = s.vec[:]
	n, err := s.bufs.WriteTo(w)
	s.vec = [3][]byte{}
	return n, err
}

// readerBufferSize is the bufio buffer NewReader puts in front of a plain
// io.Reader.
const readerBufferSize = 64 << 10

// Reader reads frames from a stream and checks them: magic, version,
// checksums, type, flags, size caps and that sequence numbers go 1, 2, 3,
// ... It is not safe for concurrent use.
//
// A read error that is neither the end of the stream nor a bad frame (a
// deadline, for one) leaves the frame read so far in the Reader: the next
// call to Next continues it, so a Conn whose Recv was cancelled stays
// usable. Every other error is final: Next returns it again.
type Reader struct {
	br   *bufio.Reader
	last uint64 // seq of the last frame returned
	off  int64  // stream offset of the frame being read
	err  error  // final error, returned by every later Next

	// The frame in progress.
	hdr    [HeaderSize]byte
	hn     int  // header bytes read
	parsed bool // header checksum verified and f set from it
	f      Frame
	pn     int // payload bytes read
	tr     [TrailerSize]byte
	tn     int // trailer bytes read

	// alloc allocates payloads; tests replace it to watch sizes.
	alloc func(n int) []byte
}

// NewReader returns a Reader that reads frames from r through a
// bufio.Reader (r itself if it is one with a large enough buffer). The
// first frame must have seq 1.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, readerBufferSize)}
}

// LastSeq returns the seq of the last frame Next returned, 0 if none.
func (r *Reader) LastSeq() uint64 { return r.last }

// Next reads and returns the next frame. Its payload is newly allocated and
// belongs to the caller.
//
// At the end of the stream between frames Next returns io.EOF. Otherwise it
// returns a *FrameError that matches, with errors.Is:
//   - io.ErrUnexpectedEOF: the stream ends inside a frame;
//   - ErrCorrupt: bad magic, header or payload checksum mismatch;
//   - ErrVersion: a version outside MinVersion..MaxVersion;
//   - ErrUnsupported: an unknown type, unknown or unsupported flag bits;
//   - ErrTooLarge: a payload length over MaxPayload;
//   - ErrSequence: a seq other than the previous one plus one.
//
// Errors from the underlying reader are returned wrapped.
func (r *Reader) Next() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.next()
	if err != nil {
		var fe *FrameError
		if err == io.EOF || errors.As(err, &fe) {
			r.err = err
		}
		return Frame{}, err
	}
	return f, nil
}

func (r *Reader) next() (Frame, error) {
	for r.hn < HeaderSize {
		// Read the magic and the version on their own so that a stream
		// that is not ours is rejected without waiting for a whole header.
		end := HeaderSize
		if r.hn < offVersion+1 {
			end = offVersion + 1
		}
		n, err := io.ReadFull(r.br, r.hdr[r.hn:end])
		r.hn += n
		if ferr := r.checkPrefix(); ferr != nil {
			return Frame{}, ferr
		}
		if err != nil {
			return Frame{}, r.readErr(err, "header", r.hn, HeaderSize)
		}
	}
	if !r.parsed {
		if err := r.parseHeader(); err != nil {
			return Frame{}, err
		}
	}
	for r.pn < len(r.f.Payload) {
		n, err := io.ReadFull(r.br, r.f.Payload[r.pn:])
		r.pn += n
		if err != nil {
			return Frame{}, r.readErr(err, "payload", r.pn, len(r.f.Payload))
		}
	}
	for r.tn < TrailerSize {
		n, err := io.ReadFull(r.br, r.tr[r.tn:])
		r.tn += n
		if err != nil {
			return Frame{}, r.readErr(err, "payload checksum", r.tn, TrailerSize)
		}
	}
	got := crc32.Checksum(r.f.Payload, castagnoli)
	if want := binary.BigEndian.Uint32(r.tr[:]); got != want {
		return Frame{}, r.frameErr(ErrCorrupt, nil, "payload checksum 0x%08x, want 0x%08x", got, want)
	}
	f := r.f
	r.last = f.Seq
	r.off += int64(Overhead + len(f.Payload))
	r.hn, r.parsed, r.f, r.pn, r.tn = 0, false, Frame{}, 0, 0
	return f, nil
}

// checkPrefix checks the magic and version bytes read so far.
func (r *Reader) checkPrefix() error {
	m := min(r.hn, len(Magic))
	if string(r.hdr[:m]) != Magic[:m] {
		return r.frameErr(ErrCorrupt, nil, "bad magic %q, want %q", r.hdr[:m], Magic)
	}
	if r.hn > offVersion {
		if v := r.hdr[offVersion]; v < MinVersion || v > MaxVersion {
			return r.frameErr(ErrVersion, nil, "version %d, supported %d..%d", v, MinVersion, MaxVersion)
		}
	}
	return nil
}

// parseHeader verifies a complete header, sets r.f from it and allocates
// the payload.
func (r *Reader) parseHeader() error {
	h := r.hdr[:]
	got := crc32.Checksum(h[:offHeaderCRC], castagnoli)
	if want := binary.BigEndian.Uint32(h[offHeaderCRC:]); got != want {
		return r.frameErr(ErrCorrupt, nil, "header checksum 0x%08x, want 0x%08x", got, want)
	}
	// From here on the header fields are trusted (and named in errors);
	// an error below is final, so the header is not parsed again.
	r.parsed = true
	r.f = Frame{
		Version: h[offVersion],
		Type:    Type(h[offType]),
		Flags:   Flags(binary.BigEndian.Uint16(h[offFlags:])),
		Epoch:   binary.BigEndian.Uint64(h[offEpoch:]),
		Seq:     binary.BigEndian.Uint64(h[offSeq:]),
	}
	n := binary.BigEndian.Uint32(h[offLength:])
	switch {
	case !r.f.Type.Known():
		return r.frameErr(ErrUnsupported, nil, "unknown frame type %d", uint8(r.f.Type))
	case r.f.Flags&^flagsDefined != 0:
		return r.frameErr(ErrUnsupported, nil, "unknown flag bits 0x%04x", uint16(r.f.Flags&^flagsDefined))
	case r.f.Flags&^flagsSupported != 0:
		return r.frameErr(ErrUnsupported, nil, "flags %s not supported in version %d", r.f.Flags&^flagsSupported, r.f.Version)
	case n > MaxPayload:
		return r.frameErr(ErrTooLarge, nil, "payload length %d exceeds MaxPayload (%d)", n, MaxPayload)
	case r.f.Seq <= r.last:
		return r.frameErr(ErrSequence, nil, "seq repeats or goes back: previous frame was seq %d", r.last)
	case r.f.Seq != r.last+1:
		return r.frameErr(ErrSequence, nil, "seq skips %d frames: previous frame was seq %d", r.f.Seq-r.last-1, r.last)
	}
	if n > 0 {
		if r.alloc != nil {
			r.f.Payload = r.alloc(int(n))
		} else {
			r.f.Payload = make([]byte, n)
		}
	}
	return nil
}

// readErr turns an error from reading part of a frame into what Next
// returns: io.EOF between frames, a truncation FrameError inside one, and
// any other error wrapped, keeping the frame in progress.
func (r *Reader) readErr(err error, part string, got, want int) error {
	if err == io.EOF && r.hn == 0 {
		return io.EOF
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return r.frameErr(nil, io.ErrUnexpectedEOF, "truncated in %s after %d of %d bytes", part, got, want)
	}
	return fmt.Errorf("transport: read frame at byte %d: %w", r.off, err)
}

func (r *Reader) frameErr(kind, cause error, format string, args ...any) *FrameError {
	e := &FrameError{Offset: r.off, Kind: kind, Err: cause, Detail: fmt.Sprintf(format, args...)}
	if r.parsed {
		e.Header, e.Seq, e.Type, e.Epoch = true, r.f.Seq, r.f.Type, r.f.Epoch
	}
	return e
}

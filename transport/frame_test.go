package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"
)

// sampleFrames is a valid stream: one frame of each type that has a
// message, seq 1..n.
func sampleFrames(t testing.TB) []Frame {
	t.Helper()
	msgs := []struct {
		epoch uint64
		m     Message
	}{
		{0, Hello{Version: 1, Role: RolePrimary, VMName: "vm-a", RAMSize: 1 << 30, PageSize: PageSize}},
		{1, RAMPages{Pages: pages(10, 1, 3, 1)}},
		{1, DeviceState{Offset: 0, Total: 5, Data: []byte("state")}},
		{1, Commit{PageCount: 3, DeviceStateLen: 5, Digest: 0xdeadbeef}},
		{1, Ack{}},
		{0, Heartbeat{SentUnixNano: 1700000000000000000, LastCommitted: 1}},
		{1, Error{Code: CodeEpoch, Message: "epoch 1: digest mismatch"}},
	}
	var out []Frame
	for i, m := range msgs {
		out = append(out, mustFrame(t, m.epoch, uint64(i+1), m.m))
	}
	// The reserved type travels too, with an opaque payload.
	out = append(out, Frame{Version: Version, Type: TypeDiskWrite, Epoch: 1, Seq: uint64(len(out) + 1), Payload: []byte{1, 2, 3}})
	return out
}

func TestFrameRoundTrip(t *testing.T) {
	frames := sampleFrames(t)
	b := encodeFrames(frames...)
	got, err := readAll(b)
	if err != io.EOF {
		t.Fatalf("stream ended with %v, want io.EOF", err)
	}
	if len(got) != len(frames) {
		t.Fatalf("read %d frames, want %d", len(got), len(frames))
	}
	for i := range frames {
		if !sameFrame(got[i], frames[i]) {
			t.Errorf("frame %d: got %v, want %v", i, got[i], frames[i])
		}
	}
}

func TestFrameLayout(t *testing.T) {
	f := Frame{Type: TypeAck, Flags: 0, Epoch: 0x0102030405060708, Seq: 0x1112131415161718, Payload: []byte{0xaa, 0xbb}}
	b := AppendFrame([]byte("prefix"), f)
	if !bytes.HasPrefix(b, []byte("prefix")) {
		t.Fatalf("AppendFrame dropped dst")
	}
	b = b[len("prefix"):]
	want := []byte{
		'R', 'M', 'U', 'S', // magic
		2,    // version (zero encodes as Version)
		5,    // type Ack
		0, 0, // flags
		1, 2, 3, 4, 5, 6, 7, 8, // epoch
		0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // seq
		0, 0, 0, 2, // length
	}
	if !bytes.Equal(b[:offHeaderCRC], want) {
		t.Errorf("header\n got % x\nwant % x", b[:offHeaderCRC], want)
	}
	if len(b) != Overhead+2 || !bytes.Equal(b[HeaderSize:HeaderSize+2], f.Payload) {
		t.Errorf("frame is %d bytes (% x), want %d with the payload at %d", len(b), b, Overhead+2, HeaderSize)
	}
}

func TestFramePayloadLimits(t *testing.T) {
	// Exactly MaxPayload is accepted.
	f := Frame{Type: TypeDeviceState, Epoch: 1, Seq: 1, Payload: make([]byte, MaxPayload)}
	got, err := readAll(encodeFrames(f))
	if err != io.EOF || len(got) != 1 || len(got[0].Payload) != MaxPayload {
		t.Fatalf("MaxPayload frame: read %d frames, err %v", len(got), err)
	}
	defer func() {
		if recover() == nil {
			t.Errorf("AppendFrame of a payload over MaxPayload did not panic")
		}
	}()
	f.Payload = make([]byte, MaxPayload+1)
	AppendFrame(nil, f)
}

// TestReaderTruncated cuts a two-frame stream at every byte: a cut between
// frames is a clean io.EOF, anywhere else io.ErrUnexpectedEOF.
func TestReaderTruncated(t *testing.T) {
	frames := []Frame{
		mustFrame(t, 7, 1, RAMPages{Pages: pages(0, 1, 1, 9)}),
		mustFrame(t, 7, 2, Commit{PageCount: 1}),
	}
	b := encodeFrames(frames...)
	firstEnd := Overhead + len(frames[0].Payload)
	for cut := 0; cut < len(b); cut++ {
		got, err := readAll(b[:cut])
		wantFrames := 0
		if cut >= firstEnd {
			wantFrames = 1
		}
		if len(got) != wantFrames {
			t.Fatalf("cut at %d: read %d frames, want %d", cut, len(got), wantFrames)
		}
		if cut == 0 || cut == firstEnd {
			if err != io.EOF {
				t.Fatalf("cut at frame boundary %d: err %v, want io.EOF", cut, err)
			}
			continue
		}
		var fe *FrameError
		if !errors.Is(err, io.ErrUnexpectedEOF) || !errors.As(err, &fe) {
			t.Fatalf("cut at %d: err %v, want a *FrameError wrapping io.ErrUnexpectedEOF", cut, err)
		}
		if !strings.Contains(err.Error(), "truncated") {
			t.Fatalf("cut at %d: %q does not say truncated", cut, err)
		}
	}
}

// TestReaderBitFlip flips every bit of a frame: each flip is detected.
func TestReaderBitFlip(t *testing.T) {
	f := mustFrame(t, 812, 1, DeviceState{Total: 40, Data: bytes.Repeat([]byte{0x5a}, 40)})
	b := encodeFrames(f)
	for i := range len(b) * 8 {
		c := bytes.Clone(b)
		c[i/8] ^= 1 << (i % 8)
		got, err := readAll(c)
		if len(got) != 0 {
			t.Fatalf("bit %d (byte %d) flipped: frame accepted: %v", i, i/8, got[0])
		}
		want := ErrCorrupt
		if i/8 == offVersion {
			want = ErrVersion
		}
		if !errors.Is(err, want) {
			t.Fatalf("bit %d (byte %d) flipped: err %v, want %v", i, i/8, err, want)
		}
	}
}

func TestReaderRejects(t *testing.T) {
	valid := func(seq uint64) Frame {
		return Frame{Type: TypeAck, Epoch: 7, Seq: seq}
	}
	patched := func(f Frame, off int, v ...byte) []byte {
		b := encodeFrames(f)
		copy(b[off:], v)
		return b
	}
	withLength := func(n uint32) []byte {
		b := encodeFrames(valid(1))
		binary.BigEndian.PutUint32(b[offLength:], n)
		return fixHeaderCRC(b)
	}
	be32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	tests := []struct {
		name   string
		stream []byte
		frames int // frames accepted before the error
		want   error
		detail string // substring of the error
	}{
		{"bad magic", patched(valid(1), 0, 'R', 'M', 'U', 'X'), 0, ErrCorrupt, `bad magic "RMUX", want "RMUS"`},
		{"not our protocol", []byte("GET / HTTP/1.1\r\n\r\n"), 0, ErrCorrupt, "bad magic"},
		{"garbage shorter than the magic", []byte("X"), 0, ErrCorrupt, "bad magic"},
		{"cut after the magic", encodeFrames(valid(1))[:4], 0, io.ErrUnexpectedEOF, "frame at byte 0: truncated in header after 4 of 32 bytes: unexpected EOF"},
		{"version 0 in a whole header", patched(valid(1), offVersion, 0), 0, ErrVersion, "version 0, supported 2..2"},
		{"version 1 (Hello without a disk size)", encodeFrames(Frame{Version: 1, Type: TypeAck, Seq: 1}), 0, ErrVersion, "version 1, supported 2..2"},
		{"version 3", encodeFrames(Frame{Version: 3, Type: TypeAck, Seq: 1}), 0, ErrVersion, "version 3"},
		{"version 255", encodeFrames(Frame{Version: 255, Type: TypeAck, Seq: 1}), 0, ErrVersion, "version 255"},
		{"unknown type 0", encodeFrames(Frame{Type: 0, Seq: 1}), 0, ErrUnsupported, "unknown frame type 0"},
		{"unknown type 12", encodeFrames(Frame{Type: 12, Epoch: 3, Seq: 1}), 0, ErrUnsupported, "frame seq 1 (Type(12), epoch 3) at byte 0: unknown frame type 12"},
		{"unknown type 255", encodeFrames(Frame{Type: 255, Seq: 1}), 0, ErrUnsupported, "unknown frame type 255"},
		{"unknown flag bit", encodeFrames(Frame{Type: TypeAck, Flags: 1 << 2, Seq: 1}), 0, ErrUnsupported, "unknown flag bits 0x0004"},
		{"unknown high flag bit", encodeFrames(Frame{Type: TypeAck, Flags: 1<<15 | FlagCompressed, Seq: 1}), 0, ErrUnsupported, "unknown flag bits 0x8000"},
		{"reserved flag compressed", encodeFrames(Frame{Type: TypeRAMPages, Flags: FlagCompressed, Seq: 1}), 0, ErrUnsupported, "flags Compressed not supported in version 2"},
		{"length MaxPayload+1", withLength(MaxPayload + 1), 0, ErrTooLarge, fmt.Sprintf("payload length %d exceeds MaxPayload (%d)", MaxPayload+1, MaxPayload)},
		{"length 4 GiB-1", withLength(1<<32 - 1), 0, ErrTooLarge, "payload length 4294967295"},
		{"length not matching the header checksum", append(patched(valid(1), offLength, 0, 0, 0, 9), make([]byte, 13)...), 0, ErrCorrupt, "header checksum"},
		{"header checksum", patched(valid(1), offHeaderCRC, 0, 0, 0, 0), 0, ErrCorrupt, "header checksum"},
		{"payload checksum", patched(Frame{Type: TypeRAMPages, Epoch: 812, Seq: 1, Payload: []byte("xy")}, HeaderSize+2, 0, 0, 0, 0), 0, ErrCorrupt,
			"transport: frame seq 1 (RAMPages, epoch 812) at byte 0: payload checksum 0x"},
		{"payload flipped", patched(Frame{Type: TypeCommit, Epoch: 812, Seq: 1, Payload: []byte("xy")}, HeaderSize, 'z'), 0, ErrCorrupt, "payload checksum"},
		{"empty payload with a checksum not zero", append(encodeFrames(valid(1))[:HeaderSize], be32(1)...), 0, ErrCorrupt, "payload checksum 0x00000000, want 0x00000001"},
		{"first seq 0", encodeFrames(valid(0)), 0, ErrSequence, "seq repeats or goes back: previous frame was seq 0"},
		{"first seq 2", encodeFrames(valid(2)), 0, ErrSequence, "frame seq 2 (Ack, epoch 7) at byte 0: seq skips 1 frames: previous frame was seq 0"},
		{"repeat", encodeFrames(valid(1), valid(1)), 1, ErrSequence, "frame seq 1 (Ack, epoch 7) at byte 36: seq repeats"},
		{"gap", encodeFrames(valid(1), valid(2), valid(5)), 2, ErrSequence, "seq skips 2 frames: previous frame was seq 2"},
		{"reorder", encodeFrames(valid(1), valid(3), valid(2)), 1, ErrSequence, "seq skips 1 frames"},
		{"back", encodeFrames(valid(1), valid(2), valid(3), valid(2)), 3, ErrSequence, "frame seq 2 (Ack, epoch 7) at byte 108: seq repeats or goes back: previous frame was seq 3"},
		{"corrupt after good frames", append(encodeFrames(valid(1), valid(2)), "RMUS"+string(rune(Version))+strings.Repeat("j", 27)...), 2, ErrCorrupt, "frame at byte 72: header checksum"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readAll(tt.stream)
			if len(got) != tt.frames {
				t.Errorf("accepted %d frames, want %d", len(got), tt.frames)
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err %v, want %v", err, tt.want)
			}
			var fe *FrameError
			if !errors.As(err, &fe) {
				t.Fatalf("err %T is not a *FrameError", err)
			}
			if !strings.Contains(err.Error(), tt.detail) {
				t.Errorf("err %q does not contain %q", err, tt.detail)
			}
		})
	}
}

// TestReaderRejectsEarly checks that a stream that is not ours is rejected
// from its first bytes, without waiting for a whole header.
func TestReaderRejectsEarly(t *testing.T) {
	for _, tt := range []struct {
		name  string
		first string
		want  error
	}{
		{"magic", "GET ", ErrCorrupt},
		{"version", "RMUS\x07", ErrVersion},
	} {
		t.Run(tt.name, func(t *testing.T) {
			src := &scriptReader{steps: []any{[]byte(tt.first), fmt.Errorf("read past %q: %w", tt.first, errTransient)}}
			_, err := NewReader(src).Next()
			if !errors.Is(err, tt.want) {
				t.Fatalf("err %v, want %v without reading further", err, tt.want)
			}
		})
	}
}

// TestReaderOversizeNoAlloc checks that a frame announcing more than
// MaxPayload is rejected without allocating for it.
func TestReaderOversizeNoAlloc(t *testing.T) {
	b := encodeFrames(Frame{Type: TypeRAMPages, Seq: 1})
	binary.BigEndian.PutUint32(b[offLength:], 1<<32-1)
	fixHeaderCRC(b)
	r := NewReader(bytes.NewReader(b))
	r.alloc = func(n int) []byte {
		t.Errorf("allocated a payload of %d bytes", n)
		return make([]byte, n)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := r.Next()
	runtime.ReadMemStats(&after)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err %v, want ErrTooLarge", err)
	}
	if d := after.TotalAlloc - before.TotalAlloc; d > 64<<10 {
		t.Errorf("rejecting the frame allocated %d bytes", d)
	}
}

func TestReaderErrorsAreFinal(t *testing.T) {
	b := append(encodeFrames(Frame{Type: TypeAck, Seq: 1}), encodeFrames(Frame{Type: TypeAck, Seq: 3})...)
	b = append(b, encodeFrames(Frame{Type: TypeAck, Seq: 2})...)
	r := NewReader(bytes.NewReader(b))
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	_, err1 := r.Next()
	_, err2 := r.Next()
	if !errors.Is(err1, ErrSequence) || err2 != err1 {
		t.Fatalf("errors %v then %v, want the same ErrSequence twice", err1, err2)
	}
	if r.LastSeq() != 1 {
		t.Errorf("LastSeq %d, want 1", r.LastSeq())
	}
	r = NewReader(bytes.NewReader(nil))
	for range 2 {
		if _, err := r.Next(); err != io.EOF {
			t.Fatalf("empty stream: %v, want io.EOF", err)
		}
	}
}

// TestReaderResumes checks that a read error that is not about the stream
// keeps the frame read so far: the next Next finishes it.
func TestReaderResumes(t *testing.T) {
	frames := []Frame{
		mustFrame(t, 3, 1, RAMPages{Pages: pages(1, 2, 2, 4)}),
		mustFrame(t, 3, 2, Commit{PageCount: 2}),
	}
	b := encodeFrames(frames...)
	// Interrupt the stream in the magic, the header, the payload and the
	// trailer of the first frame, and between the frames.
	cuts := []int{2, 4, 5, 20, HeaderSize, HeaderSize + 100, Overhead + len(frames[0].Payload) - 2, Overhead + len(frames[0].Payload)}
	var steps []any
	prev := 0
	for _, c := range cuts {
		steps = append(steps, b[prev:c], errTransient)
		prev = c
	}
	steps = append(steps, b[prev:])
	r := NewReader(&scriptReader{steps: steps})
	var got []Frame
	transient := 0
	for {
		f, err := r.Next()
		if errors.Is(err, errTransient) {
			transient++
			if !strings.Contains(err.Error(), "transport: read frame at byte ") {
				t.Errorf("transient error %q does not say where", err)
			}
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d frames: %v", len(got), err)
		}
		got = append(got, f)
	}
	if transient != len(cuts) {
		t.Errorf("saw %d transient errors, want %d", transient, len(cuts))
	}
	if len(got) != 2 || !sameFrame(got[0], frames[0]) || !sameFrame(got[1], frames[1]) {
		t.Fatalf("frames differ after resuming: %v", got)
	}
}

func TestWriteFrame(t *testing.T) {
	var buf bytes.Buffer
	small := Frame{Type: TypeHeartbeat, Seq: 1, Payload: make([]byte, 16)}
	large := mustFrame(t, 2, 2, RAMPages{Pages: pages(0, 1, 3, 0)})
	for _, f := range []Frame{small, large} {
		if err := WriteFrame(&buf, f); err != nil {
			t.Fatalf("WriteFrame(%v): %v", f, err)
		}
	}
	if !bytes.Equal(buf.Bytes(), encodeFrames(small, large)) {
		t.Errorf("WriteFrame wrote other bytes than AppendFrame")
	}

	for _, tt := range []struct {
		name string
		f    Frame
		want error
	}{
		{"seq 0", Frame{Type: TypeAck}, ErrSequence},
		{"unknown type", Frame{Type: 42, Seq: 1}, ErrUnsupported},
		{"version 1", Frame{Version: 1, Type: TypeAck, Seq: 1}, ErrVersion},
		{"version 3", Frame{Version: 3, Type: TypeAck, Seq: 1}, ErrVersion},
		{"reserved flag", Frame{Type: TypeAck, Flags: FlagCompressed, Seq: 1}, ErrUnsupported},
		{"unknown flag", Frame{Type: TypeAck, Flags: 0x100, Seq: 1}, ErrUnsupported},
		{"oversized", Frame{Type: TypeDeviceState, Seq: 1, Payload: make([]byte, MaxPayload+1)}, ErrTooLarge},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := WriteFrame(&buf, tt.f)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err %v, want %v", err, tt.want)
			}
			if buf.Len() != 0 {
				t.Errorf("wrote %d bytes of an invalid frame", buf.Len())
			}
		})
	}
}

func TestNames(t *testing.T) {
	for _, tt := range []struct{ got, want string }{
		{TypeHello.String(), "Hello"},
		{TypeDiskWrite.String(), "DiskWrite"},
		{Type(0).String(), "Type(0)"},
		{TypeRAMDelta.String(), "RAMDelta"},
		{TypeAuth.String(), "Auth"},
		{TypeDeviceStateZ.String(), "DeviceStateZ"},
		{Type(12).String(), "Type(12)"},
		{Flags(0).String(), "0"},
		{(FlagCompressed | FlagAuthenticated | 0x40).String(), "Compressed|Authenticated|0x0040"},
		{RoleBackup.String(), "backup"},
		{Role(0).String(), "Role(0)"},
		{CodeEpoch.String(), "epoch"},
		{ErrorCode(99).String(), "ErrorCode(99)"},
		{Frame{Type: TypeAck, Epoch: 3, Seq: 9}.String(), "Ack seq 9 epoch 3 flags 0 payload 0 bytes"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}

// TestTypeNumbers pins the wire numbers: they are the protocol.
func TestTypeNumbers(t *testing.T) {
	for _, tt := range []struct {
		got, want uint
	}{
		{uint(TypeHello), 1}, {uint(TypeRAMPages), 2}, {uint(TypeDeviceState), 3}, {uint(TypeCommit), 4},
		{uint(TypeAck), 5}, {uint(TypeHeartbeat), 6}, {uint(TypeError), 7}, {uint(TypeDiskWrite), 8}, {uint(TypeRAMDelta), 9}, {uint(TypeAuth), 10}, {uint(TypeDeviceStateZ), 11},
		{uint(FlagCompressed), 1}, {uint(FlagAuthenticated), 2},
		{uint(RolePrimary), 1}, {uint(RoleBackup), 2},
		{uint(CodeProtocol), 1}, {uint(CodeVersion), 2}, {uint(CodeMismatch), 3}, {uint(CodeEpoch), 4}, {uint(CodeInternal), 5},
	} {
		if tt.got != tt.want {
			t.Errorf("wire number %d, want %d", tt.got, tt.want)
		}
	}
}

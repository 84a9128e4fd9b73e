package transport

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

// FuzzReader feeds arbitrary bytes to Reader.Next: it must not panic, must
// not allocate a payload over MaxPayload, must fail only with io.EOF or a
// *FrameError (and keep failing with it), and every frame it accepts must
// re-encode to exactly the bytes it was read from.
//
// The seeds keep payloads small: the fuzzer minimizes every new input it
// finds with a pass quadratic in the input's length, so page-sized seeds
// leave it minimizing instead of fuzzing. Page payloads are FuzzMessages'
// business.
func FuzzReader(f *testing.F) {
	var frames []Frame
	for i, fr := range sampleFrames(f) {
		if fr.Type == TypeRAMPages {
			fr.Payload = fr.Payload[:24]
		}
		fr.Seq = uint64(i + 1)
		frames = append(frames, fr)
	}
	stream := encodeFrames(frames...)
	f.Add(stream)
	f.Add([]byte{})
	for _, fr := range frames {
		fr.Seq = 1
		one := encodeFrames(fr)
		f.Add(one)
		f.Add(one[:len(one)-1])
		f.Add(one[:HeaderSize])
	}
	f.Add(stream[:len(stream)/2])
	f.Add(encodeFrames(Frame{Type: TypeAck, Seq: 1}, Frame{Type: TypeAck, Seq: 3}))
	f.Add(encodeFrames(Frame{Version: 1, Type: TypeAck, Seq: 1}))
	f.Add(encodeFrames(Frame{Version: 3, Type: TypeAck, Seq: 1}))
	f.Add(encodeFrames(Frame{Type: 9, Seq: 1}))
	f.Add(encodeFrames(Frame{Type: TypeAck, Flags: FlagCompressed, Seq: 1}))
	huge := encodeFrames(Frame{Type: TypeDeviceState, Seq: 1})
	copy(huge[offLength:], []byte{0xff, 0xff, 0xff, 0xff})
	f.Add(fixHeaderCRC(huge))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))

	f.Fuzz(func(t *testing.T, data []byte) {
		// A small buffer keeps each run cheap (NewReader's is 64 KiB).
		r := &Reader{br: bufio.NewReaderSize(bytes.NewReader(data), 512)}
		r.alloc = func(n int) []byte {
			if n > MaxPayload || n <= 0 {
				t.Fatalf("allocating a payload of %d bytes", n)
			}
			return make([]byte, n)
		}
		for {
			start := r.off
			fr, err := r.Next()
			if err != nil {
				var fe *FrameError
				if err != io.EOF && !errors.As(err, &fe) {
					t.Fatalf("error %v (%T) is neither io.EOF nor a *FrameError", err, err)
				}
				if fe != nil && fe.Kind == nil && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("frame error without a kind: %v", err)
				}
				if _, again := r.Next(); again != err {
					t.Fatalf("error %v, then %v", err, again)
				}
				return
			}
			if got := AppendFrame(nil, fr); !bytes.Equal(got, data[start:r.off]) {
				t.Fatalf("frame %v re-encodes as\n% x\nread from\n% x", fr, got, data[start:r.off])
			}
			_, _ = Decode(fr) // must not panic
		}
	})
}

// FuzzMessages feeds arbitrary payloads to the message decoders (and to a
// Stage): they must not panic, must fail with the package's errors, and
// every message they accept must re-encode to exactly its payload.
//
// The fuzzer's minimization of each new input is quadratic in its length
// (see FuzzReader), so the seeds are small, and as a RAMPages payload is
// mostly page data the decoder only slices, its seeds hold page counts and
// indexes without the data,
// and each RAMPages input is also tried padded with zeros to the length its
// count calls for (for up to 4 pages).
func FuzzMessages(f *testing.F) {
	for _, tt := range sampleMessages() {
		p, err := tt.m.AppendPayload(nil)
		if err != nil {
			f.Fatal(err)
		}
		if rp, ok := tt.m.(RAMPages); ok {
			p = p[:2+8*len(rp.Pages)]
		}
		if len(p) > 64 {
			continue
		}
		f.Add(uint8(tt.m.Type()), p)
		if len(p) > 0 {
			f.Add(uint8(tt.m.Type()), p[:len(p)-1])
		}
		f.Add(uint8(tt.m.Type()), append(p, 0))
	}
	f.Add(uint8(TypeRAMPages), []byte{0, 3, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 1, 0})
	f.Add(uint8(TypeRAMPages), []byte{0xff, 0xff})
	f.Add(uint8(TypeDiskWrite), []byte{1})
	f.Add(uint8(TypeDiskWrite), []byte{0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 2, 0, 9, 9})
	f.Add(uint8(0), []byte{})
	f.Add(uint8(TypeError), []byte{0, 1, 0xff, 0xff})

	f.Fuzz(func(t *testing.T, typ uint8, payload []byte) {
		checkPayload(t, Type(typ), payload)
		if Type(typ) == TypeRAMPages && len(payload) >= 2 {
			n := int(binary.BigEndian.Uint16(payload))
			// Up to a few pages: an exec per megabyte would stall
			// minimization again. Full frames are unit-tested.
			if want := 2 + n*pageEntry; n <= 4 && len(payload) < want {
				checkPayload(t, TypeRAMPages, append(bytes.Clone(payload), make([]byte, want-len(payload))...))
			}
		}
	})
}

func checkPayload(t *testing.T, typ Type, payload []byte) {
	fr := Frame{Type: typ, Epoch: 1, Seq: 1, Payload: payload}
	m, err := Decode(fr)
	if err != nil {
		if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrUnsupported) {
			t.Fatalf("error %v matches none of the sentinels", err)
		}
	} else {
		if m.Type() != fr.Type {
			t.Fatalf("%s payload decoded as %T", fr.Type, m)
		}
		again, err := m.AppendPayload(nil)
		if err != nil {
			t.Fatalf("decoded %+v does not encode: %v", m, err)
		}
		if !bytes.Equal(again, payload) {
			t.Fatalf("%s re-encodes as\n% x\nfrom\n% x", fr.Type, again, payload)
		}
	}
	s, err := NewStage(1<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Add(fr); err != nil && !errors.Is(err, ErrEpoch) {
		t.Fatalf("Stage error %v is not ErrEpoch", err)
	}
}

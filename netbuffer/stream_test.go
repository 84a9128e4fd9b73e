package netbuffer

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
)

// enc returns the stream encoding of frames, without checking them.
func enc(frames ...[]byte) []byte {
	var b []byte
	for _, f := range frames {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

func lenPrefix(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }

func TestAppendFrame(t *testing.T) {
	tests := []struct {
		name    string
		frame   []byte
		want    []byte
		wantErr error
	}{
		{"one byte", []byte{0xaa}, []byte{0, 0, 0, 1, 0xaa}, nil},
		{"ethernet header", bytes.Repeat([]byte{7}, 14), append([]byte{0, 0, 0, 14}, bytes.Repeat([]byte{7}, 14)...), nil},
		{"max", make([]byte, MaxFrameSize), append(lenPrefix(MaxFrameSize), make([]byte, MaxFrameSize)...), nil},
		{"empty", []byte{}, nil, ErrEmptyFrame},
		{"nil", nil, nil, ErrEmptyFrame},
		{"over max", make([]byte, MaxFrameSize+1), nil, ErrFrameTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := []byte("kept")
			got, err := AppendFrame(prefix, tt.frame)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("AppendFrame error = %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				if string(got) != "kept" {
					t.Fatalf("AppendFrame changed dst on error: %q", got)
				}
				return
			}
			if !bytes.Equal(got[:4], prefix) || !bytes.Equal(got[4:], tt.want) {
				t.Fatalf("AppendFrame = % x, want %q + % x", got, prefix, tt.want)
			}
		})
	}
}

// countingWriter records the size of each Write.
type countingWriter struct {
	bytes.Buffer
	writes []int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.writes = append(w.writes, len(p))
	return w.Buffer.Write(p)
}

func TestWriteFrameSingleWrite(t *testing.T) {
	var w countingWriter
	frames := [][]byte{[]byte("a"), bytes.Repeat([]byte("b"), 1514), bytes.Repeat([]byte("c"), MaxFrameSize)}
	for _, f := range frames {
		if err := WriteFrame(&w, f); err != nil {
			t.Fatalf("WriteFrame(%d bytes): %v", len(f), err)
		}
	}
	if want := []int{5, 1518, MaxFrameSize + 4}; !slices.Equal(w.writes, want) {
		t.Fatalf("Write sizes = %v, want %v (one Write per frame)", w.writes, want)
	}
	if !bytes.Equal(w.Bytes(), enc(frames...)) {
		t.Fatal("WriteFrame output differs from the encoding")
	}
	for _, f := range [][]byte{nil, make([]byte, MaxFrameSize+1)} {
		w.writes = nil
		if err := WriteFrame(&w, f); err == nil {
			t.Fatalf("WriteFrame(%d bytes) succeeded", len(f))
		}
		if len(w.writes) != 0 {
			t.Fatalf("WriteFrame(%d bytes) wrote %v after refusing", len(f), w.writes)
		}
	}
}

func TestWriteFramePassesWriteError(t *testing.T) {
	boom := errors.New("boom")
	if err := WriteFrame(errWriter{boom}, []byte{1}); !errors.Is(err, boom) {
		t.Fatalf("WriteFrame error = %v, want %v", err, boom)
	}
}

type errWriter struct{ err error }

func (w errWriter) Write([]byte) (int, error) { return 0, w.err }

func TestFrameReader(t *testing.T) {
	big := bytes.Repeat([]byte{0x5a}, MaxFrameSize)
	tests := []struct {
		name    string
		in      []byte
		want    [][]byte // frames read before the error
		wantErr error
		errText string // substring of the error, if not empty
	}{
		{"empty stream", nil, nil, io.EOF, ""},
		{"one frame", enc([]byte("hello")), [][]byte{[]byte("hello")}, io.EOF, ""},
		{"three frames", enc([]byte("a"), []byte("bc"), []byte("def")), [][]byte{[]byte("a"), []byte("bc"), []byte("def")}, io.EOF, ""},
		{"max size", enc(big), [][]byte{big}, io.EOF, ""},
		{"partial prefix", []byte{0, 0}, nil, io.ErrUnexpectedEOF, ""},
		{"prefix only", lenPrefix(10), nil, io.ErrUnexpectedEOF, ""},
		{"short body", append(lenPrefix(10), "abc"...), nil, io.ErrUnexpectedEOF, ""},
		{"short after good", append(enc([]byte("ok")), 0, 0, 0, 5, 'x'), [][]byte{[]byte("ok")}, io.ErrUnexpectedEOF, ""},
		{"zero length", append(lenPrefix(0), "junk"...), nil, ErrEmptyFrame, "zero-length"},
		{"zero after good", append(enc([]byte("ok")), lenPrefix(0)...), [][]byte{[]byte("ok")}, ErrEmptyFrame, ""},
		{"one over max", lenPrefix(MaxFrameSize + 1), nil, ErrFrameTooLarge, "length 69633 exceeds MaxFrameSize (69632)"},
		{"huge length", []byte{0xff, 0xff, 0xff, 0xff}, nil, ErrFrameTooLarge, "length 4294967295"},
	}
	for _, tt := range tests {
		for _, mode := range []string{"whole", "one byte reads"} {
			t.Run(tt.name+"/"+mode, func(t *testing.T) {
				var r io.Reader = bytes.NewReader(tt.in)
				if mode != "whole" {
					r = iotest.OneByteReader(r)
				}
				fr := NewFrameReader(r)
				var got [][]byte
				var err error
				for {
					var f []byte
					f, err = fr.ReadFrame()
					if err != nil {
						break
					}
					got = append(got, bytes.Clone(f))
				}
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("error = %v, want %v", err, tt.wantErr)
				}
				if tt.wantErr == io.EOF && err != io.EOF {
					t.Fatalf("error = %#v, want io.EOF itself", err)
				}
				if tt.errText != "" && !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("error %q does not contain %q", err, tt.errText)
				}
				if len(got) != len(tt.want) {
					t.Fatalf("read %d frames, want %d", len(got), len(tt.want))
				}
				for i := range got {
					if !bytes.Equal(got[i], tt.want[i]) {
						t.Fatalf("frame %d = %q, want %q", i, got[i], tt.want[i])
					}
				}
			})
		}
	}
}

func TestFrameReaderReusesBuffer(t *testing.T) {
	fr := NewFrameReader(bytes.NewReader(enc([]byte("first frame"), []byte("second"))))
	a, err := fr.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	b, err := fr.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	if &a[0] != &b[0] {
		t.Fatal("ReadFrame allocated a new buffer for a smaller frame")
	}
	if string(b) != "second" {
		t.Fatalf("second frame = %q", b)
	}
	data := enc(bytes.Repeat([]byte{1}, 1514))
	r := bytes.NewReader(data)
	fr = NewFrameReader(r)
	allocs := testing.AllocsPerRun(100, func() {
		r.Reset(data)
		fr.br.Reset(r)
		if _, err := fr.ReadFrame(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("ReadFrame allocates %v times per frame once its buffer is large enough", allocs)
	}
}

func TestFrameReaderUsesGivenBufio(t *testing.T) {
	br := bufio.NewReader(bytes.NewReader(enc([]byte("x"))))
	if fr := NewFrameReader(br); fr.br != br {
		t.Fatal("NewFrameReader wrapped a *bufio.Reader in another")
	}
}

func TestReadFrameInto(t *testing.T) {
	fr := NewFrameReader(bytes.NewReader(enc([]byte("0123456789"), []byte("abc"), []byte("tail"))))
	buf := make([]byte, 5)
	if _, err := fr.ReadFrameInto(buf); !errors.Is(err, ErrFrameTooLarge) || !errors.Is(err, io.ErrShortBuffer) {
		t.Fatalf("ReadFrameInto of a 10-byte frame into 5 bytes: error = %v, want ErrFrameTooLarge and io.ErrShortBuffer", err)
	}
	// The long frame was skipped: the stream is still in step.
	n, err := fr.ReadFrameInto(buf)
	if err != nil || string(buf[:n]) != "abc" {
		t.Fatalf("ReadFrameInto = %q, %v; want \"abc\"", buf[:n], err)
	}
	n, err = fr.ReadFrameInto(buf)
	if err != nil || string(buf[:n]) != "tail" {
		t.Fatalf("ReadFrameInto = %q, %v; want \"tail\"", buf[:n], err)
	}
	if _, err := fr.ReadFrameInto(buf); err != io.EOF {
		t.Fatalf("ReadFrameInto at end = %v, want io.EOF", err)
	}

	fr = NewFrameReader(bytes.NewReader(append(lenPrefix(10), "abc"...)))
	if _, err := fr.ReadFrameInto(buf); err != io.ErrUnexpectedEOF {
		t.Fatalf("ReadFrameInto of a truncated long frame = %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestRoundTrip(t *testing.T) {
	var frames [][]byte
	for _, n := range []int{1, 2, 14, 60, 64, 1500, 1514, 9000, 65535, MaxFrameSize} {
		f := make([]byte, n)
		for i := range f {
			f[i] = byte(i*7 + n)
		}
		frames = append(frames, f)
	}
	var buf bytes.Buffer
	for _, f := range frames {
		if err := WriteFrame(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	fr := NewFrameReader(&buf)
	for i, want := range frames {
		got, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("frame %d (%d bytes) differs after the round trip", i, len(want))
		}
	}
	if _, err := fr.ReadFrame(); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
}

func FuzzFrameReader(f *testing.F) {
	f.Add([]byte{})
	f.Add(enc([]byte("x")))
	f.Add(enc(bytes.Repeat([]byte{0xff}, 60), []byte("second")))
	f.Add([]byte{0, 0, 0})
	f.Add(lenPrefix(0))
	f.Add(lenPrefix(MaxFrameSize + 1))
	f.Add(append(lenPrefix(8), "short"...))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1, 2, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		fr := NewFrameReader(bytes.NewReader(in))
		var reenc []byte
		for {
			frame, err := fr.ReadFrame()
			if err != nil {
				// Every frame returned re-encodes to exactly the bytes it
				// came from.
				if !bytes.HasPrefix(in, reenc) {
					t.Fatalf("re-encoded frames are not a prefix of the input")
				}
				rest := in[len(reenc):]
				switch {
				case err == io.EOF:
					if len(rest) != 0 {
						t.Fatalf("io.EOF with %d bytes left", len(rest))
					}
				case err == io.ErrUnexpectedEOF:
					if len(rest) == 0 {
						t.Fatal("io.ErrUnexpectedEOF at a frame boundary")
					}
					if len(rest) >= 4 && int(binary.BigEndian.Uint32(rest)) <= len(rest)-4 {
						t.Fatal("io.ErrUnexpectedEOF with the whole frame present")
					}
				case errors.Is(err, ErrEmptyFrame), errors.Is(err, ErrFrameTooLarge):
					if n := binary.BigEndian.Uint32(rest); n != 0 && n <= MaxFrameSize {
						t.Fatalf("%v for length %d", err, n)
					}
				default:
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if len(frame) == 0 || len(frame) > MaxFrameSize {
				t.Fatalf("frame of %d bytes accepted", len(frame))
			}
			var aerr error
			reenc, aerr = AppendFrame(reenc, frame)
			if aerr != nil {
				t.Fatalf("AppendFrame of a frame ReadFrame returned: %v", aerr)
			}
		}
	})
}

func BenchmarkWriteFrame(b *testing.B) {
	frame := make([]byte, 1514)
	b.SetBytes(int64(len(frame) + StreamHeaderSize))
	b.ReportAllocs()
	for b.Loop() {
		if err := WriteFrame(io.Discard, frame); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkFrameReader(b *testing.B) {
	frame := make([]byte, 1514)
	const perStream = 1024
	one := enc(frame)
	stream := bytes.Repeat(one, perStream)
	b.SetBytes(int64(len(one)))
	b.ReportAllocs()
	r := bytes.NewReader(stream)
	fr := NewFrameReader(r)
	for i := 0; b.Loop(); i++ {
		if i%perStream == 0 {
			r.Reset(stream)
			fr.br.Reset(r)
		}
		if _, err := fr.ReadFrame(); err != nil {
			b.Fatal(err)
		}
	}
}

// splitAll feeds b to a frameSplitter in pieces of size step and returns
// the frames and the first error.
func splitAll(b []byte, step int) ([][]byte, bool, error) {
	var s frameSplitter
	var out [][]byte
	for len(b) > 0 {
		n := min(step, len(b))
		s.feed(b[:n])
		b = b[n:]
		for {
			f, err := s.next()
			if err != nil {
				return out, s.partial(), err
			}
			if f == nil {
				break
			}
			out = append(out, f)
		}
	}
	return out, s.partial(), nil
}

// readAllFrames decodes b with FrameReader, the reference decoder.
func readAllFrames(b []byte) ([][]byte, error) {
	fr := NewFrameReader(bytes.NewReader(b))
	var out [][]byte
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return out, err
		}
		out = append(out, bytes.Clone(f))
	}
}

func TestFrameSplitter(t *testing.T) {
	var wire []byte
	frames := [][]byte{[]byte("a"), bytes.Repeat([]byte{7}, 1514), bytes.Repeat([]byte{9}, MaxFrameSize), []byte("last")}
	for _, f := range frames {
		wire, _ = AppendFrame(wire, f)
	}
	for _, step := range []int{1, 3, 4, 5, 1000, len(wire)} {
		got, partial, err := splitAll(wire, step)
		if err != nil || partial || len(got) != len(frames) {
			t.Fatalf("step %d: %d frames, partial %v, err %v", step, len(got), partial, err)
		}
		for i := range got {
			if !bytes.Equal(got[i], frames[i]) {
				t.Fatalf("step %d: frame %d differs", step, i)
			}
		}
	}
	if _, partial, _ := splitAll(wire[:len(wire)-1], 7); !partial {
		t.Fatal("a truncated stream is not reported as partial")
	}
	for _, bad := range [][]byte{{0, 0, 0, 0}, {0xff, 0, 0, 0}} {
		if _, _, err := splitAll(bad, 1); err == nil {
			t.Fatalf("prefix %x accepted", bad)
		}
	}
}

// FuzzFrameSplitter checks the incremental decoder against FrameReader on
// any input, fed in pieces of any size.
func FuzzFrameSplitter(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 'x', 0, 0, 0, 2, 'y', 'z'}, uint8(1))
	f.Add([]byte{0, 0, 0, 0}, uint8(3))
	f.Fuzz(func(t *testing.T, b []byte, step uint8) {
		got, partial, err := splitAll(b, int(step)+1)
		want, werr := readAllFrames(b)
		if len(got) != len(want) {
			t.Fatalf("splitter: %d frames (err %v), FrameReader: %d (err %v)", len(got), err, len(want), werr)
		}
		for i := range got {
			if !bytes.Equal(got[i], want[i]) {
				t.Fatalf("frame %d differs", i)
			}
		}
		switch {
		case werr == io.EOF && (err != nil || partial):
			t.Fatalf("clean stream: splitter err %v partial %v", err, partial)
		case werr == io.ErrUnexpectedEOF && (err != nil || !partial):
			t.Fatalf("truncated stream: splitter err %v partial %v", err, partial)
		case werr != io.EOF && werr != io.ErrUnexpectedEOF && err == nil:
			t.Fatalf("FrameReader failed (%v), splitter did not", werr)
		}
	})
}

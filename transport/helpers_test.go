package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"testing"
)

// encodeFrames returns the stream of frames, each as given (seq included).
func encodeFrames(frames ...Frame) []byte {
	var b []byte
	for _, f := range frames {
		b = AppendFrame(b, f)
	}
	return b
}

// fixHeaderCRC recomputes the header checksum of the frame starting at b[0],
// after a test patched its header.
func fixHeaderCRC(b []byte) []byte {
	binary.BigEndian.PutUint32(b[offHeaderCRC:], crc32.Checksum(b[:offHeaderCRC], castagnoli))
	return b
}

// readAll reads frames from b until an error and returns them with the
// error.
func readAll(b []byte) ([]Frame, error) {
	r := NewReader(bytes.NewReader(b))
	var out []Frame
	for {
		f, err := r.Next()
		if err != nil {
			return out, err
		}
		out = append(out, f)
	}
}

// page returns a page whose bytes are derived from index and salt.
func page(index uint64, salt byte) Page {
	d := make([]byte, PageSize)
	for i := range d {
		d[i] = byte(uint64(i)*31+index*7) ^ salt
	}
	return Page{Index: index, Data: d}
}

// pages returns n pages with indexes start, start+stride, ...
func pages(start, stride uint64, n int, salt byte) []Page {
	out := make([]Page, n)
	for i := range out {
		out[i] = page(start+uint64(i)*stride, salt)
	}
	return out
}

// mustFrame is NewFrame for messages the test knows are valid.
func mustFrame(t testing.TB, epoch, seq uint64, m Message) Frame {
	t.Helper()
	f, err := NewFrame(epoch, m)
	if err != nil {
		t.Fatalf("NewFrame(%d, %T): %v", epoch, m, err)
	}
	f.Seq = seq
	return f
}

func sameFrame(a, b Frame) bool {
	return a.Version == b.Version && a.Type == b.Type && a.Flags == b.Flags &&
		a.Epoch == b.Epoch && a.Seq == b.Seq && bytes.Equal(a.Payload, b.Payload)
}

// scriptReader returns its steps one per Read: data, or an error.
type scriptReader struct {
	steps []any // []byte or error
}

func (s *scriptReader) Read(p []byte) (int, error) {
	for len(s.steps) > 0 {
		switch v := s.steps[0].(type) {
		case error:
			s.steps = s.steps[1:]
			return 0, v
		case []byte:
			n := copy(p, v)
			if n == len(v) {
				s.steps = s.steps[1:]
			} else {
				s.steps[0] = v[n:]
			}
			return n, nil
		}
	}
	return 0, io.EOF
}

var errTransient = errors.New("transient test error")

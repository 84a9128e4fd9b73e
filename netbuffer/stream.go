package netbuffer

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Sizes of QEMU's -netdev stream framing: every Ethernet frame on the
// socket is preceded by its length as a 4-byte big-endian integer, in both
// directions.
const (
	// StreamHeaderSize is the size of the length prefix.
	StreamHeaderSize = 4
	// MaxFrameSize caps the length of one frame: 65536 bytes for the largest
	// frame a guest can hand to a backend without offloads, plus a 4096-byte
	// margin for headers. It equals QEMU's NET_BUFSIZE, the receive buffer of
	// its stream backend, so nothing QEMU accepts is refused here. A length
	// above it is rejected before anything is allocated for it.
	MaxFrameSize = 65536 + 4096
)

// Errors for frames this package refuses, usable with errors.Is.
var (
	// ErrEmptyFrame is a frame of length zero. QEMU never sends one; on the
	// wire it means the stream is not what it should be.
	ErrEmptyFrame = errors.New("netbuffer: zero-length frame")
	// ErrFrameTooLarge is a frame longer than MaxFrameSize (or than the
	// caller's buffer).
	ErrFrameTooLarge = errors.New("netbuffer: frame too large")
)

// checkLen reports whether a frame of n bytes may be sent or received.
func checkLen(n uint64) error {
	switch {
	case n == 0:
		return ErrEmptyFrame
	case n > MaxFrameSize:
		return fmt.Errorf("%w: length %d exceeds MaxFrameSize (%d)", ErrFrameTooLarge, n, MaxFrameSize)
	}
	return nil
}

// AppendFrame appends the stream encoding of frame (length prefix, then the
// frame) to dst and returns the extended slice. It refuses an empty frame
// and one longer than MaxFrameSize, leaving dst as it was.
func AppendFrame(dst, frame []byte) ([]byte, error) {
	if err := checkLen(uint64(len(frame))); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(frame)))
	return append(dst, frame...), nil
}

// writeBufs holds encoding buffers for WriteFrame.
var writeBufs = sync.Pool{New: func() any { return new([]byte) }}

// WriteFrame writes one frame to w in the stream format, length prefix and
// frame in a single Write. On a net.Conn, whose Write is atomic with
// respect to other Writes, frames written concurrently therefore never
// interleave. It refuses an empty frame and one longer than MaxFrameSize.
func WriteFrame(w io.Writer, frame []byte) error {
	bp := writeBufs.Get().(*[]byte)
	defer writeBufs.Put(bp)
	buf, err := AppendFrame((*bp)[:0], frame)
	if err != nil {
		return err
	}
	*bp = buf
	_, err = w.Write(buf)
	return err
}

// frameReaderBufferSize is the size of the bufio.Reader NewFrameReader puts
// in front of a plain io.Reader: a few full-sized Ethernet frames.
const frameReaderBufferSize = 16 << 10

// FrameReader decodes frames in the stream format. It is not safe for
// concurrent use.
type FrameReader struct {
	br  *bufio.Reader
	hdr [StreamHeaderSize]byte
	buf []byte
}

// NewFrameReader returns a FrameReader that reads from r through a
// bufio.Reader (r itself if it is one).
func NewFrameReader(r io.Reader) *FrameReader {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReaderSize(r, frameReaderBufferSize)
	}
	return &FrameReader{br: br}
}

// ReadFrame reads the next frame. The returned slice is valid until the next
// call to ReadFrame or ReadFrameInto; its buffer is reused.
//
// At the end of the stream between two frames it returns io.EOF; a stream
// that ends inside a frame gives io.ErrUnexpectedEOF. A length of zero gives
// ErrEmptyFrame and one over MaxFrameSize ErrFrameTooLarge; after those the
// stream cannot be resynchronised and the reader should be abandoned.
func (fr *FrameReader) ReadFrame() ([]byte, error) {
	n, err := fr.readHeader()
	if err != nil {
		return nil, err
	}
	if cap(fr.buf) < n {
		fr.buf = make([]byte, n, max(n, 2048))
	}
	fr.buf = fr.buf[:n]
	if err := fr.readBody(fr.buf); err != nil {
		return nil, err
	}
	return fr.buf, nil
}

// ReadFrameInto reads the next frame into buf and returns its length. A
// frame longer than buf is skipped, so the stream stays in step, and
// reported as ErrFrameTooLarge wrapping io.ErrShortBuffer. Other errors are
// those of ReadFrame.
func (fr *FrameReader) ReadFrameInto(buf []byte) (int, error) {
	n, err := fr.readHeader()
	if err != nil {
		return 0, err
	}
	if n > len(buf) {
		if _, err := fr.br.Discard(n); err != nil {
			return 0, eofInFrame(err)
		}
		return 0, fmt.Errorf("%w: frame of %d bytes, buffer of %d: %w", ErrFrameTooLarge, n, len(buf), io.ErrShortBuffer)
	}
	if err := fr.readBody(buf[:n]); err != nil {
		return 0, err
	}
	return n, nil
}

// readHeader reads and checks a length prefix.
func (fr *FrameReader) readHeader() (int, error) {
	if _, err := io.ReadFull(fr.br, fr.hdr[:]); err != nil {
		// io.ReadFull returns io.EOF only when nothing was read, that is at
		// a frame boundary, and io.ErrUnexpectedEOF after a partial prefix.
		return 0, err
	}
	n := binary.BigEndian.Uint32(fr.hdr[:])
	if err := checkLen(uint64(n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// readBody fills p with the frame announced by the last prefix.
func (fr *FrameReader) readBody(p []byte) error {
	if _, err := io.ReadFull(fr.br, p); err != nil {
		return eofInFrame(err)
	}
	return nil
}

// eofInFrame turns an end of stream inside a frame into
// io.ErrUnexpectedEOF.
func eofInFrame(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// frameSplitter decodes the stream format from bytes fed to it in pieces of
// any size, keeping a partial frame until the rest comes. Unlike
// FrameReader it never blocks, so its owner can stop reading between any
// two bytes (a Relay does at each cut) without losing its place.
type frameSplitter struct {
	buf []byte // undecoded bytes
	off int    // start of the undecoded bytes in buf
	err error  // a bad length prefix: the stream cannot be resynchronised
}

// feed appends bytes read from the stream.
func (s *frameSplitter) feed(p []byte) {
	if s.off > 0 && s.off == len(s.buf) {
		s.buf, s.off = s.buf[:0], 0
	} else if s.off > len(s.buf)/2 {
		s.buf = append(s.buf[:0], s.buf[s.off:]...)
		s.off = 0
	}
	s.buf = append(s.buf, p...)
}

// next returns a copy of the next complete frame, nil when none is complete
// yet, or the error of a bad length prefix (ErrEmptyFrame,
// ErrFrameTooLarge), which it keeps returning.
func (s *frameSplitter) next() ([]byte, error) {
	if s.err != nil {
		return nil, s.err
	}
	rest := s.buf[s.off:]
	if len(rest) < StreamHeaderSize {
		return nil, nil
	}
	n := binary.BigEndian.Uint32(rest)
	if err := checkLen(uint64(n)); err != nil {
		s.err = err
		return nil, err
	}
	if len(rest) < StreamHeaderSize+int(n) {
		return nil, nil
	}
	f := bytes.Clone(rest[StreamHeaderSize : StreamHeaderSize+int(n)])
	s.off += StreamHeaderSize + int(n)
	return f, nil
}

// partial reports whether part of a frame has been fed.
func (s *frameSplitter) partial() bool { return s.off < len(s.buf) }

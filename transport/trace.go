package transport

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// A page trace records the dirty pages of a run of epochs, whole, so that
// compression can be measured on what real guests write. File format:
// "RTRC" and version 1, then one record per epoch:
//
//	epoch u64 | page count u32 | (index u64 | PageSize bytes) × count
//
// all big-endian.

var traceMagic = [5]byte{'R', 'T', 'R', 'C', 1}

// maxTracePages caps the pages of one traced epoch (16 GiB of RAM).
const maxTracePages = 1 << 22

// TraceWriter writes a page trace.
type TraceWriter struct {
	w       *bufio.Writer
	started bool
}

// NewTraceWriter returns a writer of a trace to w; Flush when done.
func NewTraceWriter(w io.Writer) *TraceWriter { return &TraceWriter{w: bufio.NewWriterSize(w, 1<<20)} }

// WriteEpoch appends one epoch's pages.
func (t *TraceWriter) WriteEpoch(epoch uint64, pages []Page) error {
	if !t.started {
		if _, err := t.w.Write(traceMagic[:]); err != nil {
			return err
		}
		t.started = true
	}
	if len(pages) > maxTracePages {
		return fmt.Errorf("transport: trace: %d pages in one epoch, max %d", len(pages), maxTracePages)
	}
	var h [12]byte
	binary.BigEndian.PutUint64(h[:], epoch)
	binary.BigEndian.PutUint32(h[8:], uint32(len(pages)))
	t.w.Write(h[:])
	for _, pg := range pages {
		if len(pg.Data) != PageSize {
			return fmt.Errorf("transport: trace: page %d has %d bytes", pg.Index, len(pg.Data))
		}
		var idx [8]byte
		binary.BigEndian.PutUint64(idx[:], pg.Index)
		t.w.Write(idx[:])
		if _, err := t.w.Write(pg.Data); err != nil {
			return err
		}
	}
	return nil
}

// Flush writes out what is buffered.
func (t *TraceWriter) Flush() error { return t.w.Flush() }

// TraceReader reads a page trace.
type TraceReader struct {
	r       *bufio.Reader
	started bool
}

// NewTraceReader returns a reader of the trace in r.
func NewTraceReader(r io.Reader) *TraceReader { return &TraceReader{r: bufio.NewReaderSize(r, 1<<20)} }

// ErrTrace reports a malformed trace.
var ErrTrace = errors.New("transport: malformed page trace")

// Next returns the next epoch's pages; io.EOF after the last.
func (t *TraceReader) Next() (uint64, []Page, error) {
	if !t.started {
		var m [5]byte
		if _, err := io.ReadFull(t.r, m[:]); err != nil {
			return 0, nil, fmt.Errorf("%w: header: %v", ErrTrace, err)
		}
		if m != traceMagic {
			return 0, nil, fmt.Errorf("%w: header %q", ErrTrace, m[:])
		}
		t.started = true
	}
	var h [12]byte
	if _, err := io.ReadFull(t.r, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil, io.EOF
		}
		return 0, nil, fmt.Errorf("%w: epoch header: %v", ErrTrace, err)
	}
	epoch, n := binary.BigEndian.Uint64(h[:]), binary.BigEndian.Uint32(h[8:])
	if n > maxTracePages {
		return 0, nil, fmt.Errorf("%w: epoch %d with %d pages", ErrTrace, epoch, n)
	}
	var pages []Page
	for i := uint32(0); i < n; i++ {
		buf := make([]byte, 8+PageSize)
		if _, err := io.ReadFull(t.r, buf); err != nil {
			return 0, nil, fmt.Errorf("%w: epoch %d page %d: %v", ErrTrace, epoch, i, err)
		}
		pages = append(pages, Page{Index: binary.BigEndian.Uint64(buf), Data: buf[8:]})
	}
	return epoch, pages, nil
}

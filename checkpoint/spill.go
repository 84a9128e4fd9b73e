package checkpoint

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/remus-kvm/remus/transport"
)

// spill keeps pages of the epoch being staged in a file (in the backup's
// state directory) once the epoch holds more than the backup's staging
// memory: an epoch as large as guest RAM (a first epoch without the live
// sync, a guest that wrote all of its memory) then costs disk, not memory.
// Records are the page index (u64, big-endian) then the page, in the order
// they arrived; applying them before the pages still in memory keeps the
// epoch's order (indexes ascend within an epoch).
type spill struct {
	path  string
	f     *os.File
	pages int
	buf   []byte
}

const spillRecord = 8 + transport.PageSize

// write appends pages to the file, creating it on first use.
func (s *spill) write(pages []transport.Page) error {
	if s.f == nil {
		f, err := os.OpenFile(s.path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return fmt.Errorf("checkpoint: staging file: %w", err)
		}
		s.f = f
	}
	s.buf = s.buf[:0]
	for _, pg := range pages {
		s.buf = binary.BigEndian.AppendUint64(s.buf, pg.Index)
		s.buf = append(s.buf, pg.Data...)
	}
	if _, err := s.f.WriteAt(s.buf, int64(s.pages)*spillRecord); err != nil {
		return fmt.Errorf("checkpoint: stage %d pages in %s: %w", len(pages), s.path, err)
	}
	s.pages += len(pages)
	return nil
}

// apply copies the spilled pages into ram.
func (s *spill) apply(ram []byte) error {
	if s.pages == 0 {
		return nil
	}
	r := bufio.NewReaderSize(io.NewSectionReader(s.f, 0, int64(s.pages)*spillRecord), 1<<20)
	var rec [spillRecord]byte
	for i := range s.pages {
		if _, err := io.ReadFull(r, rec[:]); err != nil {
			return fmt.Errorf("checkpoint: read staged page %d of %d from %s: %w", i, s.pages, s.path, err)
		}
		idx := binary.BigEndian.Uint64(rec[:8])
		off := idx * transport.PageSize
		if off+transport.PageSize > uint64(len(ram)) {
			return fmt.Errorf("checkpoint: staged page %d beyond RAM in %s", idx, s.path)
		}
		copy(ram[off:off+transport.PageSize], rec[8:])
	}
	return nil
}

// reset forgets the spilled pages (the file is emptied).
func (s *spill) reset() error {
	if s.f == nil || s.pages == 0 {
		return nil
	}
	s.pages = 0
	return s.f.Truncate(0)
}

// close removes the file.
func (s *spill) close() error {
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	return errors.Join(err, os.Remove(s.path))
}

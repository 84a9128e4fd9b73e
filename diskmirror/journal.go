package diskmirror

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/transport"
)

// DefaultJournalMemory is how many bytes of an epoch's writes a Journal
// keeps in memory before it spills the rest to its file.
const DefaultJournalMemory = 64 << 20

// Journal is the backup's side: it holds the disk writes of the epoch being
// received and applies them to the disk image, in order, only when the
// epoch commits. Writes of the initial copy (epoch 0) are applied at once.
// Not safe for concurrent use.
type Journal struct {
	img      *os.File
	path     string // the journal file, created on the first spill
	spill    *os.File
	spillEnd int64
	memLimit int64

	entries  []entry
	memBytes int64
	zeroes   []byte
}

// entry is one held write: its data in memory, or at fileOff in the spill
// file.
type entry struct {
	w       transport.DiskWrite
	inFile  bool
	fileOff int64
}

// OpenJournal opens the disk image at image (which must exist, sized as the
// guest's disk) and returns a Journal that spills to journalPath beyond
// memLimit bytes (DefaultJournalMemory when 0).
func OpenJournal(image, journalPath string, memLimit int64) (*Journal, error) {
	img, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("diskmirror: disk image: %w", err)
	}
	if memLimit <= 0 {
		memLimit = DefaultJournalMemory
	}
	return &Journal{img: img, path: journalPath, memLimit: memLimit}, nil
}

// Size returns the disk image's size.
func (j *Journal) Size() (int64, error) {
	st, err := j.img.Stat()
	if err != nil {
		return 0, fmt.Errorf("diskmirror: disk image: %w", err)
	}
	return st.Size(), nil
}

// Direct applies a write of the initial copy at once.
func (j *Journal) Direct(w transport.DiskWrite) error {
	return j.write(w)
}

// Add holds a write of the epoch being received.
func (j *Journal) Add(w transport.DiskWrite) error {
	e := entry{w: w}
	n := int64(len(w.Data))
	if n > 0 && j.memBytes+n > j.memLimit {
		if j.spill == nil {
			f, err := os.OpenFile(j.path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
			if err != nil {
				return fmt.Errorf("diskmirror: journal file: %w", err)
			}
			j.spill = f
		}
		if _, err := j.spill.WriteAt(w.Data, j.spillEnd); err != nil {
			return fmt.Errorf("diskmirror: journal file %s: %w", j.path, err)
		}
		e.inFile, e.fileOff = true, j.spillEnd
		e.w.Data = nil
		j.spillEnd += n
	} else if n > 0 {
		e.w.Data = append([]byte(nil), w.Data...) // the frame's buffer is not ours to keep
		j.memBytes += n
	}
	j.entries = append(j.entries, e)
	return nil
}

// Held returns how many writes and data bytes are held, and how many of
// those bytes are in the journal file.
func (j *Journal) Held() (writes int, bytes, spilled int64) {
	return len(j.entries), j.memBytes + j.spillEnd, j.spillEnd
}

// Commit applies the held writes to the image in the order they came,
// makes them durable, and empties the journal.
func (j *Journal) Commit() error {
	buf := []byte(nil)
	for _, e := range j.entries {
		w := e.w
		if e.inFile {
			if cap(buf) < int(w.Length) {
				buf = make([]byte, w.Length)
			}
			w.Data = buf[:w.Length]
			if _, err := j.spill.ReadAt(w.Data, e.fileOff); err != nil {
				return fmt.Errorf("diskmirror: journal file %s: %w", j.path, err)
			}
		}
		if err := j.write(w); err != nil {
			return err
		}
	}
	if len(j.entries) > 0 {
		if err := j.img.Sync(); err != nil {
			return fmt.Errorf("diskmirror: sync disk image: %w", err)
		}
	}
	j.Discard()
	return nil
}

// Discard drops the held writes: their epoch will never commit.
func (j *Journal) Discard() {
	j.entries = j.entries[:0]
	j.memBytes = 0
	if j.spill != nil {
		j.spill.Truncate(0)
	}
	j.spillEnd = 0
}

// write applies one write to the image.
func (j *Journal) write(w transport.DiskWrite) error {
	if w.Flags&transport.DiskZero == 0 {
		if _, err := j.img.WriteAt(w.Data, int64(w.Offset)); err != nil {
			return fmt.Errorf("diskmirror: write %d bytes at %d: %w", len(w.Data), w.Offset, err)
		}
		return nil
	}
	// Zeroes: punch a hole (reads back as zeroes, keeps the size); write
	// them where the file system cannot.
	err := unix.Fallocate(int(j.img.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(w.Offset), int64(w.Length))
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("diskmirror: zero %d bytes at %d: %w", w.Length, w.Offset, err)
	}
	if j.zeroes == nil {
		j.zeroes = make([]byte, 1<<20)
	}
	for off, end := int64(w.Offset), int64(w.Offset)+int64(w.Length); off < end; {
		n := min(end-off, int64(len(j.zeroes)))
		if _, err := j.img.WriteAt(j.zeroes[:n], off); err != nil {
			return fmt.Errorf("diskmirror: zero %d bytes at %d: %w", n, off, err)
		}
		off += n
	}
	return nil
}

// Close closes the image and removes the journal file.
func (j *Journal) Close() error {
	if j.spill != nil {
		j.spill.Close()
		os.Remove(j.path)
	}
	return j.img.Close()
}

package diskmirror

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/transport"
)

// The defaults of JournalLimits. Together they hold one epoch of 576 MiB
// of data in at most 1Mi writes: more than twice what the primary's
// Recorder lets an epoch hold by default (DefaultEpochWriteCap,
// DefaultEpochWrites), so an epoch the primary cut always fits.
const (
	// DefaultJournalMemory is how many bytes of an epoch's writes a
	// Journal keeps in memory before it spills the rest to its file.
	DefaultJournalMemory = 64 << 20
	// DefaultJournalSpill bounds the bytes of an epoch's writes in the
	// journal file. The file is usually in the state directory, often a
	// tmpfs: its bytes are RAM.
	DefaultJournalSpill = 512 << 20
	// DefaultJournalWrites bounds how many writes a Journal holds (zero
	// writes included, which carry no data); each costs about 64 bytes of
	// bookkeeping in memory.
	DefaultJournalWrites = 1 << 20
)

// JournalLimits bound what a Journal holds of one epoch. A zero field takes
// its default.
type JournalLimits struct {
	// Memory is how many bytes of data are kept in memory before the
	// rest spills to the journal file (DefaultJournalMemory).
	Memory int64
	// Spill bounds the bytes of data in the journal file
	// (DefaultJournalSpill).
	Spill int64
	// Writes bounds the number of held writes (DefaultJournalWrites).
	Writes int
}

func (l JournalLimits) withDefaults() JournalLimits {
	if l.Memory <= 0 {
		l.Memory = DefaultJournalMemory
	}
	if l.Spill <= 0 {
		l.Spill = DefaultJournalSpill
	}
	if l.Writes <= 0 {
		l.Writes = DefaultJournalWrites
	}
	return l
}

var (
	// ErrJournalFull: the epoch does not fit in the journal, because it
	// has more writes or spilled bytes than the JournalLimits allow or
	// because the journal file's file system is full (ENOSPC, EDQUOT,
	// EFBIG; those errors match too). The write was not held and the
	// epoch cannot commit: refuse it and Discard.
	ErrJournalFull = errors.New("journal full")
	// ErrOutOfRange: a write does not fit in the disk image (a
	// *RangeError says where). Nothing of it was applied.
	ErrOutOfRange = errors.New("write beyond the disk image")
	// ErrIncomplete: the held epoch lost a write (an Add failed), so
	// Commit refuses it; only Discard clears it.
	ErrIncomplete = errors.New("epoch incomplete")
	// ErrTornImage: the disk image holds part of an epoch. A Commit that
	// fails with it keeps the epoch held, and Commit again replays it
	// whole; once it is discarded, no epoch commits until a new initial
	// copy (Direct after Discard) rewrites the image.
	ErrTornImage = errors.New("disk image holds part of an epoch")
)

// RangeError is a write that does not fit in the disk image: it would grow
// the file. It matches ErrOutOfRange.
type RangeError struct {
	Offset uint64
	Length uint64
	Size   int64 // the image's
}

func (e *RangeError) Error() string {
	return fmt.Sprintf("write at %d+%d beyond image size %d", e.Offset, e.Length, e.Size)
}

// Is makes a *RangeError match ErrOutOfRange.
func (e *RangeError) Is(target error) bool { return target == ErrOutOfRange }

// Journal is the backup's side: it holds the disk writes of the epoch being
// received and applies them to the disk image, in order, only when the
// epoch commits, all or nothing (see the package doc). Writes of the
// initial copy (epoch 0) are applied at once. Not safe for concurrent use.
type Journal struct {
	img      imageFile
	size     int64  // the image's, when opened
	path     string // the journal file, created on the first spill
	spill    *os.File
	spillEnd int64
	lim      JournalLimits

	entries  []entry
	memBytes int64
	broken   error  // why an Add failed: the held epoch is incomplete
	epoch    uint64 // of the held writes, when named (AddEpoch)
	named    bool
	zeroes   []byte

	// torn: a Commit of the held epoch failed after it began writing
	// the image. stale: the image holds writes that no Commit will
	// complete (a torn epoch was discarded, or a write of the initial
	// copy failed); no epoch commits until a new initial copy.
	torn   bool
	stale  error
	fresh  bool // Discard came; the next Direct begins a new initial copy
	copied bool // Direct wrote since the last sync
	dirty  bool // written since the last sync
}

// imageFile is the disk image as the Journal uses it (an *os.File; tests
// inject faults).
type imageFile interface {
	io.WriterAt
	io.Seeker
	Sync() error
	Fd() uintptr
	Close() error
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
// memLimit bytes (DefaultJournalMemory when 0), with the other limits at
// their defaults.
func OpenJournal(image, journalPath string, memLimit int64) (*Journal, error) {
	return OpenJournalLimits(image, journalPath, JournalLimits{Memory: memLimit})
}

// OpenJournalLimits is OpenJournal with every limit chosen.
func OpenJournalLimits(image, journalPath string, lim JournalLimits) (*Journal, error) {
	img, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("diskmirror: disk image: %w", err)
	}
	size, err := imageSize(img)
	if err == nil && size == 0 {
		err = errors.New("empty: it must be sized as the guest's disk")
	}
	if err != nil {
		img.Close()
		return nil, fmt.Errorf("diskmirror: disk image %s: %w", image, err)
	}
	return &Journal{img: img, size: size, path: journalPath, lim: lim.withDefaults()}, nil
}

// imageSize returns the size of a regular file or a block device.
func imageSize(f io.Seeker) (int64, error) {
	return f.Seek(0, io.SeekEnd)
}

// Size returns the disk image's size when the Journal opened it: no write
// beyond it is accepted.
func (j *Journal) Size() (int64, error) {
	return j.size, nil
}

// Direct applies a write of the initial copy at once. The first Direct
// after a Discard begins a new initial copy, which rewrites the whole
// image: it clears what a discarded torn epoch left (ErrTornImage). A
// failed Direct leaves the image short of that write: no epoch commits
// until a new initial copy.
func (j *Journal) Direct(w transport.DiskWrite) error {
	if j.fresh {
		j.fresh, j.stale = false, nil
	}
	if err := j.check(w); err != nil {
		return fmt.Errorf("diskmirror: initial copy: %w", err)
	}
	j.dirty, j.copied = true, true
	if err := j.write(w); err != nil {
		err = fmt.Errorf("diskmirror: initial copy: %w", err)
		j.stale = err
		return err
	}
	return nil
}

// check returns why w cannot be applied to the image: data that disagrees
// with its length, or a range beyond the image.
func (j *Journal) check(w transport.DiskWrite) error {
	zero := w.Flags&transport.DiskZero != 0
	if !zero && len(w.Data) != int(w.Length) {
		return fmt.Errorf("write at %d of length %d with %d bytes of data", w.Offset, w.Length, len(w.Data))
	}
	return j.checkRange(w.Offset, w.Length)
}

// checkRange returns a *RangeError for a range beyond the image.
func (j *Journal) checkRange(off uint64, n uint32) error {
	if end := off + uint64(n); end < off || end > uint64(j.size) {
		return &RangeError{Offset: off, Length: uint64(n), Size: j.size}
	}
	return nil
}

// Add holds a write of the epoch being received. If it fails, the write is
// not held and the epoch is incomplete: Commit refuses it until Discard.
// errors.Is(err, ErrJournalFull) when the epoch does not fit.
func (j *Journal) Add(w transport.DiskWrite) error {
	return j.hold(w)
}

// AddEpoch is Add naming the write's epoch, which errors then name too.
// The held writes are of one epoch: a write of another before Commit or
// Discard is refused (and leaves the held epoch incomplete).
func (j *Journal) AddEpoch(epoch uint64, w transport.DiskWrite) error {
	if j.named && epoch != j.epoch {
		if j.broken == nil {
			j.broken = fmt.Errorf("diskmirror: epoch %d: a write of epoch %d while epoch %d is held", epoch, epoch, j.epoch)
		}
		return fmt.Errorf("diskmirror: epoch %d: %w: epoch %d is held; Commit or Discard it first", epoch, ErrIncomplete, j.epoch)
	}
	j.epoch, j.named = epoch, true
	return j.hold(w)
}

// where names the held epoch in errors.
func (j *Journal) where() string {
	if j.named {
		return fmt.Sprintf("epoch %d", j.epoch)
	}
	return "held epoch"
}

func (j *Journal) hold(w transport.DiskWrite) error {
	if j.torn && j.broken == nil {
		j.broken = fmt.Errorf("diskmirror: %s: a write came after its Commit failed", j.where())
	}
	if j.broken != nil {
		return fmt.Errorf("diskmirror: %s: %w: a write was refused (%w); Discard it", j.where(), ErrIncomplete, j.broken)
	}
	if err := j.add(w); err != nil {
		j.broken = err
		return err
	}
	return nil
}

func (j *Journal) add(w transport.DiskWrite) error {
	if err := j.check(w); err != nil {
		return fmt.Errorf("diskmirror: %s: %w", j.where(), err)
	}
	if len(j.entries) >= j.lim.Writes {
		return fmt.Errorf("diskmirror: %s: %w: %d writes held, at most %d", j.where(), ErrJournalFull, len(j.entries), j.lim.Writes)
	}
	e := entry{w: w}
	n := int64(len(w.Data))
	if n > 0 && j.memBytes+n > j.lim.Memory {
		if j.spillEnd+n > j.lim.Spill {
			return fmt.Errorf("diskmirror: %s: %w: %d bytes in the journal file %s and %d more, at most %d",
				j.where(), ErrJournalFull, j.spillEnd, j.path, n, j.lim.Spill)
		}
		if j.spill == nil {
			f, err := os.OpenFile(j.path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
			if err != nil {
				return fmt.Errorf("diskmirror: %s: journal file: %w", j.where(), err)
			}
			j.spill = f
		}
		if _, err := j.spill.WriteAt(w.Data, j.spillEnd); err != nil {
			// Give back what part of it took; the held writes stay as
			// they were.
			j.spill.Truncate(j.spillEnd)
			if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) || errors.Is(err, unix.EFBIG) {
				return fmt.Errorf("diskmirror: %s: %w: journal file %s: %w", j.where(), ErrJournalFull, j.path, err)
			}
			return fmt.Errorf("diskmirror: %s: journal file %s: %w", j.where(), j.path, err)
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
// makes them durable (fsync, which also covers the initial copy's writes),
// and empties the journal.
//
// It is all or nothing. When it returns nil, the image holds the epoch
// whole, durably. When it fails, the epoch stays held and the error says
// what state the image is in: errors.Is(err, ErrTornImage) when the image
// holds part of the epoch (some writes applied, or all of them but not
// known durable); Commit again then replays the epoch from its first
// write, since the writes are idempotent. Without ErrTornImage nothing of
// the epoch reached the image: it holds the last committed epoch.
func (j *Journal) Commit() error {
	if j.broken != nil {
		return fmt.Errorf("diskmirror: %s: %w: a write was refused (%w); nothing applied, Discard it", j.where(), ErrIncomplete, j.broken)
	}
	if j.stale != nil {
		return fmt.Errorf("diskmirror: %s: %w (%w); nothing applied: no epoch commits until a new initial copy", j.where(), ErrTornImage, j.stale)
	}
	// Check again what the writes will meet before the first is applied.
	if size, err := imageSize(j.img); err != nil {
		return fmt.Errorf("diskmirror: %s: disk image: %w; nothing applied", j.where(), err)
	} else if size != j.size {
		return fmt.Errorf("diskmirror: %s: disk image is %d bytes, was %d when opened; nothing applied", j.where(), size, j.size)
	}
	for _, e := range j.entries {
		if err := j.checkRange(e.w.Offset, e.w.Length); err != nil {
			return fmt.Errorf("diskmirror: %s: %w; nothing applied", j.where(), err)
		}
	}
	buf := []byte(nil)
	for i, e := range j.entries {
		w := e.w
		if e.inFile {
			if cap(buf) < int(w.Length) {
				buf = make([]byte, w.Length)
			}
			w.Data = buf[:w.Length]
			if _, err := j.spill.ReadAt(w.Data, e.fileOff); err != nil {
				return j.applyFailed(i, fmt.Errorf("read write %d of %d from the journal file %s: %w", i+1, len(j.entries), j.path, err))
			}
		}
		j.torn, j.dirty = true, true
		if err := j.write(w); err != nil {
			return j.applyFailed(i, fmt.Errorf("write %d of %d: %w", i+1, len(j.entries), err))
		}
	}
	if j.dirty {
		if err := j.img.Sync(); err != nil {
			err = fmt.Errorf("sync disk image: %w", err)
			if j.copied {
				// Pages of the initial copy may be lost, and nothing
				// holds them to write again.
				j.stale = fmt.Errorf("the initial copy is not known durable: %w", err)
			}
			return j.applyFailed(len(j.entries), err)
		}
		j.dirty, j.copied = false, false
	}
	j.torn, j.fresh = false, false
	j.drop()
	return nil
}

// applyFailed describes a Commit that failed after i of the held writes
// were applied (i == len: at the sync), and what the image holds.
func (j *Journal) applyFailed(i int, err error) error {
	n := len(j.entries)
	switch {
	case j.stale != nil:
		return fmt.Errorf("diskmirror: %s: %w: %w (%w); the epoch stays held, but no epoch commits until a new initial copy", j.where(), err, ErrTornImage, j.stale)
	case !j.torn:
		return fmt.Errorf("diskmirror: %s: %w; nothing applied, the image holds the last committed epoch; the epoch stays held", j.where(), err)
	case i == n:
		return fmt.Errorf("diskmirror: %s: %w: %w (all %d writes applied, not known durable); the epoch stays held: Commit again replays it whole", j.where(), err, ErrTornImage, n)
	}
	return fmt.Errorf("diskmirror: %s: %w: %w (%d of %d writes applied); the epoch stays held: Commit again replays it whole", j.where(), err, ErrTornImage, i, n)
}

// Discard drops the held writes: their epoch will never commit. If a
// Commit of them failed midway (ErrTornImage), the image keeps part of
// them, and no epoch commits until a new initial copy.
func (j *Journal) Discard() {
	if j.torn {
		j.stale = fmt.Errorf("%s was discarded after a Commit of it failed midway", j.where())
		j.torn = false
	}
	j.fresh = true
	j.drop()
}

// drop empties the journal.
func (j *Journal) drop() {
	j.entries = j.entries[:0]
	j.memBytes = 0
	j.broken = nil
	j.epoch, j.named = 0, false
	if j.spill != nil {
		j.spill.Truncate(0)
	}
	j.spillEnd = 0
}

// write applies one checked write to the image.
func (j *Journal) write(w transport.DiskWrite) error {
	if err := j.check(w); err != nil {
		return err // never grow the image
	}
	if w.Flags&transport.DiskZero == 0 {
		if _, err := j.img.WriteAt(w.Data, int64(w.Offset)); err != nil {
			return fmt.Errorf("write %d bytes at %d: %w", len(w.Data), w.Offset, err)
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
		return fmt.Errorf("zero %d bytes at %d: %w", w.Length, w.Offset, err)
	}
	if j.zeroes == nil {
		j.zeroes = make([]byte, 1<<20)
	}
	for off, end := int64(w.Offset), int64(w.Offset)+int64(w.Length); off < end; {
		n := min(end-off, int64(len(j.zeroes)))
		if _, err := j.img.WriteAt(j.zeroes[:n], off); err != nil {
			return fmt.Errorf("zero %d bytes at %d: %w", n, off, err)
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

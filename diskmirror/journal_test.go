package diskmirror

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/transport"
)

func newImage(t *testing.T, size int64) (string, *Journal) {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, bytes.Repeat([]byte{0xee}, int(size)), 0o600); err != nil {
		t.Fatal(err)
	}
	j, err := OpenJournal(img, filepath.Join(dir, "journal"), 10_000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return img, j
}

// TestJournalAppliesOnlyAtCommit: held writes (some spilled to the file)
// reach the image only at Commit, in order; discarded ones never do.
func TestJournalAppliesOnlyAtCommit(t *testing.T) {
	img, j := newImage(t, 64<<10)
	read := func() []byte { b, _ := os.ReadFile(img); return b }
	want := read()

	if err := j.Direct(transport.DiskWrite{Offset: 0, Length: 4, Data: []byte("sync")}); err != nil {
		t.Fatal(err)
	}
	copy(want, "sync")
	if !bytes.Equal(read(), want) {
		t.Fatal("a direct write was not applied at once")
	}

	writes := []transport.DiskWrite{
		{Offset: 100, Length: 6000, Data: bytes.Repeat([]byte{1}, 6000)},
		{Offset: 3000, Length: 6000, Data: bytes.Repeat([]byte{2}, 6000)}, // beyond the memory limit: spilled, and overlaps the first
		{Offset: 5000, Length: 2000, Flags: transport.DiskZero},
		{Offset: 20000, Length: 3, Data: []byte("end")},
	}
	for _, w := range writes {
		if err := j.Add(w); err != nil {
			t.Fatal(err)
		}
	}
	if n, b, spilled := j.Held(); n != 4 || b != 12003 || spilled == 0 {
		t.Fatalf("held %d writes, %d bytes, %d spilled", n, b, spilled)
	}
	if !bytes.Equal(read(), want) {
		t.Fatal("held writes reached the image before the commit")
	}
	if err := j.Commit(); err != nil {
		t.Fatal(err)
	}
	for _, w := range writes {
		if w.Flags&transport.DiskZero != 0 {
			clear(want[w.Offset : w.Offset+uint64(w.Length)])
		} else {
			copy(want[w.Offset:], w.Data)
		}
	}
	if !bytes.Equal(read(), want) {
		t.Fatal("the image after the commit is not the writes applied in order")
	}

	// An epoch that never commits.
	j.Add(transport.DiskWrite{Offset: 0, Length: 5, Data: []byte("never")})
	j.Discard()
	if err := j.Commit(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(), want) {
		t.Fatal("a discarded write reached the image")
	}
}

func TestRecorderModes(t *testing.T) {
	ctx := context.Background()
	r := NewRecorder()
	// Off: dropped.
	if err := r.Write(ctx, Write{Offset: 0, Length: 1, Data: []byte{1}}); err != nil {
		t.Fatal(err)
	}
	var sent []transport.DiskWrite
	r.Direct(func(_ context.Context, w transport.DiskWrite) error { sent = append(sent, w); return nil })
	r.Write(ctx, Write{Offset: 0, Length: transport.MaxDiskChunk + 1, Data: make([]byte, transport.MaxDiskChunk+1)})
	r.Write(ctx, Write{Offset: 0, Length: 1<<32 - 1, Zero: true})
	if len(sent) != 2+4 || r.DirectStats().Writes != 2 {
		t.Fatalf("direct: %d messages sent, stats %+v", len(sent), r.DirectStats())
	}
	r.Record()
	r.Write(ctx, Write{Offset: 8, Length: 2, Data: []byte{7, 8}})
	r.Write(ctx, Write{Offset: 16, Length: 512, Zero: true})
	got := r.Cut()
	if len(got) != 2 || got[0].Offset != 8 || got[1].Flags != transport.DiskZero || len(sent) != 6 {
		t.Fatalf("recorded %+v", got)
	}
	if len(r.Cut()) != 0 {
		t.Fatal("a second cut found writes")
	}
	r.Write(ctx, Write{Offset: 0, Length: 1, Data: []byte{1}})
	r.Off()
	if len(r.Cut()) != 0 {
		t.Fatal("writes survived Off")
	}
}

// TestRecorderCapBlocksUntilCut: at the cap a write waits for the cut.
func TestRecorderCapBlocksUntilCut(t *testing.T) {
	r := NewRecorder()
	r.Cap = 100
	r.Record()
	ctx := context.Background()
	r.Write(ctx, Write{Offset: 0, Length: 80, Data: make([]byte, 80)})
	done := make(chan error, 1)
	go func() { done <- r.Write(ctx, Write{Offset: 80, Length: 80, Data: make([]byte, 80)}) }()
	select {
	case err := <-done:
		t.Fatalf("a write past the cap did not wait (%v)", err)
	default:
	}
	if n := len(r.Cut()); n != 1 {
		t.Fatalf("cut took %d writes", n)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := len(r.Cut()); n != 1 {
		t.Fatalf("second cut took %d writes", n)
	}
}

// openImage makes a disk image of size bytes of 0xee in a new directory and
// opens a Journal on it; journal, when set, places the journal file.
func openImage(t *testing.T, size int64, lim JournalLimits, journal func(dir string) string) (string, *Journal) {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, bytes.Repeat([]byte{0xee}, int(size)), 0o600); err != nil {
		t.Fatal(err)
	}
	jpath := filepath.Join(dir, "journal")
	if journal != nil {
		jpath = journal(dir)
	}
	j, err := OpenJournalLimits(img, jpath, lim)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return img, j
}

func data(off uint64, n int, b byte) transport.DiskWrite {
	return transport.DiskWrite{Offset: off, Length: uint32(n), Data: bytes.Repeat([]byte{b}, n)}
}

func zero(off uint64, n uint32) transport.DiskWrite {
	return transport.DiskWrite{Offset: off, Length: n, Flags: transport.DiskZero}
}

// TestJournalBounds: a write past a bound (held writes, bytes spilled, a
// full file system under the journal file) is refused with ErrJournalFull,
// the journal keeps what it held, the epoch cannot commit (nothing of it
// reaches the image) until it is discarded, and after that the journal
// works again.
func TestJournalBounds(t *testing.T) {
	devFull := func(dir string) string {
		if _, err := os.Stat("/dev/full"); err != nil {
			t.Skip("needs /dev/full")
		}
		p := filepath.Join(dir, "journal")
		if err := os.Symlink("/dev/full", p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name    string
		lim     JournalLimits
		journal func(dir string) string
		fit     []transport.DiskWrite // held
		over    transport.DiskWrite   // refused
		want    []error
		says    string
	}{
		{"writes", JournalLimits{Writes: 3}, nil,
			[]transport.DiskWrite{data(0, 10, 1), zero(100, 50), data(200, 10, 2)}, zero(300, 10),
			[]error{ErrJournalFull}, "3 writes held, at most 3"},
		{"spill", JournalLimits{Memory: 100, Spill: 1000}, nil,
			[]transport.DiskWrite{data(0, 100, 1), data(1000, 600, 2), data(2000, 400, 3)}, data(3000, 1, 4),
			[]error{ErrJournalFull}, "1000 bytes in the journal file"},
		{"ENOSPC", JournalLimits{Memory: 100}, devFull,
			[]transport.DiskWrite{data(0, 60, 1), data(100, 40, 2)}, data(200, 10, 3),
			[]error{ErrJournalFull, unix.ENOSPC}, "no space left on device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, j := openImage(t, 64<<10, tc.lim, tc.journal)
			read := func() []byte { b, _ := os.ReadFile(img); return b }
			before := read()
			for i, w := range tc.fit {
				if err := j.AddEpoch(7, w); err != nil {
					t.Fatalf("write %d: %v", i, err)
				}
			}
			n, b, s := j.Held()
			err := j.AddEpoch(7, tc.over)
			for _, want := range tc.want {
				if !errors.Is(err, want) {
					t.Errorf("Add past the bound: %v, want %v", err, want)
				}
			}
			if err == nil || !strings.Contains(err.Error(), "epoch 7") || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("Add past the bound: %v, want it to name epoch 7 and say %q", err, tc.says)
			}
			if n2, b2, s2 := j.Held(); n2 != n || b2 != b || s2 != s {
				t.Errorf("held %d/%d/%d after the refused write, %d/%d/%d before", n2, b2, s2, n, b, s)
			}
			if err := j.AddEpoch(7, data(0, 1, 9)); !errors.Is(err, ErrIncomplete) {
				t.Errorf("Add after a refused write: %v, want ErrIncomplete", err)
			}
			if err := j.Commit(); !errors.Is(err, ErrIncomplete) || !errors.Is(err, tc.want[0]) {
				t.Errorf("Commit of an incomplete epoch: %v, want ErrIncomplete and %v", err, tc.want[0])
			}
			if !bytes.Equal(read(), before) {
				t.Fatal("writes of an incomplete epoch reached the image")
			}
			j.Discard()
			if err := j.AddEpoch(8, data(5, 3, 0x42)); err != nil {
				t.Fatalf("Add after Discard: %v", err)
			}
			if err := j.Commit(); err != nil {
				t.Fatalf("Commit after Discard: %v", err)
			}
			copy(before[5:], []byte{0x42, 0x42, 0x42})
			if !bytes.Equal(read(), before) {
				t.Fatal("the image after the next epoch is not that epoch applied")
			}
		})
	}
}

// TestJournalRefusesMixedEpochs: the held writes are of one epoch.
func TestJournalRefusesMixedEpochs(t *testing.T) {
	_, j := openImage(t, 4096, JournalLimits{}, nil)
	if err := j.AddEpoch(3, data(0, 1, 1)); err != nil {
		t.Fatal(err)
	}
	if err := j.AddEpoch(4, data(1, 1, 1)); !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), "epoch 3 is held") {
		t.Fatalf("a write of epoch 4 with epoch 3 held: %v", err)
	}
	if err := j.Commit(); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("Commit after a refused write: %v", err)
	}
}

// TestJournalRejectsWritesBeyondImage: a write that does not fit in the
// image is refused when it is recorded (Add, Direct) and again when it is
// applied (Commit), with an error naming it; the image neither grows nor
// changes.
func TestJournalRejectsWritesBeyondImage(t *testing.T) {
	const size = 4096
	for _, tc := range []struct {
		name string
		do   func(j *Journal) error
		says string // "" when it fits
	}{
		{"data to the end", func(j *Journal) error { return j.AddEpoch(812, data(size-512, 512, 1)) }, ""},
		{"zeroes to the end", func(j *Journal) error { return j.AddEpoch(812, zero(0, size)) }, ""},
		{"data across the end", func(j *Journal) error { return j.AddEpoch(812, data(size-512, 1024, 1)) },
			"diskmirror: epoch 812: write at 3584+1024 beyond image size 4096"},
		{"data past the end", func(j *Journal) error { return j.AddEpoch(812, data(size, 1, 1)) },
			"diskmirror: epoch 812: write at 4096+1 beyond image size 4096"},
		{"zeroes across the end", func(j *Journal) error { return j.AddEpoch(812, zero(4095, 2)) },
			"diskmirror: epoch 812: write at 4095+2 beyond image size 4096"},
		{"range overflows", func(j *Journal) error { return j.AddEpoch(812, zero(^uint64(0)-1, 4)) },
			"beyond image size 4096"},
		{"unnamed epoch", func(j *Journal) error { return j.Add(data(1<<40, 512, 1)) },
			"diskmirror: held epoch: write at 1099511627776+512 beyond image size 4096"},
		{"initial copy", func(j *Journal) error { return j.Direct(data(size-1, 2, 1)) },
			"diskmirror: initial copy: write at 4095+2 beyond image size 4096"},
		{"initial copy zeroes", func(j *Journal) error { return j.Direct(zero(size, 4096)) },
			"diskmirror: initial copy: write at 4096+4096 beyond image size 4096"},
		{"image shrank before the commit", func(j *Journal) error {
			if err := j.AddEpoch(9, data(1024, 512, 1)); err != nil {
				return err
			}
			if err := j.img.(*os.File).Truncate(1024); err != nil {
				return err
			}
			return j.Commit()
		}, "diskmirror: epoch 9: disk image is 1024 bytes, was 4096 when opened; nothing applied"},
		{"apply time", func(j *Journal) error {
			// An entry that did not pass Add: Commit checks again.
			j.epoch, j.named = 10, true
			j.entries = append(j.entries, entry{w: data(0, 512, 1)}, entry{w: data(size-10, 20, 2)})
			return j.Commit()
		}, "diskmirror: epoch 10: write at 4086+20 beyond image size 4096; nothing applied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, j := openImage(t, size, JournalLimits{}, nil)
			before, _ := os.ReadFile(img)
			err := tc.do(j)
			if tc.says == "" {
				if err != nil {
					t.Fatalf("a write that fits: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrOutOfRange) && !strings.Contains(tc.name, "shrank") {
				t.Errorf("%v: does not match ErrOutOfRange", err)
			}
			if err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %q, want it to say %q", err, tc.says)
			}
			var re *RangeError
			if errors.As(err, &re) && re.Size != size {
				t.Errorf("RangeError.Size = %d", re.Size)
			}
			j.Commit() // whatever is still held
			if st, err := os.Stat(img); err != nil || st.Size() > size {
				t.Fatalf("the image grew to %d bytes (%v)", st.Size(), err)
			}
			after, _ := os.ReadFile(img)
			if !strings.Contains(tc.name, "shrank") && !bytes.Equal(after, before) {
				t.Fatal("a refused write changed the image")
			}
		})
	}
}

func TestOpenJournalRefusesEmptyImage(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	j, err := OpenJournal(img, filepath.Join(dir, "journal"), 0)
	if err == nil {
		j.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("OpenJournal of an empty image: %v", err)
	}
}

// faultyImage fails the failWrite-th WriteAt (counting from 1) after
// writing half of it, and the next Sync when failSync is set.
type faultyImage struct {
	*os.File
	writes, failWrite int
	failSync          bool
}

func (f *faultyImage) WriteAt(b []byte, off int64) (int, error) {
	f.writes++
	if f.writes == f.failWrite {
		n, _ := f.File.WriteAt(b[:len(b)/2], off)
		return n, &os.PathError{Op: "write", Path: f.Name(), Err: unix.EIO}
	}
	return f.File.WriteAt(b, off)
}

func (f *faultyImage) Sync() error {
	if f.failSync {
		f.failSync = false
		return &os.PathError{Op: "sync", Path: f.Name(), Err: unix.EIO}
	}
	return f.File.Sync()
}

func faulty(j *Journal) *faultyImage {
	f := &faultyImage{File: j.img.(*os.File)}
	j.img = f
	return f
}

// applied returns image with ws applied in order.
func applied(image []byte, ws ...transport.DiskWrite) []byte {
	out := bytes.Clone(image)
	for _, w := range ws {
		if w.Flags&transport.DiskZero != 0 {
			clear(out[w.Offset : w.Offset+uint64(w.Length)])
		} else {
			copy(out[w.Offset:], w.Data)
		}
	}
	return out
}

// TestJournalCommitIsAllOrNothing: a Commit that fails midway (a write or
// the sync fails) says so, with ErrTornImage and how much was applied,
// and keeps the epoch: Commit again replays it whole. Discarded instead,
// it leaves an image no later epoch may commit onto until a new initial
// copy.
func TestJournalCommitIsAllOrNothing(t *testing.T) {
	epoch := []transport.DiskWrite{
		data(0, 600, 1),
		data(1000, 600, 2), // spilled
		data(300, 500, 3),  // spilled, overlaps the first
		data(5000, 100, 4),
		data(0, 10, 5),
	}
	for _, tc := range []struct {
		name      string
		failWrite int
		failSync  bool
		says      string
		discard   bool // instead of committing again
	}{
		{"first write fails", 1, false, "write 1 of 5: write 600 bytes at 0: write", false},
		{"third write fails", 3, false, "(2 of 5 writes applied)", false},
		{"last write fails", 5, false, "(4 of 5 writes applied)", false},
		{"sync fails", 0, true, "sync disk image: sync", false},
		{"third write fails, discarded", 3, false, "(2 of 5 writes applied)", true},
		{"sync fails, discarded", 0, true, "(all 5 writes applied, not known durable)", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, j := openImage(t, 64<<10, JournalLimits{Memory: 1000}, nil)
			read := func() []byte { b, _ := os.ReadFile(img); return b }
			base := read()
			for _, w := range epoch {
				if err := j.AddEpoch(5, w); err != nil {
					t.Fatal(err)
				}
			}
			n, b, s := j.Held()
			if s == 0 {
				t.Fatal("nothing spilled")
			}
			f := faulty(j)
			f.failWrite, f.failSync = tc.failWrite, tc.failSync
			err := j.Commit()
			if !errors.Is(err, ErrTornImage) || !errors.Is(err, unix.EIO) {
				t.Fatalf("Commit: %v, want ErrTornImage and EIO", err)
			}
			for _, want := range []string{"diskmirror: epoch 5: ", tc.says, "disk image holds part of an epoch", "Commit again replays it whole"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("Commit: %q, want it to say %q", err, want)
				}
			}
			if n2, b2, s2 := j.Held(); n2 != n || b2 != b || s2 != s {
				t.Fatalf("held %d/%d/%d after the failed Commit, %d/%d/%d before", n2, b2, s2, n, b, s)
			}
			torn := read()
			if !tc.discard {
				if err := j.Commit(); err != nil {
					t.Fatalf("Commit again: %v", err)
				}
				if !bytes.Equal(read(), applied(base, epoch...)) {
					t.Fatal("the image after the replay is not the epoch applied whole")
				}
				next := data(8000, 4, 6)
				if err := j.AddEpoch(6, next); err != nil {
					t.Fatal(err)
				}
				if err := j.Commit(); err != nil {
					t.Fatalf("the next epoch: %v", err)
				}
				if !bytes.Equal(read(), applied(base, append(epoch, next)...)) {
					t.Fatal("the image after the next epoch is wrong")
				}
				return
			}
			j.Discard()
			if err := j.AddEpoch(6, data(8000, 4, 6)); err != nil {
				t.Fatal(err)
			}
			err = j.Commit()
			if !errors.Is(err, ErrTornImage) || !strings.Contains(err.Error(), "epoch 5 was discarded after a Commit of it failed midway") ||
				!strings.Contains(err.Error(), "no epoch commits until a new initial copy") {
				t.Fatalf("Commit of the next epoch onto a torn image: %v", err)
			}
			if !bytes.Equal(read(), torn) {
				t.Fatal("an epoch was applied onto a torn image")
			}
			// A new session: its initial copy rewrites the image.
			j.Discard()
			if err := j.Direct(data(0, 8, 7)); err != nil {
				t.Fatal(err)
			}
			if err := j.AddEpoch(1, data(16, 8, 8)); err != nil {
				t.Fatal(err)
			}
			if err := j.Commit(); err != nil {
				t.Fatalf("Commit after a new initial copy: %v", err)
			}
		})
	}
}

// TestJournalFailedInitialCopyBlocksCommits: when a write of the initial
// copy fails, or its sync at the first Commit, the image lacks writes
// nothing holds any more: no epoch commits until a new initial copy.
func TestJournalFailedInitialCopyBlocksCommits(t *testing.T) {
	for _, tc := range []struct {
		name      string
		failWrite int
		failSync  bool
		says      string
	}{
		{"write fails", 2, false, "initial copy: write 100 bytes at 200: write"},
		{"sync fails", 0, true, "the initial copy is not known durable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, j := openImage(t, 64<<10, JournalLimits{}, nil)
			f := faulty(j)
			f.failWrite, f.failSync = tc.failWrite, tc.failSync
			j.Discard() // a session begins
			for _, w := range []transport.DiskWrite{data(0, 100, 1), data(200, 100, 2), data(400, 100, 3)} {
				j.Direct(w)
			}
			if err := j.AddEpoch(1, data(1000, 10, 4)); err != nil {
				t.Fatal(err)
			}
			err := j.Commit()
			if !errors.Is(err, ErrTornImage) || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("Commit: %v, want ErrTornImage saying %q", err, tc.says)
			}
			if err := j.Commit(); !errors.Is(err, ErrTornImage) || !strings.Contains(err.Error(), "until a new initial copy") {
				t.Fatalf("Commit again: %v", err)
			}
			j.Discard()
			if err := j.Direct(data(0, 100, 1)); err != nil {
				t.Fatal(err)
			}
			if err := j.AddEpoch(1, data(1000, 10, 4)); err != nil {
				t.Fatal(err)
			}
			if err := j.Commit(); err != nil {
				t.Fatalf("Commit after a new initial copy: %v", err)
			}
		})
	}
}

// TestRecorderWriteCountCapBlocksUntilCut: at MaxWrites held writes (zero
// writes, which the byte cap does not count) a write waits for the cut.
func TestRecorderWriteCountCapBlocksUntilCut(t *testing.T) {
	r := NewRecorder()
	r.MaxWrites = 3
	r.Record()
	ctx := context.Background()
	for i := range 3 {
		if err := r.Write(ctx, Write{Offset: uint64(i) * 512, Length: 512, Zero: true}); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- r.Write(ctx, Write{Offset: 4096, Length: 512, Zero: true}) }()
	select {
	case err := <-done:
		t.Fatalf("a write past the count cap did not wait (%v)", err)
	case <-time.After(50 * time.Millisecond):
	}
	if n := len(r.Cut()); n != 3 {
		t.Fatalf("cut took %d writes", n)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := len(r.Cut()); n != 1 {
		t.Fatalf("second cut took %d writes", n)
	}
	if DefaultEpochWrites > DefaultJournalWrites || DefaultEpochWriteCap+MaxRequestLength > DefaultJournalMemory+DefaultJournalSpill {
		t.Error("an epoch the primary cuts by default may not fit the backup's default journal")
	}
}

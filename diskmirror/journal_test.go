package diskmirror

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

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

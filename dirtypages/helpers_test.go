package dirtypages

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// newMemfd returns a memfd of size bytes named name.
func newMemfd(t testing.TB, name string, size int) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	f := os.NewFile(uintptr(fd), "/memfd:"+name)
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatalf("size memfd: %v", err)
	}
	return f
}

// newRAMFile returns a file of size bytes in a fresh temporary directory
// (tmpfs in the guest, and wherever TMPDIR points on the host).
func newRAMFile(t testing.TB, size int) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "guest.ram"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	return f
}

// mapShared maps all size bytes of f shared, read-write, until the test
// ends.
func mapShared(t testing.TB, f *os.File, size int) []byte {
	t.Helper()
	b, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap %s: %v", f.Name(), err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// word returns the 8-byte word at off of mem, which must be 8-byte aligned.
func word(mem []byte, off int) *uint64 {
	return (*uint64)(unsafe.Pointer(&mem[off]))
}

// writePage stores v in the slot-th word of page p.
func writePage(mem []byte, p int, slot int, v uint64) {
	atomic.StoreUint64(word(mem, p*PageSize+(slot%(PageSize/8))*8), v)
}

// fillPattern gives every page of mem distinct, non-zero content.
func fillPattern(mem []byte) {
	for off := 0; off < len(mem); off += 8 {
		binary.NativeEndian.PutUint64(mem[off:], uint64(off)*0x9E3779B97F4A7C15|1)
	}
}

// setOf returns the set of n pages holding pages.
func setOf(n int, pages ...int) *Set {
	s := NewSet(n)
	for _, p := range pages {
		s.Add(p)
	}
	return s
}

// harvest calls tr.Harvest and fails the test on error.
func harvest(t testing.TB, tr Tracker) *Set {
	t.Helper()
	s, err := tr.Harvest(context.Background())
	if err != nil {
		t.Fatalf("harvest: %v", err)
	}
	if s.Len() != tr.Pages() {
		t.Fatalf("harvest returned a set of %d pages for a tracker of %d", s.Len(), tr.Pages())
	}
	return s
}

// wantSet fails the test when got differs from want, naming the pages that
// are missing and extra.
func wantSet(t testing.TB, what string, got, want *Set) {
	t.Helper()
	if got.Equal(want) {
		return
	}
	missing, extra := want.Clone(), got.Clone()
	for p := range got.All() {
		if p < missing.Len() {
			missing.Remove(p)
		}
	}
	for p := range want.All() {
		if p < extra.Len() {
			extra.Remove(p)
		}
	}
	t.Fatalf("%s: got %v, want %v; missing %v; extra %v", what, got, want, missing, extra)
}

// addrOf is the virtual address of b's first byte.
func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

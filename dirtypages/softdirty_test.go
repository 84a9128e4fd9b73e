package dirtypages

import (
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"unsafe"
)

// fakePagemap plays /proc/PID/pagemap and clear_refs for a process whose
// entries start at virtual address base.
type fakePagemap struct {
	mu       sync.Mutex
	base     uintptr
	entries  []uint64
	clears   int
	readErr  error // returned by every read while set
	shortAt  int   // a read covering this entry stops before it; -1 for none
	clearErr error
	closed   bool
}

func newFakePagemap(base uintptr, n int) *fakePagemap {
	return &fakePagemap{base: base, entries: make([]uint64, n), shortAt: -1}
}

func (f *fakePagemap) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off%8 != 0 || len(p)%8 != 0 {
		return 0, errors.New("fake pagemap: unaligned read")
	}
	if f.readErr != nil {
		return 0, f.readErr
	}
	first := int(off/8) - int(f.base/PageSize)
	if first < 0 || first >= len(f.entries) {
		return 0, io.EOF
	}
	n := 0
	for i := first; i < len(f.entries) && n < len(p); i++ {
		if i == f.shortAt {
			return n, nil
		}
		*(*uint64)(unsafe.Pointer(&p[n])) = f.entries[i]
		n += 8
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *fakePagemap) ClearSoftDirty() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.clearErr != nil {
		return f.clearErr
	}
	f.clears++
	for i := range f.entries {
		f.entries[i] &^= 1 << pmSoftDirty
	}
	return nil
}

func (f *fakePagemap) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

// write marks entries as written: present, soft-dirty, with a PFN.
func (f *fakePagemap) write(entries ...int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, i := range entries {
		f.entries[i] |= 1<<pmPresent | 1<<pmSoftDirty | 0x12345
	}
}

// TestSoftDirtyHarvestFake checks the harvest logic (batching, parallel
// workers, bit decoding, page indexes) against a fake pagemap that also
// holds dirty entries just outside the mapping.
func TestSoftDirtyHarvestFake(t *testing.T) {
	const (
		pad   = 100            // entries before and after the mapping
		n     = 1000           // pages in the mapping, not a multiple of 64
		start = 0x7f0000000000 // address of the mapping
	)
	for _, tc := range []struct{ workers, batch int }{{1, 0}, {1, 64}, {2, 64}, {3, 128}, {4, 1000}} {
		t.Run(fmt.Sprintf("workers=%d/batch=%d", tc.workers, tc.batch), func(t *testing.T) {
			fake := newFakePagemap(start-pad*PageSize, pad+n+pad)
			m := Mapping{Start: start, End: start + n*PageSize, Perms: "rw-s", Inode: 1, Path: "/dev/shm/vm.ram"}
			sd, err := newSoftDirty(1234, m, fake, Options{Workers: tc.workers, BatchPages: tc.batch})
			if err != nil {
				t.Fatal(err)
			}
			defer sd.Close()
			if sd.Pages() != n {
				t.Fatalf("Pages() = %d", sd.Pages())
			}
			page := func(p ...int) []int { // page indexes to fake entries
				out := make([]int, len(p))
				for i := range p {
					out[i] = pad + p[i]
				}
				return out
			}
			fake.write(page(0, 5)...)
			wantSet(t, "first harvest", harvest(t, sd), NewFullSet(n))
			if fake.clears != 1 {
				t.Fatalf("first harvest cleared %d times", fake.clears)
			}
			wantSet(t, "no writes", harvest(t, sd), NewSet(n))

			fake.write(pad-1, pad+n) // neighbours of the mapping
			fake.write(page(0, 63, 64, 127, 128, 500, n-1)...)
			// Present, mapped, but not soft-dirty: not reported.
			fake.entries[pad+7] = 1<<pmPresent | 1<<61 | 0xfff
			wantSet(t, "writes", harvest(t, sd), setOf(n, 0, 63, 64, 127, 128, 500, n-1))

			fake.write(page(2)...)
			wantSet(t, "next epoch", harvest(t, sd), setOf(n, 2))

			all := make([]int, n)
			for i := range all {
				all[i] = i
			}
			fake.write(page(all...)...)
			wantSet(t, "every page", harvest(t, sd), NewFullSet(n))
			if fake.clears != 5 {
				t.Fatalf("%d clears after 5 harvests", fake.clears)
			}
		})
	}
}

func TestSoftDirtyFailuresResync(t *testing.T) {
	const n = 300
	const start = 0x10000000
	m := Mapping{Start: start, End: start + n*PageSize, Inode: 1}
	fake := newFakePagemap(start, n)
	sd, err := newSoftDirty(77, m, fake, Options{Workers: 2, BatchPages: 64})
	if err != nil {
		t.Fatal(err)
	}
	harvest(t, sd)

	fake.write(3)
	fake.readErr = errors.New("input/output error")
	_, err = sd.Harvest(context.Background())
	if err == nil || !strings.Contains(err.Error(), "dirtypages: pagemap of pid 77: input/output error") {
		t.Fatalf("failed read: %v", err)
	}
	fake.readErr = nil
	wantSet(t, "after failed read", harvest(t, sd), NewFullSet(n))

	fake.write(4)
	fake.shortAt = 200
	_, err = sd.Harvest(context.Background())
	if err == nil || !strings.Contains(err.Error(), "short read at page 192") {
		t.Fatalf("short read: %v", err)
	}
	fake.shortAt = -1
	wantSet(t, "after short read", harvest(t, sd), NewFullSet(n))

	fake.write(5)
	fake.clearErr = errors.New("permission denied")
	_, err = sd.Harvest(context.Background())
	if err == nil || !strings.Contains(err.Error(), "dirtypages: clear_refs of pid 77: permission denied") {
		t.Fatalf("failed clear: %v", err)
	}
	fake.clearErr = nil
	wantSet(t, "after failed clear", harvest(t, sd), NewFullSet(n))
	wantSet(t, "then", harvest(t, sd), NewSet(n))

	fake.write(6)
	if _, err := sd.Harvest(newCancelDuring()); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled harvest: %v", err)
	}
	wantSet(t, "after cancelled harvest", harvest(t, sd), NewFullSet(n))

	if err := sd.Close(); err != nil || !fake.closed {
		t.Fatalf("close: %v, source closed %v", err, fake.closed)
	}
	if _, err := sd.Harvest(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("harvest after close: %v", err)
	}
}

func TestNewSoftDirtyRejectsMappings(t *testing.T) {
	for name, m := range map[string]Mapping{
		"empty":            {Start: 0x1000, End: 0x1000},
		"unaligned start":  {Start: 0x1001, End: 0x3000},
		"unaligned end":    {Start: 0x1000, End: 0x2001},
		"not at offset 0":  {Start: 0x1000, End: 0x3000, Offset: 0x1000},
		"negative workers": {Start: 0x1000, End: 0x3000},
	} {
		t.Run(name, func(t *testing.T) {
			opts := Options{}
			if name == "negative workers" {
				opts.Workers = -2
			}
			if _, err := newSoftDirty(1, m, newFakePagemap(0x1000, 2), opts); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

// TestPagemapReadPathOwn runs the real pagemap read path (procSource, the
// offsets, batching and decoding) on a mapping of this process, with the
// present bit in place of the soft-dirty bit: it works on any kernel.
func TestPagemapReadPathOwn(t *testing.T) {
	const n = 300
	mem := mapShared(t, newMemfd(t, "dirtypages-readpath", n*PageSize), n*PageSize)
	m, err := FindMapping(os.Getpid(), "dirtypages-readpath")
	if err != nil {
		t.Fatal(err)
	}
	src, err := openProc(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	sd, err := newSoftDirty(os.Getpid(), m, src, Options{Workers: 2, BatchPages: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer sd.Close()
	touched := []int{0, 3, 63, 64, 200, n - 1}
	for _, p := range touched {
		writePage(mem, p, 0, 1) // a write fault maps just this page
	}
	got := NewSet(n)
	if err := sd.scan(context.Background(), got, pmPresent); err != nil {
		t.Fatal(err)
	}
	wantSet(t, "present pages", got, setOf(n, touched...))
}

// kernelConfig reports whether the running kernel's configuration (from
// /proc/config.gz) sets option to y: known is false when there is no
// configuration to read.
func kernelConfig(option string) (set, known bool) {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return false, false
	}
	defer f.Close()
	z, err := gzip.NewReader(f)
	if err != nil {
		return false, false
	}
	sc := bufio.NewScanner(z)
	for sc.Scan() {
		switch sc.Text() {
		case option + "=y":
			return true, true
		case "# " + option + " is not set":
			return false, true
		}
	}
	return false, sc.Err() == nil
}

// TestSoftDirtySupported checks the detection against what is known of the
// kernel: inside the test guest (Debian's kernel) it must succeed; where
// /proc/config.gz says CONFIG_MEM_SOFT_DIRTY is not set it must fail with
// the clear reason.
func TestSoftDirtySupported(t *testing.T) {
	err := SoftDirtySupported()
	set, known := kernelConfig("CONFIG_MEM_SOFT_DIRTY")
	switch {
	case *inGuest || (known && set):
		if err != nil {
			t.Fatalf("kernel has CONFIG_MEM_SOFT_DIRTY=y, detection says: %v", err)
		}
	case known && !set:
		const want = "dirtypages: soft-dirty tracking unsupported: kernel lacks CONFIG_MEM_SOFT_DIRTY: soft-dirty bit never set"
		if !errors.Is(err, ErrSoftDirtyUnsupported) || err.Error() != want {
			t.Fatalf("kernel without CONFIG_MEM_SOFT_DIRTY, detection says: %v; want %q", err, want)
		}
	default:
		if err != nil && !errors.Is(err, ErrSoftDirtyUnsupported) {
			t.Fatalf("detection failed without a reason: %v", err)
		}
	}
	t.Logf("SoftDirtySupported() = %v", err)
}

func TestNewSoftDirtyRefusesUnsupportedKernel(t *testing.T) {
	if SoftDirtySupported() == nil {
		t.Skip("the kernel tracks soft-dirty pages; nothing to refuse")
	}
	const size = 4 * PageSize
	mapShared(t, newMemfd(t, "dirtypages-refuse", size), size)
	m, err := FindMapping(os.Getpid(), "dirtypages-refuse")
	if err != nil {
		t.Fatal(err)
	}
	if sd, err := NewSoftDirty(os.Getpid(), m, Options{}); !errors.Is(err, ErrSoftDirtyUnsupported) {
		if sd != nil {
			sd.Close()
		}
		t.Fatalf("NewSoftDirty on a kernel without soft-dirty: %v", err)
	}
}

// requireSoftDirty skips the test, saying why, when the kernel cannot track
// soft-dirty pages, except inside the test guest, where the kernel can and
// the test must run: there it fails instead.
func requireSoftDirty(t *testing.T) {
	t.Helper()
	if err := SoftDirtySupported(); err != nil {
		if *inGuest {
			t.Fatalf("in the test guest, whose kernel has CONFIG_MEM_SOFT_DIRTY=y: %v", err)
		}
		t.Skip(err.Error())
	}
}

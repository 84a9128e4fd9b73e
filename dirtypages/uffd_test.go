package dirtypages

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeScanner plays PAGEMAP_SCAN with PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING
// and PM_SCAN_CHECK_WPASYNC over pages [0, n) at virtual address base: it
// reports runs of written pages, clears them, and stops when its output is
// full, as the kernel does.
type fakeScanner struct {
	mu      sync.Mutex
	base    uint64
	written []bool
	// shortWalkEnd makes a call that returns more than 512 regions set
	// walk_end short of where it stopped, as Linux 6.18 does.
	shortWalkEnd bool
	err          error // returned by every call while set
	failAfter    int   // the call after this many fails with err; 0 for none
	bogus        *pageRegion
	calls        int
	closed       bool
}

func newFakeScanner(base uintptr, n int) *fakeScanner {
	return &fakeScanner{base: uint64(base), written: make([]bool, n)}
}

func (f *fakeScanner) Scan(arg *pmScanArg, vec []pageRegion) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.err != nil && (f.failAfter == 0 || f.calls > f.failAfter) {
		return 0, f.err
	}
	if arg.Size != 96 || arg.Flags != pmScanWPMatching|pmScanCheckWPAsync || arg.CategoryMask != pageIsWritten || arg.ReturnMask != pageIsWritten {
		return 0, fmt.Errorf("fake PAGEMAP_SCAN: unexpected arguments %+v", *arg)
	}
	if f.bogus != nil {
		vec[0] = *f.bogus
		return 1, nil
	}
	first := int((arg.Start - f.base) / PageSize)
	last := int((arg.End - f.base) / PageSize)
	n := 0
	p := first
	for ; p < last; p++ {
		if !f.written[p] {
			continue
		}
		addr := f.base + uint64(p)*PageSize
		if n > 0 && vec[n-1].End == addr {
			vec[n-1].End += PageSize
		} else {
			if n == len(vec) {
				break // output full: stop at this page
			}
			vec[n] = pageRegion{Start: addr, End: addr + PageSize, Categories: pageIsWritten}
			n++
		}
		f.written[p] = false
	}
	arg.WalkEnd = f.base + uint64(p)*PageSize
	if f.shortWalkEnd && n > 512 {
		arg.WalkEnd = arg.Start + (arg.WalkEnd-arg.Start)/2&^(PageSize-1)
	}
	return n, nil
}

func (f *fakeScanner) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

func (f *fakeScanner) write(pages ...int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range pages {
		f.written[p] = true
	}
}

// newFakeUffd is a Uffd tracker of n pages at base on a fake scanner,
// whose calls return at most regions regions.
func newFakeUffd(base uintptr, n, regions int) (*Uffd, *fakeScanner) {
	fake := newFakeScanner(base, n)
	m := Mapping{Start: base, End: base + uintptr(n)*PageSize, Inode: 1}
	return &Uffd{pid: 4321, m: m, pages: n, uffd: -1, scanner: fake, regions: make([]pageRegion, regions)}, fake
}

// TestUffdHarvestFake checks the harvest's loop over PAGEMAP_SCAN calls
// (output full, walk_end followed, the short walk_end of Linux 6.18) and
// page indexes against a fake.
func TestUffdHarvestFake(t *testing.T) {
	const (
		n     = 5000 // pages, not a multiple of 64
		start = 0x7f0000000000
	)
	for _, tc := range []struct {
		regions int
		short   bool
	}{{4096, false}, {4096, true}, {1000, true}, {7, false}, {1, false}} {
		t.Run(fmt.Sprintf("regions=%d/short=%v", tc.regions, tc.short), func(t *testing.T) {
			u, fake := newFakeUffd(start, n, tc.regions)
			fake.shortWalkEnd = tc.short
			defer u.Close()
			fake.write(0, 5)
			wantSet(t, "first harvest", harvest(t, u), NewFullSet(n))
			wantSet(t, "no writes", harvest(t, u), NewSet(n))

			fake.write(0, 63, 64, 127, 128, 500, 501, 502, n-1)
			wantSet(t, "writes", harvest(t, u), setOf(n, 0, 63, 64, 127, 128, 500, 501, 502, n-1))

			// Every other page: n/2 regions, more than one call holds.
			var alternate []int
			for p := 0; p < n; p += 2 {
				alternate = append(alternate, p)
			}
			fake.write(alternate...)
			fake.calls = 0
			wantSet(t, "every other page", harvest(t, u), setOf(n, alternate...))
			if min := (n/2 + tc.regions - 1) / tc.regions; fake.calls < min {
				t.Errorf("%d regions in %d calls of at most %d", n/2, fake.calls, tc.regions)
			}

			all := make([]int, n)
			for i := range all {
				all[i] = i
			}
			fake.write(all...)
			wantSet(t, "every page", harvest(t, u), NewFullSet(n))
			wantSet(t, "quiet", harvest(t, u), NewSet(n))
		})
	}
}

// TestUffdFailuresResync: a harvest that fails (at the first call, half
// way, on a cancelled context, on a region outside the range) makes the
// next one report every page.
func TestUffdFailuresResync(t *testing.T) {
	const n = 300
	const start = 0x10000000
	u, fake := newFakeUffd(start, n, 4)
	harvest(t, u)

	fake.write(3)
	fake.err = unix.EPERM
	_, err := u.Harvest(context.Background())
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "dirtypages: uffd harvest of pid 4321: PAGEMAP_SCAN of 0x10000000-0x1012c000") ||
		!strings.Contains(err.Error(), "not registered for write-protection") {
		t.Fatalf("failed scan: %v", err)
	}
	fake.err = nil
	wantSet(t, "after failed scan", harvest(t, u), NewFullSet(n))

	// The second call fails, after the first consumed some writes.
	fake.write(10, 12, 14, 16, 18, 20)
	fake.err, fake.failAfter, fake.calls = unix.EIO, 1, 0
	if _, err := u.Harvest(context.Background()); !errors.Is(err, unix.EIO) {
		t.Fatalf("scan failing half way: %v", err)
	}
	fake.err, fake.failAfter = nil, 0
	wantSet(t, "after failure half way", harvest(t, u), NewFullSet(n))
	wantSet(t, "then", harvest(t, u), NewSet(n))

	// More regions than one call returns: the context is looked at
	// between calls.
	fake.write(10, 12, 14, 16, 18, 20)
	if _, err := u.Harvest(newCancelDuring()); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled between calls: %v", err)
	}
	wantSet(t, "after cancelled harvest", harvest(t, u), NewFullSet(n))

	fake.bogus = &pageRegion{Start: start - PageSize, End: start + PageSize}
	if _, err := u.Harvest(context.Background()); err == nil || !strings.Contains(err.Error(), "returned region 0xffff000-0x10001000") {
		t.Fatalf("region outside the range: %v", err)
	}
	fake.bogus = nil
	wantSet(t, "after bogus region", harvest(t, u), NewFullSet(n))

	if err := u.Close(); err != nil || !fake.closed {
		t.Fatalf("close: %v, scanner closed %v", err, fake.closed)
	}
	if _, err := u.Harvest(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("harvest after close: %v", err)
	}
	if err := u.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

func TestNewUffdRejectsMappings(t *testing.T) {
	for name, m := range map[string]Mapping{
		"empty":           {Start: 0x1000, End: 0x1000},
		"unaligned start": {Start: 0x1001, End: 0x3000},
		"unaligned end":   {Start: 0x1000, End: 0x2001},
		"not at offset 0": {Start: 0x1000, End: 0x3000, Offset: 0x1000},
	} {
		t.Run(name, func(t *testing.T) {
			if u, err := NewUffd(os.Getpid(), m, Options{}); err == nil {
				u.Close()
				t.Fatal("accepted")
			}
		})
	}
	if _, err := NewUffd(os.Getpid(), Mapping{Start: 0x1000, End: 0x3000}, Options{Workers: -1}); err == nil {
		t.Fatal("negative workers accepted")
	}
}

// kernelAtLeast reports whether the running kernel's version is at least
// major.minor.
func kernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	var ma, mi int
	fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &ma, &mi)
	return ma > major || ma == major && mi >= minor
}

// uffdExpected reports whether the running kernel should support the
// tracker: Linux 6.7 or later, built with userfaultfd's write-protection
// of shared memory (when its configuration can be read).
func uffdExpected() bool {
	if !kernelAtLeast(6, 7) {
		return false
	}
	for _, opt := range []string{"CONFIG_USERFAULTFD", "CONFIG_PTE_MARKER_UFFD_WP"} {
		if set, known := kernelConfig(opt); known && !set {
			return false
		}
	}
	return true
}

// TestUffdSupported: on a kernel that has what the tracker needs the
// detection succeeds; elsewhere it fails with a reason.
func TestUffdSupported(t *testing.T) {
	err := UffdSupported()
	t.Logf("UffdSupported() = %v", err)
	if err != nil && !errors.Is(err, ErrUffdUnsupported) {
		t.Fatalf("detection failed without a reason: %v", err)
	}
	if err != nil && uffdExpected() && !*inGuest {
		t.Fatalf("Linux 6.7 or later with CONFIG_USERFAULTFD and CONFIG_PTE_MARKER_UFFD_WP, yet: %v", err)
	}
}

// requireUffd skips the test, saying why, when the kernel cannot track
// with userfaultfd; where it should be able to, the test fails instead.
func requireUffd(t testing.TB) {
	t.Helper()
	if err := UffdSupported(); err != nil {
		if uffdExpected() {
			t.Fatalf("the kernel should support userfaultfd write-protect tracking: %v", err)
		}
		t.Skip(err.Error())
	}
}

// shmFile returns a file of size bytes under /dev/shm (shmem, like QEMU's
// usual mem-path), removed at cleanup.
func shmFile(t testing.TB, size int) *os.File {
	t.Helper()
	f, err := os.CreateTemp("/dev/shm", "dirtypages-test-*.ram")
	if err != nil {
		t.Skipf("needs /dev/shm: %v", err)
	}
	t.Cleanup(func() { f.Close(); os.Remove(f.Name()) })
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestUffdTracksChild tracks a helper process's writes to shared memory
// (a memfd, a file under /dev/shm, a file in the temporary directory,
// wherever that is) with the uffd tracker, as the agent
// tracks QEMU, and the compare tracker on the same memory beside it: uffd
// must report exactly the pages written (by the process, or by the kernel
// for it: read(2) into the page), same-value writes included, compare
// exactly the pages whose content changed; over fixed rounds, then many
// random ones.
func TestUffdTracksChild(t *testing.T) {
	requireUffd(t)
	for _, backing := range []string{"memfd", "shm", "file"} {
		t.Run(backing, func(t *testing.T) { testUffdTracksChild(t, backing) })
	}
}

func testUffdTracksChild(t *testing.T, backing string) {
	const n = 4096 + 100 // pages: 16 MiB and a partial bitmap word
	size := n * PageSize
	var f *os.File
	var name string
	switch backing {
	case "memfd", "file":
		f, name = childMemory(t, backing, size)
	case "shm":
		f = shmFile(t, size)
		name = f.Name()
	}
	c := startDetachedChild(t, f, size)
	m, err := FindMapping(c.pid, name)
	if err != nil {
		t.Fatal(err)
	}
	if m.Start != c.addr || m.Len() != uintptr(size) {
		t.Fatalf("found %v; the child mapped %d bytes at %#x", m, size, c.addr)
	}
	// Some pages hold data, and some are mapped in, before tracking starts;
	// most are not.
	c.write(t, 1, 2, 3, 1000)
	u, err := NewUffd(c.pid, m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	t.Logf("the child's main thread was stopped %v to make the userfaultfd", u.Held())
	cmp, err := NewCompare(mapShared(t, f, size), Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer cmp.Close()
	wantSet(t, "first uffd harvest", harvest(t, u), NewFullSet(n))
	wantSet(t, "first compare harvest", harvest(t, cmp), NewFullSet(n))

	rng := rand.New(rand.NewPCG(42, 0))
	randomPages := func(k int) []int {
		out := make([]int, k)
		for i := range out {
			out[i] = rng.IntN(n)
		}
		return out
	}
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	var alternate []int
	for p := 0; p < n; p += 2 {
		alternate = append(alternate, p)
	}
	type round struct {
		name    string
		written []int // content changed by the child
		kernel  []int // content changed by the kernel (read(2))
		same    []int // written with the value they hold
	}
	rounds := []round{
		{name: "quiet"},
		{name: "first page", written: []int{0}},
		{name: "last page", written: []int{n - 1}},
		{name: "word boundaries", written: []int{60, 61, 62, 63, 64, 65, 127, 128, 1023, 1024, 1025}},
		{name: "random", written: randomPages(300)},
		{name: "quiet again"},
		{name: "same values", written: []int{8}, same: []int{5, 6, 7, 1000}},
		{name: "kernel writes", kernel: []int{9, 10, 4000, n - 2}},
		{name: "same values never touched", same: []int{3000, 3001}},
		{name: "every other page", written: alternate},
		{name: "every page", written: all},
		{name: "random after all", written: randomPages(50), kernel: randomPages(5), same: randomPages(20)},
	}
	for i := range 200 {
		rounds = append(rounds, round{
			name:    "random round " + strconv.Itoa(i),
			written: randomPages(rng.IntN(400)),
			kernel:  randomPages(rng.IntN(4)),
			same:    randomPages(rng.IntN(20)),
		})
	}
	total := 0
	for _, r := range rounds {
		if len(r.written) > 0 {
			c.write(t, r.written...)
		}
		if len(r.kernel) > 0 {
			c.kernelWrite(t, r.kernel...)
		}
		if len(r.same) > 0 {
			c.rewrite(t, r.same...)
		}
		gotU := harvest(t, u)
		gotCmp := harvest(t, cmp)
		changed := setOf(n, append(slices.Clone(r.written), r.kernel...)...)
		writes := changed.Clone()
		writes.Union(setOf(n, r.same...))
		wantSet(t, r.name+": uffd", gotU, writes)
		wantSet(t, r.name+": compare", gotCmp, changed)
		total += gotU.Count()
	}
	t.Logf("%d rounds, %d pages reported, all exactly the pages written", len(rounds), total)

	// Closing ends the registration: the child writes on, and a new
	// tracker of the same mapping can register it again.
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	c.write(t, 1, 2, 3)
	u2, err := NewUffd(c.pid, m, Options{})
	if err != nil {
		t.Fatalf("a second tracker after the first closed: %v", err)
	}
	defer u2.Close()
	harvest(t, u2)
	c.write(t, 7)
	wantSet(t, "second tracker", harvest(t, u2), setOf(n, 7))
}

// TestNewUffdRefusesChild: a process that is a child of the agent is
// refused (its ptrace stops would reach whoever waits for it), and left
// unharmed.
func TestNewUffdRefusesChild(t *testing.T) {
	requireUffd(t)
	const size = 64 * PageSize
	f, name := childMemory(t, "memfd", size)
	c := startChild(t, f, size)
	m, err := FindMapping(c.pid, name)
	if err != nil {
		t.Fatal(err)
	}
	if u, err := NewUffd(c.pid, m, Options{}); err == nil || !strings.Contains(err.Error(), "child of this process") {
		if u != nil {
			u.Close()
		}
		t.Fatalf("a child of the test: %v", err)
	}
	c.write(t, 1)
}

// TestUffdReportsReclaimedPageOfChild reclaims written pages of the helper
// process's mapping (madvise MADV_PAGEOUT on a memfd: the kernel unmaps
// the page, and its page table entry, which held the record of the write,
// goes with it): they are reported all the same, since an entry with no
// write-protection marker counts as written. Pages reclaimed unwritten
// keep their marker and are not reported.
func TestUffdReportsReclaimedPageOfChild(t *testing.T) {
	requireUffd(t)
	const n = 256
	f, name := childMemory(t, "memfd", n*PageSize)
	c := startDetachedChild(t, f, n*PageSize)
	m, err := FindMapping(c.pid, name)
	if err != nil {
		t.Fatal(err)
	}
	src, err := openProc(c.pid)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	present := func(p int) bool {
		var e [8]byte
		if _, err := src.ReadAt(e[:], int64(m.Start/PageSize+uintptr(p))*8); err != nil {
			t.Fatal(err)
		}
		return binary.NativeEndian.Uint64(e[:])>>pmPresent&1 != 0
	}
	c.write(t, 10, 11, 12, 100, 200)
	u, err := NewUffd(c.pid, m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	wantSet(t, "first harvest", harvest(t, u), NewFullSet(n))
	c.write(t, 10, 11, 100)
	// MADV_PAGEOUT is advice: ask again until each page is out.
	for try, left := 1, []int{10, 12, 100}; len(left) > 0; try++ {
		if err := c.pageOut(t, left...); err != nil {
			t.Fatalf("reclaim: %v", err)
		}
		left = slices.DeleteFunc(left, func(p int) bool { return !present(p) })
		if len(left) > 0 && try == 50 {
			t.Fatalf("pages %v still mapped after %d MADV_PAGEOUT calls", left, try)
		}
		if len(left) > 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	wantSet(t, "after reclaim", harvest(t, u), setOf(n, 10, 11, 100))
	wantSet(t, "still reclaimed", harvest(t, u), NewSet(n))
	c.write(t, 10, 12)
	wantSet(t, "written after reclaim", harvest(t, u), setOf(n, 10, 12))
}

// TestNewAutoChoosesUffd: on a kernel that supports it, the automatic
// choice for a process that is no child of the agent is the uffd tracker,
// with nothing passed over.
func TestNewAutoChoosesUffd(t *testing.T) {
	requireUffd(t)
	const n = 64
	f, name := childMemory(t, "memfd", n*PageSize)
	c := startDetachedChild(t, f, n*PageSize)
	m, err := FindMapping(c.pid, name)
	if err != nil {
		t.Fatal(err)
	}
	tr, fallback, err := NewAuto(c.pid, m, mapShared(t, f, n*PageSize), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if _, ok := tr.(*Uffd); !ok || fallback != nil {
		t.Fatalf("chose %T, passing over %v", tr, fallback)
	}
	harvest(t, tr)
	c.write(t, 5)
	wantSet(t, "after a write", harvest(t, tr), setOf(n, 5))
}

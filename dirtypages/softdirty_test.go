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
	smaps    string // what Smaps returns
	smapsErr error  // returned by Smaps while set
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

func (f *fakePagemap) Smaps() ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.smapsErr != nil {
		return nil, f.smapsErr
	}
	return []byte(f.smaps), nil
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
	dirty, got := NewSet(n), NewSet(n)
	if err := sd.scan(context.Background(), dirty, got, nil); err != nil {
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

// smapsVMA formats m as an entry of /proc/PID/smaps with VmFlags flags,
// with the fields the kernel prints in between. Locked shows half of Size,
// as it does for a locked VMA whose pages another process (the agent) maps
// too: the check must not rely on it.
func smapsVMA(m Mapping, flags string) string {
	kb := m.Len() >> 10
	locked := uintptr(0)
	if strings.Contains(" "+flags+" ", " lo ") {
		locked = kb / 2
	}
	return fmt.Sprintf("%x-%x %s %08x %02x:%02x %d                       %s\n"+
		"Size:           %8d kB\nKernelPageSize:        4 kB\nMMUPageSize:           4 kB\n"+
		"Rss:            %8d kB\nPss:            %8d kB\nSwap:                  0 kB\n"+
		"Locked:         %8d kB\nTHPeligible:    0\nVmFlags: %s\n",
		m.Start, m.End, m.Perms, m.Offset, m.Major, m.Minor, m.Inode, m.Path, kb, kb, kb/2, locked, flags)
}

// Flags of a shared read-write mapping of guest RAM, unlocked and locked
// (VM_LOCKED: "lo"), as smaps shows them.
const (
	ramFlags       = "rd wr sh mr mw me ms sd"
	lockedRAMFlags = "rd wr sh mr mw me ms lo sd"
)

// lockTestRAM is guest RAM of 64 pages at 0x7f0000000000 that QEMU maps in
// two VMAs (the kernel splits a mapping when part of it changes flags),
// with smaps entries around it.
var lockTestRAM = struct {
	m, lo, hi, before, after Mapping
}{
	m:      Mapping{Start: 0x7f0000000000, End: 0x7f0000040000, Perms: "rw-s", Minor: 0x1a, Inode: 4242, Path: "/dev/shm/vm.ram"},
	lo:     Mapping{Start: 0x7f0000000000, End: 0x7f0000020000, Perms: "rw-s", Minor: 0x1a, Inode: 4242, Path: "/dev/shm/vm.ram"},
	hi:     Mapping{Start: 0x7f0000020000, End: 0x7f0000040000, Perms: "rw-s", Offset: 0x20000, Minor: 0x1a, Inode: 4242, Path: "/dev/shm/vm.ram"},
	before: Mapping{Start: 0x55f88adc1000, End: 0x55f88adc3000, Perms: "r--p", Major: 0xfe, Inode: 247026, Path: "/usr/bin/qemu-system-x86_64"},
	after:  Mapping{Start: 0x7f0000040000, End: 0x7f0000041000, Perms: "---p"},
}

// lockedSmaps is smaps of a process whose guest RAM (lockTestRAM) is
// locked, and nothing else is.
func lockedSmaps() string {
	r := lockTestRAM
	return smapsVMA(r.before, "rd mr mw me dw sd") + smapsVMA(r.lo, lockedRAMFlags) + smapsVMA(r.hi, lockedRAMFlags) + smapsVMA(r.after, "mr mw me sd")
}

func TestParseSmaps(t *testing.T) {
	vmas, err := parseSmaps(strings.NewReader(lockedSmaps()))
	if err != nil {
		t.Fatal(err)
	}
	if len(vmas) != 4 {
		t.Fatalf("%d VMAs, want 4: %+v", len(vmas), vmas)
	}
	if vmas[2].Mapping != lockTestRAM.hi || !vmas[2].hasFlag("lo") || !vmas[2].hasFlag("sh") || vmas[2].hasFlag("l") {
		t.Errorf("VMA 2 parsed as %+v", vmas[2])
	}
	if vmas[0].hasFlag("lo") || vmas[3].Path != "" {
		t.Errorf("VMAs 0 and 3 parsed as %+v, %+v", vmas[0], vmas[3])
	}
	if _, err := parseSmaps(strings.NewReader("Size: 4 kB\n")); err == nil {
		t.Error("a field before any mapping was accepted")
	}
}

// TestSoftDirtyAcceptsLockedRAM: guest RAM whose VMAs all have VM_LOCKED
// is tracked, although smaps' Locked: shows less than Size.
func TestSoftDirtyAcceptsLockedRAM(t *testing.T) {
	r := lockTestRAM
	fake := newFakePagemap(r.m.Start, r.m.Pages())
	fake.smaps = lockedSmaps()
	sd, err := newLockedSoftDirty(1234, r.m, fake, Options{})
	if err != nil {
		t.Fatalf("locked RAM refused: %v", err)
	}
	defer sd.Close()
	wantSet(t, "first harvest", harvest(t, sd), NewFullSet(r.m.Pages()))
	fake.write(3)
	wantSet(t, "second harvest", harvest(t, sd), setOf(r.m.Pages(), 3))
}

// TestSoftDirtyRefusesUnlockedRAM: guest RAM with a VMA lacking VM_LOCKED
// is refused with ErrRAMNotLocked and a message naming what is unlocked
// and the fix; smaps that no longer show the mapping, or cannot be read,
// are refused too.
func TestSoftDirtyRefusesUnlockedRAM(t *testing.T) {
	r := lockTestRAM
	for _, tc := range []struct {
		name     string
		smaps    string
		smapsErr error
		notLock  bool     // the error wraps ErrRAMNotLocked
		want     []string // in the message
	}{{
		name:    "unlocked",
		smaps:   smapsVMA(r.before, "rd mr mw me dw sd lo") + smapsVMA(r.lo, ramFlags) + smapsVMA(r.hi, ramFlags),
		notLock: true,
		want: []string{
			"dirtypages: guest RAM not locked in memory: pid 1234 maps /dev/shm/vm.ram at 0x7f0000000000-0x7f0000040000 without VM_LOCKED",
			"(unlocked: 0x7f0000000000-0x7f0000020000, 0x7f0000020000-0x7f0000040000)",
			"start QEMU with -overcommit mem-lock=on, or use the compare tracker",
		},
	}, {
		name:    "half locked",
		smaps:   smapsVMA(r.lo, lockedRAMFlags) + smapsVMA(r.hi, ramFlags),
		notLock: true,
		want:    []string{"(unlocked: 0x7f0000020000-0x7f0000040000)", "-overcommit mem-lock=on"},
	}, {
		name:    "no VmFlags",
		smaps:   strings.ReplaceAll(smapsVMA(r.m, lockedRAMFlags), "VmFlags: "+lockedRAMFlags+"\n", ""),
		notLock: true,
		want:    []string{"-overcommit mem-lock=on"},
	}, {
		name:  "mapping gone",
		smaps: smapsVMA(r.before, "rd mr mw me dw sd"),
		want:  []string{"dirtypages: soft-dirty of pid 1234: smaps no longer shows /dev/shm/vm.ram mapped at 0x7f0000000000-0x7f0000040000 (nothing at 0x7f0000000000)"},
	}, {
		name:  "half gone",
		smaps: smapsVMA(r.lo, lockedRAMFlags),
		want:  []string{"(nothing at 0x7f0000020000)"},
	}, {
		name:  "another file there",
		smaps: smapsVMA(r.lo, lockedRAMFlags) + smapsVMA(Mapping{Start: r.hi.Start, End: r.hi.End, Perms: "rw-s", Minor: 0x1a, Inode: 99, Path: "/dev/shm/other"}, lockedRAMFlags),
		want:  []string{"smaps no longer shows /dev/shm/vm.ram", "/dev/shm/other"},
	}, {
		name:  "huge pages",
		smaps: smapsVMA(r.m, lockedRAMFlags+" ht"),
		want:  []string{"is on huge pages (hugetlbfs)", "use the compare tracker"},
	}, {
		name:     "smaps unreadable",
		smapsErr: errors.New("read smaps: permission denied"),
		want:     []string{"dirtypages: soft-dirty of pid 1234: read smaps: permission denied"},
	}, {
		name:  "smaps garbled",
		smaps: "Size: 4 kB\n",
		want:  []string{"dirtypages: soft-dirty of pid 1234: smaps: line 1"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFakePagemap(r.m.Start, r.m.Pages())
			fake.smaps, fake.smapsErr = tc.smaps, tc.smapsErr
			sd, err := newLockedSoftDirty(1234, r.m, fake, Options{})
			if err == nil {
				sd.Close()
				t.Fatal("accepted")
			}
			if errors.Is(err, ErrRAMNotLocked) != tc.notLock {
				t.Errorf("errors.Is(err, ErrRAMNotLocked) = %v: %v", !tc.notLock, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if fake.clears != 0 {
				t.Errorf("refused, yet cleared the soft-dirty bits %d times", fake.clears)
			}
		})
	}
}

// TestAutoChooses: the automatic choice takes uffd where it can be made,
// else soft-dirty for locked RAM, else compare, giving the reasons for
// what it passed over.
func TestAutoChooses(t *testing.T) {
	r := lockTestRAM
	ram := mapShared(t, newMemfd(t, "dirtypages-auto", int(r.m.Len())), int(r.m.Len()))
	noUffd := fmt.Errorf("%w: no PAGEMAP_SCAN", ErrUffdUnsupported)
	choose := func(uffdErr error, smaps string) (Tracker, error, error) {
		fake := newFakePagemap(r.m.Start, r.m.Pages())
		fake.smaps = smaps
		return chooseTracker(r.m, ram, Options{},
			func() (*Uffd, error) {
				if uffdErr != nil {
					return nil, uffdErr
				}
				u, _ := newFakeUffd(r.m.Start, r.m.Pages(), 16)
				return u, nil
			},
			func() (*SoftDirty, error) { return newLockedSoftDirty(1234, r.m, fake, Options{}) })
	}

	tr, fallback, err := choose(nil, smapsVMA(r.m, ramFlags))
	if err != nil || fallback != nil {
		t.Fatalf("uffd available: fallback %v, err %v", fallback, err)
	}
	if _, ok := tr.(*Uffd); !ok {
		t.Fatalf("uffd available: chose %T", tr)
	}
	tr.Close()

	tr, fallback, err = choose(noUffd, lockedSmaps())
	if err != nil || !errors.Is(fallback, ErrUffdUnsupported) {
		t.Fatalf("no uffd, locked RAM: fallback %v, err %v", fallback, err)
	}
	if _, ok := tr.(*SoftDirty); !ok {
		t.Fatalf("no uffd, locked RAM: chose %T", tr)
	}
	tr.Close()

	tr, fallback, err = choose(noUffd, smapsVMA(r.m, ramFlags))
	if err != nil {
		t.Fatalf("no uffd, unlocked RAM: %v", err)
	}
	defer tr.Close()
	if _, ok := tr.(*Compare); !ok {
		t.Fatalf("no uffd, unlocked RAM: chose %T", tr)
	}
	if !errors.Is(fallback, ErrUffdUnsupported) || !errors.Is(fallback, ErrRAMNotLocked) || !strings.Contains(fallback.Error(), "-overcommit mem-lock=on") {
		t.Fatalf("no uffd, unlocked RAM: fallback reasons %v", fallback)
	}
	if tr.Pages() != r.m.Pages() {
		t.Fatalf("compare tracks %d pages, want %d", tr.Pages(), r.m.Pages())
	}

	if _, _, err := chooseTracker(r.m, ram[:PageSize], Options{}, nil, nil); err == nil || !strings.Contains(err.Error(), "RAM mapped here is 4096 bytes") {
		t.Fatalf("RAM of the wrong size: %v", err)
	}
}

// reclaim makes the fake entries what pagemap shows of pages that reclaim
// took: no page table entry, so neither present nor soft-dirty.
func (f *fakePagemap) reclaim(entries ...int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, i := range entries {
		f.entries[i] = 0
	}
}

// TestSoftDirtyReportsReclaimedPage: a page present at one harvest and not
// at the next is reported dirty, whatever its soft-dirty bit, since
// whatever unmapped it dropped the bit.
func TestSoftDirtyReportsReclaimedPage(t *testing.T) {
	const n = 200
	const start = 0x10000000
	m := Mapping{Start: start, End: start + n*PageSize, Inode: 1}
	fake := newFakePagemap(start, n)
	sd, err := newSoftDirty(77, m, fake, Options{Workers: 2, BatchPages: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer sd.Close()
	fake.write(1, 2, 3, 4, 63, 64, 150)
	wantSet(t, "first harvest", harvest(t, sd), NewFullSet(n))

	// Present at the first harvest, so in its baseline: written then
	// reclaimed (1, 64), reclaimed unwritten (2: reported too, harmlessly),
	// swapped out or being migrated (3: pagemap shows a swap entry).
	fake.write(1, 64)
	fake.reclaim(1, 64, 2)
	fake.entries[3] = 1 << 62
	fake.write(5)                    // never present before: its soft-dirty bit tells
	fake.entries[6] = 1 << pmPresent // faulted in by a read: not reported
	wantSet(t, "after reclaim", harvest(t, sd), setOf(n, 1, 2, 3, 5, 64))

	// Still absent: reported once, not again.
	wantSet(t, "still reclaimed", harvest(t, sd), setOf(n))

	// Read back in (present, clean): nothing to report; then reclaimed
	// again, across a failed harvest.
	fake.entries[1] = 1 << pmPresent
	wantSet(t, "read back", harvest(t, sd), setOf(n))
	fake.readErr = errors.New("input/output error")
	if _, err := sd.Harvest(context.Background()); err == nil {
		t.Fatal("harvest with a failing pagemap succeeded")
	}
	fake.readErr = nil
	fake.reclaim(1)
	wantSet(t, "after the failure", harvest(t, sd), NewFullSet(n))
	fake.reclaim(150)
	wantSet(t, "reclaimed after the resync", harvest(t, sd), setOf(n, 150))
}

package dirtypages

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmSoftDirty = 55 // pte is soft-dirty
	pmPresent   = 63 // page present in RAM
)

// ErrSoftDirtyUnsupported is returned (wrapped, with the reason) when the
// kernel cannot track soft-dirty pages.
var ErrSoftDirtyUnsupported = errors.New("dirtypages: soft-dirty tracking unsupported")

// ErrRAMNotLocked is returned (wrapped, naming the mapping) by NewSoftDirty
// when QEMU's mapping of guest RAM is not locked in memory (VM_LOCKED), so
// that reclaim could drop pages' soft-dirty bits; see the package
// documentation. QEMU locks it when started with -overcommit mem-lock=on.
var ErrRAMNotLocked = errors.New("dirtypages: guest RAM not locked in memory")

// SoftDirtySupported checks that the running kernel tracks soft-dirty bits:
// it writes to a shared memory page of its own, clears the process's bits,
// writes to the page again and checks that pagemap shows the bit set. It
// returns nil when it is, and an error wrapping ErrSoftDirtyUnsupported that
// names the reason otherwise (kernels built without CONFIG_MEM_SOFT_DIRTY
// accept clear_refs but never set the bit).
//
// As a side effect it clears the soft-dirty bits of the calling process.
func SoftDirtySupported() error {
	fd, err := unix.MemfdCreate("dirtypages-probe", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("dirtypages: soft-dirty probe: memfd: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, PageSize); err != nil {
		return fmt.Errorf("dirtypages: soft-dirty probe: size memfd: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("dirtypages: soft-dirty probe: map memfd: %w", err)
	}
	defer unix.Munmap(mem)
	word := (*uint64)(unsafe.Pointer(&mem[0]))
	atomic.StoreUint64(word, 1) // fault the page in

	src, err := openProc(os.Getpid())
	if err != nil {
		return fmt.Errorf("%w: %w", ErrSoftDirtyUnsupported, err)
	}
	defer src.Close()
	entry := func() (uint64, error) {
		var e [8]byte
		off := int64(uintptr(unsafe.Pointer(&mem[0])) / PageSize * 8)
		if _, err := src.ReadAt(e[:], off); err != nil {
			return 0, fmt.Errorf("dirtypages: soft-dirty probe: read own pagemap: %w", err)
		}
		return *(*uint64)(unsafe.Pointer(&e[0])), nil
	}
	if err := src.ClearSoftDirty(); err != nil {
		return fmt.Errorf("%w: %w", ErrSoftDirtyUnsupported, err)
	}
	before, err := entry()
	if err != nil {
		return err
	}
	atomic.StoreUint64(word, 2)
	after, err := entry()
	if err != nil {
		return err
	}
	switch {
	case after>>pmPresent&1 == 0:
		return fmt.Errorf("%w: pagemap shows a page just written as not present (entry %#x)", ErrSoftDirtyUnsupported, after)
	case before>>pmSoftDirty&1 != 0:
		return fmt.Errorf("%w: clear_refs did not clear the soft-dirty bit", ErrSoftDirtyUnsupported)
	case after>>pmSoftDirty&1 == 0:
		return fmt.Errorf("%w: kernel lacks CONFIG_MEM_SOFT_DIRTY: soft-dirty bit never set", ErrSoftDirtyUnsupported)
	}
	return nil
}

// pagemapSource is the access SoftDirty needs to another process's page
// table bits; procSource is the real one, tests substitute a fake.
type pagemapSource interface {
	// ReadAt reads pagemap entries: offset is (virtual address / PageSize)
	// * 8, entries are 8-byte host-order words. Safe for concurrent use.
	ReadAt(p []byte, off int64) (int, error)
	// ClearSoftDirty clears the soft-dirty bits of the whole process.
	ClearSoftDirty() error
	// Smaps returns the content of /proc/PID/smaps.
	Smaps() ([]byte, error)
	Close() error
}

// procSource reads /proc/PID/pagemap and /proc/PID/smaps and writes
// /proc/PID/clear_refs. All three stay open for the tracker's life; they
// refer to the process that had the pid at open time, so a recycled pid
// cannot redirect them.
type procSource struct {
	pagemap   *os.File
	clearRefs *os.File
	smaps     *os.File
}

func openProc(pid int) (*procSource, error) {
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return nil, err
	}
	cr, err := os.OpenFile(fmt.Sprintf("/proc/%d/clear_refs", pid), os.O_WRONLY, 0)
	if err != nil {
		pm.Close()
		return nil, err
	}
	sm, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		pm.Close()
		cr.Close()
		return nil, err
	}
	return &procSource{pagemap: pm, clearRefs: cr, smaps: sm}, nil
}

func (p *procSource) ReadAt(b []byte, off int64) (int, error) { return p.pagemap.ReadAt(b, off) }

// clearSoftDirtyCmd is what clear_refs takes to clear soft-dirty bits
// (CLEAR_REFS_SOFT_DIRTY).
var clearSoftDirtyCmd = []byte("4")

func (p *procSource) ClearSoftDirty() error {
	if _, err := p.clearRefs.Write(clearSoftDirtyCmd); err != nil {
		return fmt.Errorf("clear soft-dirty bits: %w", err)
	}
	return nil
}

// Smaps reads smaps from its start. The kernel walks the page tables of
// every VMA to produce it: milliseconds per GiB mapped.
func (p *procSource) Smaps() ([]byte, error) {
	if _, err := p.smaps.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("read smaps: %w", err)
	}
	b, err := io.ReadAll(p.smaps)
	if err != nil {
		return nil, fmt.Errorf("read smaps: %w", err)
	}
	return b, nil
}

func (p *procSource) Close() error {
	return errors.Join(p.pagemap.Close(), p.clearRefs.Close(), p.smaps.Close())
}

// SoftDirty is the Tracker that reads the kernel's soft-dirty bits of
// another process's (QEMU's) mapping of guest RAM; see the package
// documentation for its trade-offs and the rule it enforces (guest RAM
// locked in memory).
type SoftDirty struct {
	pid     int
	m       Mapping
	src     pagemapSource
	pages   int
	workers int
	batch   int // pages per read, a multiple of 64

	h harvests
	// present holds the pages mapped in (pagemap's present bit) at the
	// last successful harvest; meaningless while full. spare is the set
	// the next harvest fills, swapped with present when it succeeds.
	present, spare *Set
}

var _ Tracker = (*SoftDirty)(nil)

// NewSoftDirty returns a SoftDirty tracker of mapping m (see FindMapping) in
// process pid. The mapping must start at offset 0 of the RAM backend, so
// that page indexes are offsets in the backend, and be whole pages. It
// checks SoftDirtySupported first and returns its error, which wraps
// ErrSoftDirtyUnsupported, when the kernel cannot track. It then reads
// /proc/PID/smaps and refuses, with an error wrapping ErrRAMNotLocked, a
// mapping whose VMAs are not all locked in memory (VM_LOCKED, "lo" in
// VmFlags), as QEMU's -overcommit mem-lock=on makes them: reclaim of an
// unlocked page drops its soft-dirty bit and with it the page's writes (see
// the package documentation). Reading another process's pagemap and smaps
// and writing its clear_refs needs the rights to ptrace it (normally: the
// same user, or root).
//
// The first Harvest clears the bits and reports every page.
func NewSoftDirty(pid int, m Mapping, opts Options) (*SoftDirty, error) {
	if err := SoftDirtySupported(); err != nil {
		return nil, err
	}
	src, err := openProc(pid)
	if err != nil {
		return nil, fmt.Errorf("dirtypages: soft-dirty of pid %d: %w", pid, err)
	}
	s, err := newLockedSoftDirty(pid, m, src, opts)
	if err != nil {
		src.Close()
		return nil, err
	}
	return s, nil
}

// newLockedSoftDirty is NewSoftDirty on src, without the kernel check: it
// checks from src's smaps that m is locked in memory, then makes the
// tracker.
func newLockedSoftDirty(pid int, m Mapping, src pagemapSource, opts Options) (*SoftDirty, error) {
	b, err := src.Smaps()
	if err != nil {
		return nil, fmt.Errorf("dirtypages: soft-dirty of pid %d: %w", pid, err)
	}
	vmas, err := parseSmaps(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("dirtypages: soft-dirty of pid %d: smaps: %w", pid, err)
	}
	if err := checkLocked(pid, m, vmas); err != nil {
		return nil, err
	}
	return newSoftDirty(pid, m, src, opts)
}

// checkLocked checks that the VMAs of vmas (the process's smaps) cover m
// without a gap, all map m's file, and all have VM_LOCKED. It does not rely
// on smaps' Locked: field: that counts only resident pages, and only the
// process's proportional share of pages that other processes map too (the
// agent maps guest RAM as well), so it falls short of Size even for a
// locked VMA.
func checkLocked(pid int, m Mapping, vmas []vma) error {
	next := m.Start
	var unlocked []string
	for _, v := range vmas {
		if v.End <= next || v.Start >= m.End {
			continue
		}
		if v.Start > next || v.Inode != m.Inode || v.Major != m.Major || v.Minor != m.Minor {
			return fmt.Errorf("dirtypages: soft-dirty of pid %d: smaps no longer shows %s mapped at %#x-%#x (at %#x: %v)", pid, m.Path, m.Start, m.End, next, v.Mapping)
		}
		if v.hasFlag("ht") {
			// The kernel reports soft-dirty for hugetlb pages from the
			// VMA's flag alone, which every clear resets: after the first
			// harvest nothing would ever be reported dirty.
			return fmt.Errorf("dirtypages: soft-dirty of pid %d: %s at %#x-%#x is on huge pages (hugetlbfs), whose soft-dirty bits the kernel does not track per page: use the compare tracker", pid, m.Path, m.Start, m.End)
		}
		if !v.hasFlag("lo") {
			unlocked = append(unlocked, fmt.Sprintf("%#x-%#x", max(v.Start, m.Start), min(v.End, m.End)))
		}
		next = v.End
	}
	if next < m.End {
		return fmt.Errorf("dirtypages: soft-dirty of pid %d: smaps no longer shows %s mapped at %#x-%#x (nothing at %#x)", pid, m.Path, m.Start, m.End, next)
	}
	if len(unlocked) > 0 {
		return fmt.Errorf("%w: pid %d maps %s at %#x-%#x without VM_LOCKED (unlocked: %s), so swap-out or writeback could drop "+
			"pages' soft-dirty bits and lose their writes: start QEMU with -overcommit mem-lock=on, or use the compare tracker",
			ErrRAMNotLocked, pid, m.Path, m.Start, m.End, strings.Join(unlocked, ", "))
	}
	return nil
}

// newSoftDirty makes the tracker of m on src, without checking the kernel
// or the lock: tests and benchmarks use it on mappings of their own.
func newSoftDirty(pid int, m Mapping, src pagemapSource, opts Options) (*SoftDirty, error) {
	opts, err := opts.withDefaults(1)
	if err != nil {
		return nil, err
	}
	switch {
	case m.End <= m.Start || m.Start%PageSize != 0 || m.End%PageSize != 0:
		return nil, fmt.Errorf("dirtypages: soft-dirty of pid %d: mapping %#x-%#x is not whole pages", pid, m.Start, m.End)
	case m.Offset != 0:
		return nil, fmt.Errorf("dirtypages: soft-dirty of pid %d: mapping %#x-%#x starts at offset %#x of %s, not at its start", pid, m.Start, m.End, m.Offset, m.Path)
	}
	pages := m.Pages()
	return &SoftDirty{
		pid:     pid,
		m:       m,
		src:     src,
		pages:   pages,
		workers: opts.Workers,
		batch:   opts.BatchPages,
		present: NewSet(pages),
		spare:   NewSet(pages),
	}, nil
}

// Pages is the number of pages tracked.
func (s *SoftDirty) Pages() int { return s.pages }

// Harvest reads the soft-dirty and present bits of the mapping from
// pagemap, then clears the soft-dirty bits of the whole process. Nothing may
// write the mapping between the read and the clear (a write there would be
// lost): the guest must be paused (QMP stop, which also drains QEMU's block
// I/O) for the whole call.
//
// It reports the pages whose soft-dirty bit is set, and also every page
// that was present at the previous harvest and is not now: whatever
// unmapped it (reclaim, a hole punched) also dropped its soft-dirty bit,
// so a write before that would otherwise go unseen. See the package
// documentation for what this leaves to the lock NewSoftDirty checks.
//
// The first Harvest, and the first successful one after a failure, records
// which pages are present, clears and reports every page.
func (s *SoftDirty) Harvest(ctx context.Context) (*Set, error) {
	return s.h.harvest(ctx, s.pages, fmt.Sprintf("soft-dirty harvest of pid %d", s.pid), func(set *Set, full bool) error {
		prev := s.present
		if full {
			prev = nil
		}
		if err := s.scan(ctx, set, s.spare, prev); err != nil {
			return fmt.Errorf("dirtypages: pagemap of pid %d: %w", s.pid, err)
		}
		if err := s.src.ClearSoftDirty(); err != nil {
			return fmt.Errorf("dirtypages: clear_refs of pid %d: %w", s.pid, err)
		}
		s.present, s.spare = s.spare, s.present
		return nil
	})
}

// scan reads the pagemap entries of the mapping, at most s.batch pages per
// read, spread over the workers. It puts in dirty the pages whose entry is
// soft-dirty and, when prev is not nil, those in prev whose entry is not
// present; it overwrites present with the pages whose entry is present.
// Each batch covers whole words of the bitmaps, so workers never write the
// same word.
func (s *SoftDirty) scan(ctx context.Context, dirty, present, prev *Set) error {
	// Smaller batches when that gives every worker some.
	batch := min(s.batch, ((s.pages+s.workers-1)/s.workers+63)&^63)
	batches := (s.pages + batch - 1) / batch
	workers := min(s.workers, batches)
	base := int64(s.m.Start / PageSize * 8)
	var (
		next    atomic.Int64
		wg      sync.WaitGroup
		errOnce sync.Once
		failed  error
		stop    atomic.Bool
	)
	fail := func(err error) {
		errOnce.Do(func() { failed = err })
		stop.Store(true)
	}
	done := ctx.Done()
	work := func() {
		buf := make([]uint64, batch)
		raw := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), len(buf)*8)
		for !stop.Load() {
			select {
			case <-done:
				fail(ctx.Err())
				return
			default:
			}
			b := int(next.Add(1)) - 1
			if b >= batches {
				return
			}
			first := b * batch
			n := min(batch, s.pages-first)
			got, err := s.src.ReadAt(raw[:n*8], base+int64(first)*8)
			if got < n*8 {
				if err == nil || err == io.EOF {
					err = fmt.Errorf("short read at page %d: %d of %d bytes (has the process exited?)", first, got, n*8)
				}
				fail(err)
				return
			}
			w := first >> 6
			var was []uint64
			if prev != nil {
				was = prev.words[w:]
			}
			decode(dirty.words[w:], present.words[w:], was, buf[:n])
		}
	}
	for range workers - 1 {
		wg.Go(work)
	}
	work()
	wg.Wait()
	return failed
}

// decode packs the soft-dirty and present bits of pagemap entries into
// bitmap words, 64 entries per word, overwriting the words of dirty and
// present. When was (the present words of the previous harvest) is not nil,
// a page present in was and not now is put in dirty as well.
func decode(dirty, present, was []uint64, entries []uint64) {
	for i := 0; len(entries) > 0; i++ {
		e := entries[:min(64, len(entries))]
		var d, p uint64
		for k, v := range e {
			d |= (v >> pmSoftDirty & 1) << uint(k)
			p |= (v >> pmPresent & 1) << uint(k)
		}
		if was != nil {
			d |= was[i] &^ p
		}
		dirty[i] = d
		present[i] = p
		entries = entries[len(e):]
	}
}

// Close closes the pagemap, smaps and clear_refs files. The soft-dirty
// bits are left as they are.
func (s *SoftDirty) Close() error {
	return s.h.close(func() error {
		if err := s.src.Close(); err != nil {
			return fmt.Errorf("dirtypages: soft-dirty of pid %d: close: %w", s.pid, err)
		}
		return nil
	})
}

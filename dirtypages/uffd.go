package dirtypages

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/internal/ptrace"
)

// ErrUffdUnsupported is returned (wrapped, with the reason) when the uffd
// tracker cannot be used: the kernel lacks userfaultfd's asynchronous
// write-protection or the PAGEMAP_SCAN ioctl, this process may not create
// a userfaultfd or ptrace QEMU, or QEMU runs under seccomp filters that
// would not allow the calls the tracker injects (or cannot be read).
var ErrUffdUnsupported = errors.New("dirtypages: userfaultfd write-protect tracking unsupported")

// uffdSetupTimeout bounds the injection of the userfaultfd into QEMU: it
// stops QEMU's main thread for about a millisecond, so anything near this
// is a failure.
const uffdSetupTimeout = 5 * time.Second

// scanRegions is the number of page regions one PAGEMAP_SCAN call may
// return: a harvest needs one call per scanRegions runs of written pages.
const scanRegions = 4096

// uffdFeatures are the userfaultfd features the tracker needs:
// asynchronous write-protection (a write to a protected page is resolved
// in the kernel, which marks the page written; nobody is woken), and
// write-protection of pages not yet mapped in (through PTE markers), so
// that a first write to a page QEMU never touched is seen too.
const uffdFeatures = uffdFeatureWPAsync | uffdFeatureWPUnpopulated

// UffdSupported checks that the kernel can track writes with userfaultfd
// write-protection: it creates a userfaultfd here, checks that it offers
// the features the tracker needs, registers three pages of shared memory
// of its own for asynchronous write-protection, and checks what
// PAGEMAP_SCAN reports of them: every page as written before anything was
// protected (the entries of the two not mapped in are empty, which must
// count as written; see probeUffd), none once the scan has protected
// them, then exactly the page written. It returns nil when all is as
// expected, and an error wrapping ErrUffdUnsupported that names the reason
// otherwise. It does not check that this process may ptrace QEMU, which
// NewUffd needs as well.
func UffdSupported() error {
	fd, err := newUserfaultfd()
	if err != nil {
		return err
	}
	avail, err := uffdHandshake(fd, 0)
	unix.Close(fd)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUffdUnsupported, err)
	}
	for _, f := range []struct {
		bit  uint64
		what string
	}{
		{uffdFeatureWPAsync, "asynchronous write-protection (UFFD_FEATURE_WP_ASYNC, Linux 6.7)"},
		{uffdFeatureWPUnpopulated, "write-protection of unpopulated pages (UFFD_FEATURE_WP_UNPOPULATED, Linux 6.7)"},
		{uffdFeatureWPHugetlbfsShmem, "write-protection of shared memory (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, CONFIG_PTE_MARKER_UFFD_WP)"},
	} {
		if avail&f.bit == 0 {
			return fmt.Errorf("%w: the kernel's userfaultfd lacks %s", ErrUffdUnsupported, f.what)
		}
	}
	return probeUffd()
}

// newUserfaultfd creates a userfaultfd in this process, with an error
// wrapping ErrUffdUnsupported when the kernel or its settings refuse.
func newUserfaultfd() (int, error) {
	r, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK|uffdUserModeOnly, 0, 0)
	switch e {
	case 0:
		return int(r), nil
	case unix.ENOSYS:
		return -1, fmt.Errorf("%w: the kernel has no userfaultfd (CONFIG_USERFAULTFD)", ErrUffdUnsupported)
	case unix.EPERM, unix.EACCES:
		return -1, fmt.Errorf("%w: userfaultfd not permitted: %w", ErrUffdUnsupported, e)
	}
	return -1, fmt.Errorf("%w: userfaultfd: %w", ErrUffdUnsupported, e)
}

// uffdHandshake does the UFFDIO_API handshake on a new userfaultfd,
// enabling features, and returns the features the kernel offers.
func uffdHandshake(fd int, features uint64) (uint64, error) {
	api := uffdioAPI{API: uffdAPI, Features: features}
	if _, err := ioctlPtr(fd, uffdioAPIReq, unsafe.Pointer(&api)); err != nil {
		return 0, fmt.Errorf("UFFDIO_API with features %#x: %w", features, err)
	}
	return api.Features, nil
}

// probeUffd tracks pages of its own through the whole mechanism. It also
// checks what the tracker's exactness rests on when reclaim or migration
// unmaps a written page (its page table entry then loses the record of the
// write): that PAGEMAP_SCAN reports a page whose entry is empty, with no
// write-protection marker, as written (Linux 6.18 does).
func probeUffd() error {
	fail := func(format string, a ...any) error {
		return fmt.Errorf("%w: probe: "+format, append([]any{ErrUffdUnsupported}, a...)...)
	}
	mfd, err := unix.MemfdCreate("dirtypages-uffd-probe", unix.MFD_CLOEXEC)
	if err != nil {
		return fail("memfd: %w", err)
	}
	defer unix.Close(mfd)
	const pages = 3
	if err := unix.Ftruncate(mfd, pages*PageSize); err != nil {
		return fail("size memfd: %w", err)
	}
	mem, err := unix.Mmap(mfd, 0, pages*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail("map memfd: %w", err)
	}
	defer unix.Munmap(mem)
	word := func(p int) *uint64 { return (*uint64)(unsafe.Pointer(&mem[p*PageSize])) }
	atomic.StoreUint64(word(0), 1) // page 0 mapped in, pages 1 and 2 not
	start := uintptr(unsafe.Pointer(&mem[0]))
	m := Mapping{Start: start, End: start + pages*PageSize, Inode: 1}
	pm, err := openPagemapScanner(os.Getpid())
	if err != nil {
		return fail("%w", err)
	}
	defer pm.Close()
	uffd, err := newUserfaultfd()
	if err != nil {
		return err
	}
	defer unix.Close(uffd)
	if err := registerUffd(uffd, m); err != nil {
		return fail("%w", err)
	}
	u := &Uffd{pid: os.Getpid(), m: m, pages: pages, scanner: pm, regions: make([]pageRegion, 4)}
	for _, step := range []struct {
		what  string
		write int // page written before the scan; -1 for none
		want  []int
	}{
		{"registered, not yet write-protected", -1, []int{0, 1, 2}},
		{"write-protected by the previous scan", -1, nil},
		{"page 2 written", 2, []int{2}},
	} {
		if step.write >= 0 {
			atomic.StoreUint64(word(step.write), 2)
		}
		got, want := NewSet(pages), NewSet(pages)
		for _, p := range step.want {
			want.Add(p)
		}
		if err := u.scan(context.Background(), got); err != nil {
			if errors.Is(err, unix.ENOTTY) {
				return fmt.Errorf("%w: the kernel has no PAGEMAP_SCAN ioctl (Linux 6.7)", ErrUffdUnsupported)
			}
			return fail("%w", err)
		}
		if !got.Equal(want) {
			return fail("%s: PAGEMAP_SCAN reported pages %v written, want %v", step.what, got, want)
		}
	}
	return nil
}

// registerUffd does the handshake on uffd (a userfaultfd of the process
// that maps m) and registers m for asynchronous write-protection.
func registerUffd(uffd int, m Mapping) error {
	features := uint64(uffdFeatures)
	if m.Inode != 0 {
		// A file-backed mapping: needed for shmem (memfd, /dev/shm) and
		// hugetlbfs.
		features |= uffdFeatureWPHugetlbfsShmem
	}
	if _, err := uffdHandshake(uffd, features); err != nil {
		return err
	}
	reg := uffdioRegister{Range: uffdioRange{Start: uint64(m.Start), Len: uint64(m.Len())}, Mode: uffdioRegisterModeWP}
	if _, err := ioctlPtr(uffd, uffdioRegisterReq, unsafe.Pointer(&reg)); err != nil {
		why := ""
		switch err {
		case unix.EINVAL:
			why = " (the range must be mapped whole)"
		case unix.EBUSY:
			why = " (another userfaultfd already covers it: QEMU's postcopy or background snapshot?)"
		}
		return fmt.Errorf("UFFDIO_REGISTER of %#x-%#x (%s) for write-protection: %w%s", m.Start, m.End, m.Path, err, why)
	}
	if reg.Ioctls&(1<<uffdioWriteprotectBit) == 0 {
		return fmt.Errorf("UFFDIO_REGISTER of %#x-%#x (%s): the kernel offers no UFFDIO_WRITEPROTECT there (ioctls %#x)", m.Start, m.End, m.Path, reg.Ioctls)
	}
	return nil
}

// writeProtect write-protects all of m, which uffd has registered. With
// UFFD_FEATURE_WP_UNPOPULATED this also puts a marker in the page table
// entry of every page not mapped in, allocating page tables as needed:
// milliseconds per GiB.
func writeProtect(uffd int, m Mapping) error {
	wp := uffdioWriteprotect{Range: uffdioRange{Start: uint64(m.Start), Len: uint64(m.Len())}, Mode: uffdioWriteprotectModeWP}
	if _, err := ioctlPtr(uffd, uffdioWriteprotectReq, unsafe.Pointer(&wp)); err != nil {
		return fmt.Errorf("UFFDIO_WRITEPROTECT of %#x-%#x: %w", m.Start, m.End, err)
	}
	return nil
}

// pagemapScanner runs PAGEMAP_SCAN on a process's pagemap; procScanner is
// the real one, tests substitute a fake.
type pagemapScanner interface {
	// Scan runs PAGEMAP_SCAN with arg, its Vec and VecLen set to vec, and
	// returns the number of regions written to vec.
	Scan(arg *pmScanArg, vec []pageRegion) (int, error)
	Close() error
}

// procScanner is /proc/PID/pagemap, open for the tracker's life: it refers
// to the process that had the pid at open time.
type procScanner struct{ fd int }

func openPagemapScanner(pid int) (*procScanner, error) {
	fd, err := unix.Open(fmt.Sprintf("/proc/%d/pagemap", pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /proc/%d/pagemap: %w", pid, err)
	}
	return &procScanner{fd: fd}, nil
}

func (p *procScanner) Scan(arg *pmScanArg, vec []pageRegion) (int, error) {
	arg.Vec = uint64(uintptr(unsafe.Pointer(&vec[0])))
	arg.VecLen = uint64(len(vec))
	n, err := ioctlPtr(p.fd, pagemapScanReq, unsafe.Pointer(arg))
	runtime.KeepAlive(vec) // the kernel writes it through an address
	return int(n), err
}

func (p *procScanner) Close() error { return unix.Close(p.fd) }

// Uffd is the Tracker that has the kernel record writes to QEMU's mapping
// of guest RAM through userfaultfd's asynchronous write-protection, and
// reads and clears the record with the PAGEMAP_SCAN ioctl; see the package
// documentation for how it is set up and its trade-offs.
type Uffd struct {
	pid     int
	m       Mapping
	pages   int
	uffd    int // this process's copy of the userfaultfd made in QEMU; -1 for none
	scanner pagemapScanner
	held    time.Duration // how long the injection stopped QEMU's main thread
	protect time.Duration // how long the first write-protection of m took

	h       harvests
	regions []pageRegion // PAGEMAP_SCAN's output
}

var _ Tracker = (*Uffd)(nil)

// NewUffd returns a Uffd tracker of mapping m (see FindMapping) of guest
// RAM in process pid (QEMU). The mapping must start at offset 0 of the RAM
// backend, so that page indexes are offsets in the backend, and be whole
// pages. Any shared mapping of a file will do: with asynchronous
// write-protection the kernel registers regular files as well as shmem (a
// memfd, a file under /dev/shm) and hugetlbfs.
//
// It checks UffdSupported, and refuses, with errors wrapping
// ErrUffdUnsupported, a QEMU in strict seccomp mode, one under seccomp
// filters (-sandbox on) that would not allow the calls it injects (it reads
// and runs them first: a filter that killed on userfaultfd() would kill
// QEMU), and one this process may not ptrace. It then makes the
// userfaultfd inside QEMU: it stops QEMU's main thread with ptrace, runs
// userfaultfd() there, takes a copy of the new fd with pidfd_getfd and
// closes QEMU's with an injected close() (package internal/ptrace; about a
// millisecond, see Held; the vCPU threads run on, the guest is never
// paused). Last it registers m for asynchronous write-protection and
// write-protects it (milliseconds per GiB, while the guest runs). QEMU
// must not be a child of this process (see ptrace.ErrChild).
//
// The first Harvest reports every page.
func NewUffd(pid int, m Mapping, opts Options) (*Uffd, error) {
	ctx, cancel := context.WithTimeout(context.Background(), uffdSetupTimeout)
	defer cancel()
	return newUffd(ctx, pid, m, opts)
}

func newUffd(ctx context.Context, pid int, m Mapping, opts Options) (*Uffd, error) {
	if _, err := opts.withDefaults(1); err != nil {
		return nil, err
	}
	switch {
	case m.End <= m.Start || m.Start%PageSize != 0 || m.End%PageSize != 0:
		return nil, fmt.Errorf("dirtypages: uffd of pid %d: mapping %#x-%#x is not whole pages", pid, m.Start, m.End)
	case m.Offset != 0:
		return nil, fmt.Errorf("dirtypages: uffd of pid %d: mapping %#x-%#x starts at offset %#x of %s, not at its start", pid, m.Start, m.End, m.Offset, m.Path)
	}
	if err := UffdSupported(); err != nil {
		return nil, err
	}
	mode, err := seccompMode(pid)
	if err != nil {
		return nil, err
	}
	if mode == 1 {
		return nil, fmt.Errorf("%w: pid %d runs in strict seccomp mode", ErrUffdUnsupported, pid)
	}
	scanner, err := openPagemapScanner(pid)
	if err != nil {
		return nil, fmt.Errorf("dirtypages: uffd of pid %d: %w", pid, err)
	}
	u := &Uffd{pid: pid, m: m, pages: m.Pages(), uffd: -1, scanner: scanner, regions: make([]pageRegion, scanRegions)}
	if u.uffd, u.held, err = userfaultfdIn(ctx, pid, mode == 2); err != nil {
		scanner.Close()
		return nil, err
	}
	if err := registerUffd(u.uffd, m); err != nil {
		u.Close()
		return nil, fmt.Errorf("dirtypages: uffd of pid %d: %w", pid, err)
	}
	start := time.Now()
	if err := writeProtect(u.uffd, m); err != nil {
		u.Close()
		return nil, fmt.Errorf("dirtypages: uffd of pid %d: %w", pid, err)
	}
	u.protect = time.Since(start)
	return u, nil
}

// seccompMode is the Seccomp field of /proc/PID/status: 0 none, 1
// strict, 2 filters.
func seccompMode(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("dirtypages: uffd of pid %d: %w", pid, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Seccomp:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, nil
}

// injected are the system calls userfaultfdIn runs in QEMU, with their
// arguments (close's fd is the one userfaultfd() returns; filters that
// look at it are checked again with it, by the call itself).
var injected = []struct {
	name string
	nr   uintptr
	args []uintptr
}{
	{"userfaultfd", unix.SYS_USERFAULTFD, []uintptr{unix.O_CLOEXEC | unix.O_NONBLOCK | uffdUserModeOnly}},
	{"close", unix.SYS_CLOSE, []uintptr{3}},
}

// checkFilters refuses, wrapping ErrUffdUnsupported, unless every seccomp
// filter of the thread Do holds in pid allows every injected call.
func checkFilters(pid int) error {
	filters, err := ptrace.SeccompFilters(pid)
	if err != nil {
		return fmt.Errorf("%w: pid %d runs under seccomp and its filters cannot be read to check that they allow userfaultfd() (needs CAP_SYS_ADMIN): %w", ErrUffdUnsupported, pid, err)
	}
	for _, c := range injected {
		ok, why, err := seccompVerdict(filters, c.nr, c.args...)
		switch {
		case err != nil:
			return fmt.Errorf("%w: pid %d: its seccomp filters cannot be evaluated for %s(): %w", ErrUffdUnsupported, pid, c.name, err)
		case !ok:
			return fmt.Errorf("%w: pid %d: its seccomp %s on %s(): injecting it could take QEMU down", ErrUffdUnsupported, pid, why, c.name)
		}
	}
	return nil
}

// userfaultfdIn creates a userfaultfd inside process pid (QEMU), takes a
// copy of it for this process and closes pid's. A pid under seccomp
// filters gets the calls only when its filters allow them.
func userfaultfdIn(ctx context.Context, pid int, filtered bool) (fd int, held time.Duration, err error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1, 0, fmt.Errorf("dirtypages: uffd of pid %d: pidfd_open: %w", pid, err)
	}
	defer unix.Close(pidfd)
	fd = -1
	held, err = ptrace.Do(ctx, pid, func(call ptrace.Caller) error {
		if filtered {
			if err := checkFilters(pid); err != nil {
				return err
			}
		}
		theirs, err := call(injected[0].nr, injected[0].args...)
		if err != nil {
			return fmt.Errorf("userfaultfd() in pid %d: %w", pid, err)
		}
		var getErr error
		if fd, getErr = unix.PidfdGetfd(pidfd, int(theirs), 0); getErr != nil {
			fd = -1
			getErr = fmt.Errorf("pidfd_getfd of fd %d of pid %d: %w", theirs, pid, getErr)
		}
		if _, err := call(injected[1].nr, theirs); err != nil {
			return errors.Join(getErr, fmt.Errorf("close() of its userfaultfd %d in pid %d: %w", theirs, pid, err))
		}
		return getErr
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		if errors.Is(err, unix.EPERM) && !errors.As(err, new(*ptrace.SyscallError)) {
			err = fmt.Errorf("%w: no permission to ptrace pid %d: %w", ErrUffdUnsupported, pid, err)
		}
		return -1, held, fmt.Errorf("dirtypages: uffd of pid %d: make its userfaultfd: %w", pid, err)
	}
	return fd, held, nil
}

// Pages is the number of pages tracked.
func (u *Uffd) Pages() int { return u.pages }

// HarvestsLive reports that Harvest may run while the guest runs: the scan
// write-protects each page again as it reports it, so a write after that
// (or during the copy that follows) is reported by the next harvest.
func (u *Uffd) HarvestsLive() bool { return true }

// Held is how long NewUffd stopped QEMU's main thread to make the
// userfaultfd there.
func (u *Uffd) Held() time.Duration { return u.held }

// Protected is how long NewUffd's write-protection of the whole mapping
// took (the guest ran meanwhile).
func (u *Uffd) Protected() time.Duration { return u.protect }

// Harvest reports the pages written since the previous harvest and
// write-protects them again, in the same PAGEMAP_SCAN calls: one per
// scanRegions runs of written pages, each walking QEMU's page tables from
// where the previous one stopped. A write during the harvest is reported
// by this harvest or the next: for a checkpoint the guest must be paused
// (its pages are copied after the harvest, and such a write would go out
// without its epoch); the live first sync harvests with the guest running
// and relies on the next harvest (HarvestsLive).
//
// The first Harvest, and the first successful one after a failure (or a
// cancelled ctx), reports every page.
func (u *Uffd) Harvest(ctx context.Context) (*Set, error) {
	return u.h.harvest(ctx, u.pages, fmt.Sprintf("uffd harvest of pid %d", u.pid), func(set *Set, _ bool) error {
		if err := u.scan(ctx, set); err != nil {
			return fmt.Errorf("dirtypages: uffd harvest of pid %d: %w", u.pid, err)
		}
		return nil
	})
}

// scan puts in set the pages of the mapping written since they were last
// write-protected, and write-protects them. A call that returns fewer
// regions than it had room for has walked the whole range; one that filled
// its output stopped at walk_end, where the next call starts. (Linux 6.18
// may return a walk_end short of the end although it walked everything,
// when a call returned more than 512 regions: following it rescans a tail
// whose pages are already protected again, which reports nothing twice.)
func (u *Uffd) scan(ctx context.Context, set *Set) error {
	start, end := uint64(u.m.Start), uint64(u.m.End)
	for {
		arg := pmScanArg{
			Size:         uint64(unsafe.Sizeof(pmScanArg{})),
			Flags:        pmScanWPMatching | pmScanCheckWPAsync,
			Start:        start,
			End:          end,
			CategoryMask: pageIsWritten,
			ReturnMask:   pageIsWritten,
		}
		n, err := u.scanner.Scan(&arg, u.regions)
		if err != nil {
			why := ""
			if err == unix.EPERM {
				why = " (part of the range is not registered for write-protection: has QEMU remapped guest RAM?)"
			}
			return fmt.Errorf("PAGEMAP_SCAN of %#x-%#x: %w%s", start, end, err, why)
		}
		if n < 0 || n > len(u.regions) {
			return fmt.Errorf("PAGEMAP_SCAN of %#x-%#x returned %d regions, room for %d", start, end, n, len(u.regions))
		}
		for _, r := range u.regions[:n] {
			if r.Start < start || r.End > end || r.Start >= r.End || r.Start%PageSize != 0 || r.End%PageSize != 0 {
				return fmt.Errorf("PAGEMAP_SCAN of %#x-%#x returned region %#x-%#x", start, end, r.Start, r.End)
			}
			set.AddRange(int((r.Start-uint64(u.m.Start))/PageSize), int((r.End-uint64(u.m.Start))/PageSize))
		}
		if n < len(u.regions) || arg.WalkEnd >= end {
			return nil
		}
		if arg.WalkEnd <= start {
			return fmt.Errorf("PAGEMAP_SCAN of %#x-%#x filled its %d regions but walked nothing (walk_end %#x)", start, end, n, arg.WalkEnd)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		start = arg.WalkEnd
	}
}

// Close closes the userfaultfd, which ends the registration (QEMU's pages
// are write-protected no more and run as before), and QEMU's pagemap.
func (u *Uffd) Close() error {
	return u.h.close(func() error {
		var errs []error
		if u.uffd >= 0 {
			if err := unix.Close(u.uffd); err != nil {
				errs = append(errs, fmt.Errorf("close userfaultfd: %w", err))
			}
		}
		if err := u.scanner.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close pagemap: %w", err))
		}
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("dirtypages: uffd of pid %d: %w", u.pid, err)
		}
		return nil
	})
}

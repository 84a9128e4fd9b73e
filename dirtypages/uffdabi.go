package dirtypages

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kernel ABI of userfaultfd write-protection and of the PAGEMAP_SCAN
// ioctl, which golang.org/x/sys does not define (and Debian 12's
// linux-libc-dev predates in part). Values and layouts are those of the
// uapi headers include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h
// (Linux 6.7 and later); TestUffdABI checks them against the numbers the C
// headers give.

// ioctl request numbers are built as the _IOC macro of
// include/uapi/asm-generic/ioctl.h builds them on x86 (and most other
// architectures): direction in bits 30-31, argument size in bits 16-29,
// type in bits 8-15, number in bits 0-7.
const (
	iocWrite = 1
	iocRead  = 2
)

func ioc(dir, typ, nr, size uintptr) uintptr { return dir<<30 | size<<16 | typ<<8 | nr }

// iowr is _IOWR(typ, nr, size).
func iowr(typ, nr, size uintptr) uintptr { return ioc(iocRead|iocWrite, typ, nr, size) }

// userfaultfd(2) flag and UFFDIO_API features (linux/userfaultfd.h).
const (
	uffdAPI = 0xAA // UFFD_API
	// uffdUserModeOnly (UFFD_USER_MODE_ONLY) makes the uffd handle only
	// faults taken in user mode. A process without CAP_SYS_PTRACE may
	// create such a uffd even where vm.unprivileged_userfaultfd is 0, and
	// QEMU may not run as root. With WP_ASYNC no fault is ever handed to
	// the uffd, and a write the kernel makes for the process (read(2) into
	// guest RAM) is still tracked: the fault is resolved in the kernel.
	uffdUserModeOnly = 1

	uffdFeatureWPHugetlbfsShmem = 1 << 12 // UFFD_FEATURE_WP_HUGETLBFS_SHMEM
	uffdFeatureWPUnpopulated    = 1 << 13 // UFFD_FEATURE_WP_UNPOPULATED
	uffdFeatureWPAsync          = 1 << 15 // UFFD_FEATURE_WP_ASYNC

	uffdioRegisterModeWP     = 1 << 1 // UFFDIO_REGISTER_MODE_WP
	uffdioWriteprotectModeWP = 1 << 0 // UFFDIO_WRITEPROTECT_MODE_WP

	uffdioWriteprotectBit = 0x06 // _UFFDIO_WRITEPROTECT: its bit in uffdio_register.ioctls
)

// uffdioAPI is struct uffdio_api.
type uffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// uffdioRange is struct uffdio_range.
type uffdioRange struct {
	Start uint64
	Len   uint64
}

// uffdioRegister is struct uffdio_register.
type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

// uffdioWriteprotect is struct uffdio_writeprotect.
type uffdioWriteprotect struct {
	Range uffdioRange
	Mode  uint64
}

// userfaultfd ioctls: _IOWR(UFFDIO, _UFFDIO_*, struct ...).
var (
	uffdioAPIReq          = iowr(0xAA, 0x3F, unsafe.Sizeof(uffdioAPI{}))
	uffdioRegisterReq     = iowr(0xAA, 0x00, unsafe.Sizeof(uffdioRegister{}))
	uffdioWriteprotectReq = iowr(0xAA, 0x06, unsafe.Sizeof(uffdioWriteprotect{}))
)

// PAGEMAP_SCAN (linux/fs.h): page categories and flags.
const (
	pageIsWritten = 1 << 1 // PAGE_IS_WRITTEN

	pmScanWPMatching   = 1 << 0 // PM_SCAN_WP_MATCHING: write-protect the pages matched
	pmScanCheckWPAsync = 1 << 1 // PM_SCAN_CHECK_WPASYNC: fail on a range not registered for async WP
)

// pageRegion is struct page_region: pages [Start, End) share Categories.
type pageRegion struct {
	Start      uint64
	End        uint64
	Categories uint64
}

// pmScanArg is struct pm_scan_arg.
type pmScanArg struct {
	Size              uint64 // sizeof(struct pm_scan_arg)
	Flags             uint64
	Start             uint64
	End               uint64
	WalkEnd           uint64 // written by the kernel: where the walk stopped
	Vec               uint64 // address of the []pageRegion
	VecLen            uint64
	MaxPages          uint64
	CategoryInverted  uint64
	CategoryMask      uint64
	CategoryAnyofMask uint64
	ReturnMask        uint64
}

// pagemapScanReq is PAGEMAP_SCAN: _IOWR('f', 16, struct pm_scan_arg).
var pagemapScanReq = iowr('f', 16, unsafe.Sizeof(pmScanArg{}))

// ioctlPtr is ioctl(fd, req, arg).
func ioctlPtr(fd int, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if e != 0 {
		return r, e
	}
	return r, nil
}

package dirtypages

import (
	"testing"
	"unsafe"
)

// TestUffdABI checks the ioctl numbers against the values the uapi headers
// give (compiled with gcc: linux/userfaultfd.h for UFFDIO_*, and
// _IOWR('f', 16, struct pm_scan_arg) with the struct of linux/fs.h for
// PAGEMAP_SCAN), and the structs' sizes and field offsets against the
// headers' layouts.
func TestUffdABI(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"UFFDIO_API", uffdioAPIReq, 0xc018aa3f},
		{"UFFDIO_REGISTER", uffdioRegisterReq, 0xc020aa00},
		{"UFFDIO_WRITEPROTECT", uffdioWriteprotectReq, 0xc018aa06},
		{"PAGEMAP_SCAN", pagemapScanReq, 0xc0606610},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}

	var (
		api uffdioAPI
		reg uffdioRegister
		wp  uffdioWriteprotect
		pr  pageRegion
		arg pmScanArg
	)
	for _, tc := range []struct {
		field     string
		got, want uintptr
	}{
		{"sizeof(struct uffdio_api)", unsafe.Sizeof(api), 24},
		{"uffdio_api.features", unsafe.Offsetof(api.Features), 8},
		{"uffdio_api.ioctls", unsafe.Offsetof(api.Ioctls), 16},
		{"sizeof(struct uffdio_range)", unsafe.Sizeof(uffdioRange{}), 16},
		{"sizeof(struct uffdio_register)", unsafe.Sizeof(reg), 32},
		{"uffdio_register.mode", unsafe.Offsetof(reg.Mode), 16},
		{"uffdio_register.ioctls", unsafe.Offsetof(reg.Ioctls), 24},
		{"sizeof(struct uffdio_writeprotect)", unsafe.Sizeof(wp), 24},
		{"uffdio_writeprotect.mode", unsafe.Offsetof(wp.Mode), 16},
		{"sizeof(struct page_region)", unsafe.Sizeof(pr), 24},
		{"page_region.end", unsafe.Offsetof(pr.End), 8},
		{"page_region.categories", unsafe.Offsetof(pr.Categories), 16},
		{"sizeof(struct pm_scan_arg)", unsafe.Sizeof(arg), 96},
		{"pm_scan_arg.flags", unsafe.Offsetof(arg.Flags), 8},
		{"pm_scan_arg.start", unsafe.Offsetof(arg.Start), 16},
		{"pm_scan_arg.end", unsafe.Offsetof(arg.End), 24},
		{"pm_scan_arg.walk_end", unsafe.Offsetof(arg.WalkEnd), 32},
		{"pm_scan_arg.vec", unsafe.Offsetof(arg.Vec), 40},
		{"pm_scan_arg.vec_len", unsafe.Offsetof(arg.VecLen), 48},
		{"pm_scan_arg.max_pages", unsafe.Offsetof(arg.MaxPages), 56},
		{"pm_scan_arg.category_inverted", unsafe.Offsetof(arg.CategoryInverted), 64},
		{"pm_scan_arg.category_mask", unsafe.Offsetof(arg.CategoryMask), 72},
		{"pm_scan_arg.category_anyof_mask", unsafe.Offsetof(arg.CategoryAnyofMask), 80},
		{"pm_scan_arg.return_mask", unsafe.Offsetof(arg.ReturnMask), 88},
	} {
		t.Run(tc.field, func(t *testing.T) {
			if tc.got != tc.want {
				t.Errorf("%s = %d, want %d", tc.field, tc.got, tc.want)
			}
		})
	}

	for _, tc := range []struct {
		name      string
		got, want uint64
	}{
		{"UFFD_USER_MODE_ONLY", uffdUserModeOnly, 1},
		{"UFFD_FEATURE_WP_HUGETLBFS_SHMEM", uffdFeatureWPHugetlbfsShmem, 0x1000},
		{"UFFD_FEATURE_WP_UNPOPULATED", uffdFeatureWPUnpopulated, 0x2000},
		{"UFFD_FEATURE_WP_ASYNC", uffdFeatureWPAsync, 0x8000},
		{"UFFDIO_REGISTER_MODE_WP", uffdioRegisterModeWP, 2},
		{"UFFDIO_WRITEPROTECT_MODE_WP", uffdioWriteprotectModeWP, 1},
		{"PAGE_IS_WRITTEN", pageIsWritten, 2},
		{"PM_SCAN_WP_MATCHING", pmScanWPMatching, 1},
		{"PM_SCAN_CHECK_WPASYNC", pmScanCheckWPAsync, 2},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

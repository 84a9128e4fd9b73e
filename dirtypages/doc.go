// Package dirtypages finds the guest pages written since the previous
// checkpoint, while the guest is paused.
//
// Guest RAM lives in a shared backend (a file under /dev/shm, or a memfd)
// that QEMU maps with share=on, so the agent can map the same memory. Every
// epoch the agent stops the guest, calls Tracker.Harvest, copies the pages of
// the returned Set out of the shared RAM, and resumes the guest. A page is
// PageSize bytes; its index is its offset in the RAM backend divided by
// PageSize.
//
// The first Harvest of a tracker reports every page: it establishes the
// baseline, and the first checkpoint ships all of RAM anyway. A Harvest that
// fails leaves the tracker unsure of what it consumed, so the next successful
// Harvest again reports every page. Callers need no other recovery.
//
// # Two trackers
//
// Compare (NewCompare) keeps a private copy of RAM as of the last harvest and
// compares the live RAM against it page by page, with the runtime's
// vectorised memory comparison, in parallel on disjoint page ranges,
// copying each changed page into the private copy as it goes. It needs
// nothing from the kernel and sees every change, whoever made it: vCPUs,
// QEMU's device emulation, vhost, another process mapping the same file, a
// discard that punched a hole. It reports content changes, not writes: a
// page written back with the value it had is not reported, which is all a
// checkpoint needs. Its costs: a second copy of guest RAM in memory, and a
// read of all of RAM twice over (live and copy) during every pause, so the
// pause grows with the size of RAM, not with the number of dirty pages.
// Memory bandwidth bounds it: on the two-core development machine (shared
// with other work) a harvest of 256 MiB took 8-12 ms with both cores, 32-48
// ms per GiB, so more than a 25 ms epoch for a guest of 1 GiB, and 14-20 ms
// with one.
//
// SoftDirty (NewSoftDirty) reads the kernel's soft-dirty bits of the QEMU
// process's mapping of guest RAM from /proc/PID/pagemap (bit 55 of each
// 8-byte entry), then clears them by writing "4" to /proc/PID/clear_refs.
// Clearing write-protects the process's pages; the first write to a page
// afterwards takes a write-protect fault in which the kernel sets the bit
// again. Under KVM the clear also makes KVM drop its second-level mappings
// of guest RAM (through the kernel's MMU notifier), so that vCPU writes
// fault through QEMU's page tables and get recorded; the guest then takes a
// fault on its first access to each page in every epoch. Its costs during
// the pause: 8 bytes of pagemap per page of RAM (about 1.5 ms per 256 MiB
// of resident RAM on the development machine, 6 ms per GiB) and a page-table walk of the
// whole process to clear; outside it, the guest's faults. Its limits: the
// kernel must be built with CONFIG_MEM_SOFT_DIRTY, as distribution kernels
// are (check with SoftDirtySupported); clear_refs clears the bits of the
// whole process, so nothing else may rely on QEMU's soft-dirty bits (CRIU,
// a second tracker); it sees only writes through QEMU's own page tables, so
// writes by another process sharing the RAM (a vhost-user backend) and
// holes punched by discards (balloon, virtio-mem) go unseen; and it reports
// writes rather than changes, and whole huge pages when the backend uses
// transparent huge pages, so it may report pages that did not change.
// Linux 6.7's PAGEMAP_SCAN ioctl could replace the pagemap read; it is not
// used, since the guest kernel the tests run (6.1) lacks it.
//
// Choose SoftDirty when SoftDirtySupported returns nil and only QEMU writes
// guest RAM; fall back to Compare otherwise, or for small guests.
package dirtypages

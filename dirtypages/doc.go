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
// copying each changed page into the private copy as it goes. It needs nothing from the kernel and sees every change, whoever
// made it: vCPUs, QEMU's device emulation, vhost, another process mapping
// the same file, a discard that punched a hole. Its costs: a second copy of
// guest RAM in memory, and a read of all of RAM twice over (live and copy)
// during every pause, so the pause grows with the size of RAM rather than
// with the number of dirty pages; memory bandwidth bounds it (see the
// package benchmarks). It reports content changes, not writes: a page
// written back with the value it had is not reported, which is exactly what
// a checkpoint needs.
//
// SoftDirty (NewSoftDirty) reads the kernel's soft-dirty bits of the QEMU
// process's mapping of guest RAM from /proc/PID/pagemap (bit 55 of each
// 8-byte entry), then clears them by writing "4" to /proc/PID/clear_refs.
// Clearing write-protects the process's pages; the first write to a page
// afterwards takes a write-protect fault in which the kernel sets the bit
// again. Its costs: 8 bytes of pagemap per page of RAM read during the
// pause (2 MiB per GiB), a page-table walk of the whole process to clear,
// and one minor fault in the guest per page on its first write of each
// epoch. Its limits: the kernel must be built with CONFIG_MEM_SOFT_DIRTY
// (check with SoftDirtySupported); clear_refs clears the bits of the whole
// process, so nothing else may rely on QEMU's soft-dirty bits (CRIU, a
// second tracker); it sees only writes through QEMU's own page tables, so
// writes by another process sharing the RAM (a vhost-user backend) and
// holes punched by discards (balloon, virtio-mem) go unseen; and it reports
// writes rather than changes, and whole huge pages when the backend uses
// transparent huge pages, so it may report more pages than changed.
//
// Choose SoftDirty when SoftDirtySupported returns nil and only QEMU writes
// guest RAM: its pause cost is a sixty-fourth of a pass over RAM. Fall back
// to Compare otherwise.
package dirtypages

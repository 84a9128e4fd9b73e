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
// # Three trackers
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
// are (check with SoftDirtySupported); QEMU's guest RAM must be locked in
// memory (see below); clear_refs clears the bits of the
// whole process, so nothing else may rely on QEMU's soft-dirty bits (CRIU,
// a second tracker); it sees only writes through QEMU's own page tables, so
// writes by another process sharing the RAM (a vhost-user backend) and
// holes punched by discards (balloon, virtio-mem) go unseen; and it reports
// writes rather than changes, and whole huge pages when the backend uses
// transparent huge pages, so it may report pages that did not change.
// Linux 6.7's PAGEMAP_SCAN ioctl could replace the pagemap read; it is not
// used, since the guest kernel the tests run (6.1) lacks it.
//
// # Soft-dirty needs guest RAM locked in memory
//
// A page's soft-dirty bit lives in QEMU's page table entry for it, and
// whatever removes that entry removes the bit: reclaim above all (swap-out
// of a memfd or /dev/shm page, writeback and eviction of a file backend on
// a disk filesystem; on shmem the kernel unmaps a page it tries to reclaim
// even when, without swap, it then has to keep it), but also a hole
// punched in the backend. A page written during an epoch and unmapped
// before the harvest would go unreported, and the backup would keep its
// old content. Two rules guard against this.
//
// The rule: NewSoftDirty reads /proc/PID/smaps and refuses, with an error
// wrapping ErrRAMNotLocked, guest RAM unless every VMA of QEMU's mapping of
// it has VM_LOCKED ("lo" in VmFlags). QEMU locks its memory, guest RAM
// included, when started with -overcommit mem-lock=on (mlockall of current
// and future mappings); a lock on fault (MLOCK_ONFAULT) sets VM_LOCKED too,
// and a page not faulted in yet gets its soft-dirty bit when written. What
// this relies on: the kernel never unmaps a page for reclaim from a
// VM_LOCKED VMA (reclaim's walk of the page's mappings gives up at a locked
// one and moves the page to the unevictable list, and MADV_COLD and
// MADV_PAGEOUT refuse locked VMAs), so the agent's own mapping of the RAM
// need not be locked; and page migration (compaction, NUMA balancing),
// which does move locked pages, carries the soft-dirty bit over in its
// migration entry. smaps' Locked: field is not used: it counts resident
// pages only, and of pages that other processes map too (the agent does)
// only QEMU's proportional share, so it falls short of Size even when all
// is locked. The check is made once, when the tracker is made (reading
// smaps walks the page tables of the whole process): an unlock afterwards
// goes unseen but for the defence below. "Reclaim is impossible" is not
// accepted instead: a host without swap still unmaps the shmem pages it
// tries to reclaim (seen with MADV_PAGEOUT), swap can be added at any time,
// and file backends are written back.
//
// The defence in depth: each Harvest also reports every page that was
// present (pagemap's bit 63) at the previous harvest and is not now. A page
// whose entry is a swap or migration entry counts as not present, and a
// page unmapped without having been written is reported too; either costs
// a needless copy of the page, nothing else. This catches a page written
// and then reclaimed or discarded between two harvests, even if the lock
// check were bypassed. It misses what happens to a page within one epoch:
// a page not present at the previous harvest that is mapped in, written
// and unmapped again, and a written page that is unmapped and mapped in
// again by a read (its new entry is clean). A locked page is never
// unmapped by reclaim, so with the lock neither happens through reclaim; a
// hole punched by a discard and read back within one epoch stays unseen,
// as said above. The cost: the first harvest reads pagemap too, and the
// tracker keeps two bitmaps of the RAM's pages (32 KiB per GiB each).
//
// # Uffd: userfaultfd write-protection and PAGEMAP_SCAN
//
// Uffd (NewUffd) has the kernel record writes to QEMU's mapping of guest
// RAM. Linux 6.7 added asynchronous write-protection to userfaultfd
// (UFFD_FEATURE_WP_ASYNC): a write to a protected page is resolved inside
// the kernel, which drops the page's protection, and nobody is woken; and
// the PAGEMAP_SCAN ioctl on /proc/PID/pagemap, which reports the pages that
// lost their protection (PAGE_IS_WRITTEN) and, in the same call, protects
// them again (PM_SCAN_WP_MATCHING). A harvest is a few such calls.
//
// A userfaultfd is bound to the memory of the process that creates it, and
// nothing creates one for another process; so NewUffd makes QEMU create it:
// it stops QEMU's main thread with ptrace (package internal/ptrace; the
// vCPU threads run on and the guest never pauses), runs userfaultfd()
// there, takes a copy of the new descriptor with pidfd_getfd, closes
// QEMU's with an injected close(), and lets the thread go. Registering the
// mapping and write-protecting it are ioctls on that descriptor, which act
// on QEMU's memory wherever they are issued from. When the agent closes
// it, the registration ends and QEMU runs as before. With
// UFFD_FEATURE_WP_UNPOPULATED the protection also covers pages QEMU has
// not mapped in yet (through markers in its page tables), so that a first
// write to one is seen.
//
// What it sees: every write through QEMU's page tables, whoever makes it:
// vCPUs, device emulation, and the kernel writing for QEMU (a read(2) into
// guest RAM); it reports writes, not changes, so a page written with the
// value it held is reported. Guest RAM need not be locked: a written page
// that reclaim or migration unmaps leaves an empty page table entry, which
// PAGEMAP_SCAN counts as written (UffdSupported checks that the kernel
// does), while an unwritten one leaves its protection marker. What it does
// not see: writes that do not go through QEMU's mapping (a vhost-user
// backend process, another process writing the backend file, DMA into
// pinned memory such as VFIO), and holes punched in the backend (balloon,
// virtio-mem, discard): the page reads as zeroes afterwards, but its
// marker stays and it is not reported.
//
// Its costs, measured on the two-core development machine while it was
// shared with other work (a plain page fault, with no tracking, cost about
// 16 µs at the time, and Compare took 16 ms per 256 MiB), 256 MiB of RAM,
// every page mapped in: a harvest takes 0.07-0.16 ms when nothing was
// written (the page table walk), 3-15 ms after 1,000 random pages were
// written and 6-18 ms after every page was (re-protecting each written
// page, and the TLB flushes that needs, dominate; earlier measurements on
// a quiet machine of the same kind gave 0.16-0.26 ms and 2.4 ms); with the
// test guest under QEMU and TCG, 150 epochs of 20 ms dirtied a median of
// 372-481 pages each and the harvest took 1.0-1.2 ms (median; 6 ms at
// most). NewUffd's injection stopped QEMU's main thread for 0.3-4 ms, and
// write-protecting 256 MiB took 5-35 ms while the guest ran. The guest
// pays a write-protect fault on its first write to each page in each epoch
// (18-37 µs here; about 1.1 µs on the quiet machine).
//
// Its requirements: Linux 6.7 or later with CONFIG_USERFAULTFD and
// CONFIG_PTE_MARKER_UFFD_WP (UffdSupported checks); the rights to ptrace
// QEMU (root or CAP_SYS_PTRACE); QEMU must not be a child of the agent
// process (its ptrace stops would also reach whoever waits for it); a
// QEMU under seccomp filters (QEMU's -sandbox on, which libvirt enables)
// is tracked only when its filters allow the injected userfaultfd() and
// close(): NewUffd reads them (PTRACE_SECCOMP_GET_FILTER, which needs
// CAP_SYS_ADMIN) and runs them on those calls first (QEMU's own filters
// allow both; see seccomp.go); nothing else may register guest RAM with a userfaultfd
// (QEMU's postcopy and background-snapshot do, and are refused while the
// tracker holds it). Not measured: KVM (each harvest makes KVM drop its
// mappings of the pages it protects again, through the MMU notifier) and
// huge pages.
//
// # Choosing
//
// Choose Uffd when NewUffd succeeds; it is exact, needs no locked RAM, and
// its pause grows with the pages written rather than with the size of RAM.
// Otherwise choose SoftDirty when SoftDirtySupported returns nil, QEMU
// locks guest RAM (-overcommit mem-lock=on) and only QEMU writes guest RAM;
// fall back to Compare otherwise, or for small guests. NewAuto tries them
// in that order and returns the reasons for the ones it passed over.
package dirtypages

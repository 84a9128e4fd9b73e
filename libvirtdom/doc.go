// Package libvirtdom reads and writes libvirt domain XML for remus-kvm: it
// says whether a domain can be protected (and exactly what to change when it
// cannot), builds the backup host's standby domain from the primary's, and
// reads and writes the remus metadata element that marks a domain as
// protected. It works on XML only (what `virsh dumpxml` or go-libvirt's
// DomainGetXMLDesc returns) and never talks to libvirt.
//
// # What Check refuses, and why
//
// The rules mirror what remusd itself checks at run time, so that a domain
// Check accepts is not refused later by the agent:
//
//   - Guest RAM must be in one shared memory backend (memfd or file, access
//     shared): the agent maps it from outside QEMU, and
//     qemu.FindRAMBackend accepts exactly one backend, so several NUMA cells
//     or a memory device, which libvirt gives backends of their own, are
//     refused.
//   - No other guest-writable RAM: the primary refuses RAM blocks outside
//     the backend (internal/agent's CheckRAMReplicated), such as the video
//     RAM of a VGA, cirrus, QXL, bochs, vmvga or primary virtio (virtio-vga)
//     video device, UEFI's pflash variable store, or ivshmem.
//   - Devices that change guest RAM behind QEMU's page tables
//     (qemu.UntrackedWrites): a balloon or a vhost-user backend makes
//     remusd fall back to the compare tracker (a Warning, with its cost);
//     VFIO and vDPA devices, whose state cannot be saved either, and shared
//     filesystems are refused. vhost-net is not listed: its kernel worker
//     writes through QEMU's own mapping, which the trackers see.
//   - An agent QMP socket (-qmp unix:PATH,server=on,wait=off in
//     qemu:commandline). A QMP call over it took ~0.3 ms, through libvirt's
//     monitor passthrough ~1.2 ms, which also taints the domain
//     "custom-monitor"; CheckOptions.MonitorPassthrough accepts the latter.
//   - remusd holds the output of one NIC, a tap (type bridge, network or
//     ethernet), and mirrors one writable disk through QEMU's block layer.
//
// # Fixes
//
// Every Problem carries a Fix: an XML snippet, ready to paste, with where
// it goes (a child of <domain> or of <devices>) and whether it replaces the
// elements of its name there, removes one element, or replaces one; or,
// where no snippet can say it, a one-line note. The tests parse each
// snippet into the domain it was made for, as a person pasting it would,
// and check that the problem is gone.
//
// # Round trips
//
// Standby reads the primary's XML into libvirtxml and writes it back
// changed. libvirtxml drops what it does not know (an element, an
// attribute, an interface type) without an error, so Standby first checks
// that writing back the unchanged domain keeps every element, attribute and
// text (quoting, prefixes and hexadecimal numbers aside), and refuses the
// domain otherwise (ErrLossy). SetMetadata edits the document's text and
// leaves the rest of it byte for byte.
package libvirtdom

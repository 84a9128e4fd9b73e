package libvirtdom

import "fmt"

// Severity says whether a Problem blocks protection.
type Severity int

// The severities of a Problem.
const (
	// Warning: protection works, with the cost or the risk the message
	// names.
	Warning Severity = iota
	// Error: the domain cannot be protected until it is fixed.
	Error
)

// String returns "warning" or "error".
func (s Severity) String() string {
	if s == Error {
		return "error"
	}
	return "warning"
}

// Code names a kind of Problem. The values are stable: scripts and tests
// match them.
type Code string

// The kinds of Problem Check reports.
const (
	// CodeDomainType: the domain is not type='kvm' or type='qemu'.
	CodeDomainType Code = "domain-type"
	// CodeArch: the guest is not x86_64.
	CodeArch Code = "arch"
	// CodeRAMNotShared: guest RAM is not in a shared memfd or file backend,
	// so the agent cannot map it.
	CodeRAMNotShared Code = "ram-not-shared"
	// CodeNUMA: several NUMA cells (libvirt gives each a RAM backend of its
	// own; the agent replicates one) or a cell whose memAccess is not shared.
	CodeNUMA Code = "numa-cells"
	// CodeMemoryDevice: a <memory> device (dimm, nvdimm, virtio-mem,
	// virtio-pmem...) adds a RAM backend of its own.
	CodeMemoryDevice Code = "memory-device"
	// CodeNoAgentQMP: no usable agent QMP socket in qemu:commandline.
	CodeNoAgentQMP Code = "no-agent-qmp"
	// CodeUntrackedWrites: a device (a balloon, vhost-user) changes guest
	// RAM behind QEMU's page tables, so remusd uses the compare tracker.
	CodeUntrackedWrites Code = "untracked-writes"
	// CodeVideoRAM: a video device with RAM of its own, outside the shared
	// backend.
	CodeVideoRAM Code = "video-ram"
	// CodePflash: UEFI firmware in pflash, whose writable variable store is
	// RAM outside the shared backend.
	CodePflash Code = "pflash"
	// CodeHostdev: host device passthrough (VFIO, vDPA, NVMe, USB, SCSI):
	// device DMA bypasses QEMU's page tables and the device state cannot be
	// replicated.
	CodeHostdev Code = "hostdev"
	// CodeSharedFS: a <filesystem> (virtiofs, 9p), whose device state QEMU
	// cannot save while the guest uses it.
	CodeSharedFS Code = "shared-fs"
	// CodeShmem: an ivshmem <shmem> device, RAM outside the shared backend
	// that other processes write.
	CodeShmem Code = "shmem"
	// CodeNIC: a NIC without a tap whose output could be held.
	CodeNIC Code = "nic-unsupported"
	// CodeNICCount: more than one NIC; remusd holds the output of one.
	CodeNICCount Code = "nic-count"
	// CodeDisk: a disk remusd cannot mirror (device='lun', vhost-user).
	CodeDisk Code = "disk-unsupported"
	// CodeDiskCount: more than one writable disk; remusd mirrors one.
	CodeDiskCount Code = "disk-count"
	// CodeDiskShareable: a writable <shareable/> disk, which other guests
	// write behind the mirror.
	CodeDiskShareable Code = "disk-shareable"
	// CodeDiskNotMirrored: a read-only disk or removable media, which is
	// not mirrored: the backup needs the same content.
	CodeDiskNotMirrored Code = "disk-not-mirrored"
	// CodeDiskCacheUnsafe: cache='unsafe' ignores the guest's flushes.
	CodeDiskCacheUnsafe Code = "disk-cache-unsafe"
	// CodeMetadata: a malformed <remus:protect> element.
	CodeMetadata Code = "bad-metadata"
)

// FixOp says how a Fix's snippet is applied.
type FixOp int

// The ways a Fix is applied.
const (
	// FixNone: no snippet says it; Fix.Note says what to do.
	FixNone FixOp = iota
	// FixSet: Fix.XML replaces the elements of its name under Fix.In, or is
	// added there when there are none.
	FixSet
	// FixRemove: the element Fix.XML is removed from Fix.In.
	FixRemove
	// FixReplace: the element Fix.Old under Fix.In is replaced by Fix.XML.
	FixReplace
)

// Fix is the exact change that removes a Problem.
type Fix struct {
	Op FixOp
	// In is the parent of the snippet: "domain" or "devices".
	In string
	// XML is the snippet, ready to paste. Elements of the qemu namespace use
	// the prefix "qemu", which the <domain> element must declare.
	XML string
	// Old is the element FixReplace replaces.
	Old string
	// Note says in one line how to apply the snippet (or what to do where
	// there is none) and what else it needs.
	Note string
}

// Problem is one reason a domain cannot be protected, or a cost its
// protection would have.
type Problem struct {
	Code     Code
	Severity Severity
	// Element names the element concerned ("disk vda", "interface
	// 52:54:00:6b:3c:58"); empty for the domain as a whole.
	Element string
	// Message says in one line what is wrong with this domain.
	Message string
	Fix     Fix
}

// String returns the problem as one line: severity, code, element, message.
func (p Problem) String() string {
	if p.Element == "" {
		return fmt.Sprintf("%s %s: %s", p.Severity, p.Code, p.Message)
	}
	return fmt.Sprintf("%s %s: %s: %s", p.Severity, p.Code, p.Element, p.Message)
}

// Blocking returns the problems of severity Error: the domain can be
// protected when there are none.
func Blocking(ps []Problem) []Problem {
	var out []Problem
	for _, p := range ps {
		if p.Severity == Error {
			out = append(out, p)
		}
	}
	return out
}

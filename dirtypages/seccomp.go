package dirtypages

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// A QEMU under a seccomp filter (-sandbox on, which libvirt always sets)
// runs the system calls the uffd tracker injects through that filter: a
// filter that killed on userfaultfd() would kill QEMU, guest and all. So
// the tracker reads QEMU's filters (PTRACE_SECCOMP_GET_FILTER, while it
// holds QEMU's main thread anyway) and runs them, in a classic-BPF
// interpreter, on each call it is about to inject, with its real
// arguments; it injects nothing unless every filter allows every call.
// QEMU's own filter is a deny list of obsolete, privilege-raising,
// process-spawning and scheduling calls, which allows userfaultfd() and
// close() (QEMU's postcopy uses the former under the sandbox itself).

// Seccomp return actions (linux/seccomp.h), the upper 16 bits.
const (
	seccompRetActionFull = 0xffff0000
	seccompRetAllow      = 0x7fff0000
	seccompRetLog        = 0x7ffc0000
	auditArchX8664       = 0xc000003e // AUDIT_ARCH_X86_64
)

// seccompAction names a filter's verdict.
func seccompAction(ret uint32) string {
	switch ret & seccompRetActionFull {
	case 0x80000000:
		return "kill the process"
	case 0x00000000:
		return "kill the thread"
	case 0x00030000:
		return "trap"
	case 0x00050000:
		return fmt.Sprintf("fail with errno %d", ret&0xffff)
	case 0x7fc00000:
		return "notify a supervisor"
	case 0x7ff00000:
		return "notify a tracer"
	case seccompRetLog:
		return "log and allow"
	case seccompRetAllow:
		return "allow"
	}
	return fmt.Sprintf("action %#x", ret)
}

// seccompData is the struct seccomp_data a filter reads for a call on
// x86-64, laid out for bpf.VM: the kernel's filters load only 32-bit words,
// which the VM reads big-endian, so each word is stored big-endian at its
// offset (the 64-bit fields as their low word, then their high word, as
// on a little-endian machine).
func seccompData(nr uintptr, args ...uintptr) []byte {
	b := make([]byte, 64)
	word := func(off int, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }
	word(0, uint32(nr))
	word(4, auditArchX8664)
	// instruction_pointer (8..15) left zero: no filter of QEMU's reads it.
	for i, a := range args {
		word(16+8*i, uint32(a))
		word(20+8*i, uint32(uint64(a)>>32))
	}
	return b
}

// seccompVerdict runs the filters on system call nr with args and returns
// the verdict of the first that does not allow it (log counts as allow),
// ok when all allow it.
func seccompVerdict(filters [][]unix.SockFilter, nr uintptr, args ...uintptr) (ok bool, verdict string, err error) {
	data := seccompData(nr, args...)
	for i, prog := range filters {
		raw := make([]bpf.RawInstruction, len(prog))
		for j, ins := range prog {
			raw[j] = bpf.RawInstruction{Op: ins.Code, Jt: ins.Jt, Jf: ins.Jf, K: ins.K}
		}
		insns, decoded := bpf.Disassemble(raw)
		if !decoded {
			return false, "", fmt.Errorf("seccomp filter %d: an instruction this interpreter does not know", i)
		}
		vm, err := bpf.NewVM(insns)
		if err != nil {
			return false, "", fmt.Errorf("seccomp filter %d: %w", i, err)
		}
		ret, err := vm.Run(data)
		if err != nil {
			return false, "", fmt.Errorf("seccomp filter %d: %w", i, err)
		}
		// A program that fell off its end, divided by zero or read past
		// the data made the VM return 0: kill, as the kernel would not
		// have loaded it, and refusing is the safe side.
		if a := uint32(ret) & seccompRetActionFull; a != seccompRetAllow && a != seccompRetLog {
			return false, fmt.Sprintf("filter %d would %s", i, seccompAction(uint32(ret))), nil
		}
	}
	return true, "", nil
}

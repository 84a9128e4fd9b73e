//go:build amd64

package ptrace

import "golang.org/x/sys/unix"

// syscallInsn is the x86-64 syscall instruction.
var syscallInsn = []byte{0x0f, 0x05}

// syscallInsnLen is its length: the instruction pointer after it ran.
const syscallInsnLen = 2

// loadSyscall sets regs up to run system call nr with args at the syscall
// instruction at insn (the x86-64 system call convention: number in RAX,
// arguments in RDI, RSI, RDX, R10, R8, R9). orig_rax is set to -1: the
// thread is not in a system call, so when it resumes the kernel must not
// take RAX for an interrupted call's result and restart something.
func loadSyscall(regs *unix.PtraceRegs, insn, nr uintptr, args []uintptr) {
	regs.Rip = uint64(insn)
	regs.Rax = uint64(nr)
	regs.Orig_rax = ^uint64(0)
	for i, p := range []*uint64{&regs.Rdi, &regs.Rsi, &regs.Rdx, &regs.R10, &regs.R8, &regs.R9} {
		*p = 0
		if i < len(args) {
			*p = uint64(args[i])
		}
	}
}

// pc is the instruction pointer of regs.
func pc(regs *unix.PtraceRegs) uintptr { return uintptr(regs.Rip) }

// result is the return value of a system call that just ran.
func result(regs *unix.PtraceRegs) uintptr { return uintptr(regs.Rax) }

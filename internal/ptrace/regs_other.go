//go:build !amd64

package ptrace

import "golang.org/x/sys/unix"

// Only x86-64 is supported: elsewhere there is no instruction to look for,
// and Attach fails.
var syscallInsn []byte

const syscallInsnLen = 0

func loadSyscall(regs *unix.PtraceRegs, insn, nr uintptr, args []uintptr) {}

func pc(regs *unix.PtraceRegs) uintptr { return 0 }

func result(regs *unix.PtraceRegs) uintptr { return 0 }

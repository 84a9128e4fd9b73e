package ptrace

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// maxTextScan bounds how much of one text mapping findSyscallInsn reads.
const maxTextScan = 4 << 20

// findSyscallInsn returns the address of a syscall instruction in the
// executable memory of process pid: in its vDSO, which every process has
// and which holds the system call fallbacks of the time functions, or else
// in another readable and executable mapping (the C library's text). Any
// two bytes that encode the instruction will do, wherever they sit within
// the code around them: the thread executes just that instruction.
func findSyscallInsn(pid int) (uintptr, error) {
	if len(syscallInsn) == 0 {
		return 0, fmt.Errorf("ptrace: system calls cannot be injected on %s", runtime.GOARCH)
	}
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return 0, fmt.Errorf("ptrace: find a syscall instruction in pid %d: %w", pid, err)
	}
	type region struct{ start, end uintptr }
	var vdso, text []region
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || len(f[1]) < 3 || f[1][0] != 'r' || f[1][2] != 'x' {
			continue
		}
		lo, hi, ok := strings.Cut(f[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if !ok || err1 != nil || err2 != nil || end <= start {
			continue
		}
		r := region{uintptr(start), uintptr(end)}
		if len(f) >= 6 && f[5] == "[vdso]" {
			vdso = append(vdso, r)
		} else {
			text = append(text, r)
		}
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return 0, fmt.Errorf("ptrace: find a syscall instruction in pid %d: %w", pid, err)
	}
	defer mem.Close()
	for _, r := range append(vdso, text...) {
		n := min(r.end-r.start, maxTextScan)
		buf := make([]byte, n)
		got, err := mem.ReadAt(buf, int64(r.start))
		if err != nil && err != io.EOF && got == 0 {
			continue
		}
		if i := bytes.Index(buf[:got], syscallInsn); i >= 0 {
			return r.start + uintptr(i), nil
		}
	}
	return 0, fmt.Errorf("ptrace: no syscall instruction in the executable mappings of pid %d", pid)
}

package dirtypages

import (
	"strings"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// filter assembles a classic BPF program as the kernel would hold it.
func filter(t *testing.T, insns ...bpf.Instruction) []unix.SockFilter {
	t.Helper()
	raw, err := bpf.Assemble(insns)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		out[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return out
}

func TestSeccompVerdict(t *testing.T) {
	const (
		allow   = seccompRetAllow
		kill    = 0x80000000
		errnoEP = 0x00050000 | 1
	)
	allowAll := filter(t, bpf.RetConstant{Val: allow})
	// A deny list like QEMU's: mount and reboot kill, the rest passes.
	denyList := filter(t,
		bpf.LoadAbsolute{Off: 4, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: auditArchX8664, SkipTrue: 1},
		bpf.RetConstant{Val: kill},
		bpf.LoadAbsolute{Off: 0, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_MOUNT, SkipTrue: 2},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_REBOOT, SkipTrue: 1},
		bpf.RetConstant{Val: allow},
		bpf.RetConstant{Val: kill},
	)
	denyUffd := filter(t,
		bpf.LoadAbsolute{Off: 0, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_USERFAULTFD, SkipFalse: 1},
		bpf.RetConstant{Val: kill},
		bpf.RetConstant{Val: allow},
	)
	errnoClose := filter(t,
		bpf.LoadAbsolute{Off: 0, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_CLOSE, SkipFalse: 1},
		bpf.RetConstant{Val: errnoEP},
		bpf.RetConstant{Val: allow},
	)
	// Allows userfaultfd only with O_NONBLOCK in its flags and nothing in
	// the argument's high word: reads args[0] as the kernel lays it out.
	argCheck := filter(t,
		bpf.LoadAbsolute{Off: 0, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_USERFAULTFD, SkipFalse: 5},
		bpf.LoadAbsolute{Off: 20, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0, SkipFalse: 2},
		bpf.LoadAbsolute{Off: 16, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: unix.O_NONBLOCK, SkipTrue: 1},
		bpf.RetConstant{Val: kill},
		bpf.RetConstant{Val: allow},
	)
	logAll := filter(t, bpf.RetConstant{Val: seccompRetLog})
	readsPastData := filter(t, bpf.LoadAbsolute{Off: 64, Size: 4}, bpf.RetA{})

	uffd, uffdArgs := injected[0].nr, injected[0].args
	for _, tc := range []struct {
		name    string
		filters [][]unix.SockFilter
		nr      uintptr
		args    []uintptr
		ok      bool
		verdict string
	}{
		{"no filters", nil, uffd, uffdArgs, true, ""},
		{"allow all", [][]unix.SockFilter{allowAll}, uffd, uffdArgs, true, ""},
		{"deny list, userfaultfd", [][]unix.SockFilter{denyList}, uffd, uffdArgs, true, ""},
		{"deny list, close", [][]unix.SockFilter{denyList}, unix.SYS_CLOSE, []uintptr{7}, true, ""},
		{"deny list, mount", [][]unix.SockFilter{denyList}, unix.SYS_MOUNT, nil, false, "filter 0 would kill the process"},
		{"userfaultfd denied", [][]unix.SockFilter{denyUffd}, uffd, uffdArgs, false, "kill the process"},
		{"second filter denies", [][]unix.SockFilter{allowAll, denyUffd}, uffd, uffdArgs, false, "filter 1 would"},
		{"close fails", [][]unix.SockFilter{errnoClose}, unix.SYS_CLOSE, []uintptr{7}, false, "fail with errno 1"},
		{"arguments read", [][]unix.SockFilter{argCheck}, uffd, uffdArgs, true, ""},
		{"arguments read, no O_NONBLOCK", [][]unix.SockFilter{argCheck}, uffd, []uintptr{unix.O_CLOEXEC}, false, "kill"},
		{"arguments read, high word", [][]unix.SockFilter{argCheck}, uffd, []uintptr{1<<32 | unix.O_NONBLOCK}, false, "kill"},
		{"log counts as allow", [][]unix.SockFilter{logAll}, uffd, uffdArgs, true, ""},
		{"reads past the data", [][]unix.SockFilter{readsPastData}, uffd, uffdArgs, false, "kill the thread"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ok, verdict, err := seccompVerdict(tc.filters, tc.nr, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if ok != tc.ok || !strings.Contains(verdict, tc.verdict) {
				t.Fatalf("verdict (%v, %q), want (%v, containing %q)", ok, verdict, tc.ok, tc.verdict)
			}
		})
	}

	// A program the kernel would never have loaded is an error, not a
	// verdict.
	bad := []unix.SockFilter{{Code: 0xff}}
	if _, _, err := seccompVerdict([][]unix.SockFilter{bad}, uffd, uffdArgs...); err == nil {
		t.Fatal("an undecodable filter was evaluated")
	}
}

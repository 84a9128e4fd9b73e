// Package ptrace runs a system call inside another process, the way a
// debugger's "call" does, but stopping only one thread of it for about a
// millisecond: the agent uses it to create a userfaultfd that belongs to
// QEMU's memory (a uffd is bound to the address space of the process that
// creates it, and no interface creates one for another process).
//
// Do seizes the target's main thread (the thread whose id is the process
// id; in QEMU the main loop, which spends its time in ppoll without the
// global lock, so the vCPU threads run on), interrupts it, and saves its
// registers. Each call through the Caller it hands its function points the
// instruction pointer at a syscall instruction found in the target's
// executable memory (its vDSO, else a text mapping), loads the call's
// number and arguments, single-steps the instruction, reads the result and
// puts the saved registers back. Then Do lets the thread go. A thread
// interrupted inside a restartable system call (ppoll returns
// -ERESTARTNOHAND, read -ERESTARTSYS, nanosleep -ERESTART_RESTARTBLOCK)
// gets its registers back as they were at the stop, orig_rax included, so
// the kernel restarts the call when the thread resumes, as it does after
// any ptrace stop. A signal that reaches the thread while it is held is
// kept from it and delivered, with its siginfo, when Do lets it go.
//
// All of it, the caller's function included, runs on one goroutine locked
// to its OS thread: the kernel binds a tracee to the tracing thread, and
// no hand-off between threads lengthens the stop. That thread exits when Do
// returns, so that if something fails in a way that leaves the tracee
// attached, the kernel detaches it.
//
// What a session needs: the rights to ptrace the target (root, or
// CAP_SYS_PTRACE where Yama's ptrace_scope restricts ptrace to
// descendants), a target that nobody traces already, and a target that is
// not a child of this process: its stops would also be reported to
// whichever goroutine waits for the child (os/exec's Wait does), which
// would take them for an exit. The system call injected must be one the
// target's seccomp filter allows: a filter that kills on it kills the
// target.
package ptrace

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrChild is returned (wrapped) by Attach when the target is a child of
// this process; see the package documentation.
var ErrChild = errors.New("ptrace: target is a child of this process")

// ErrDetached is returned by a Caller used after its Do returned, or from
// a goroutine other than the one running Do's function.
var ErrDetached = errors.New("ptrace: thread no longer held")

// SyscallError is the error of a system call that ran in the target and
// failed: it returned -Errno. The target was left as it was found.
type SyscallError struct {
	Pid   int
	Nr    uintptr
	Errno unix.Errno
}

func (e *SyscallError) Error() string {
	return fmt.Sprintf("ptrace: system call %d in pid %d: %v", e.Nr, e.Pid, e.Errno)
}

func (e *SyscallError) Unwrap() error { return e.Errno }

// recoverGrace bounds how long a call whose context ended waits for the
// target to stop again, so that its registers can be put back.
const recoverGrace = 2 * time.Second

// Caller runs system call nr with up to six arguments in the stopped
// thread and returns its result (RAX). A call that fails in the target
// returns a *SyscallError holding its errno. The thread's registers are
// restored before it returns, whatever happened.
//
// The call should not block: the thread stays stopped while it runs. When
// Do's context ends while it runs, the call is interrupted, the registers
// restored, and the context's error returned; the call may or may not have
// had its effect.
type Caller func(nr uintptr, args ...uintptr) (uintptr, error)

// Do stops the main thread of process pid, calls f with a Caller that runs
// system calls in it, and lets the thread go on when f returns; the other
// threads of the process run on throughout. It returns how long the thread
// was held stopped, and f's error joined with any error letting it go.
// When ctx ends before the thread stops, Do lets it go and returns ctx's
// error without calling f.
//
// f runs on the goroutine that traces the thread: it should do nothing
// but what must happen while the thread is held (pidfd_getfd of an fd the
// call created, say), and must not keep the Caller.
func Do(ctx context.Context, pid int, f func(call Caller) error) (held time.Duration, err error) {
	if pid <= 0 {
		return 0, fmt.Errorf("ptrace: attach to pid %d: not a process id", pid)
	}
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("ptrace: attach to pid %d: %w", pid, err)
	}
	if err := checkTarget(pid); err != nil {
		return 0, err
	}
	// Found before the stop, so that it does not add to it: a vDSO and a
	// text mapping stay where they are for the process's life.
	insn, err := findSyscallInsn(pid)
	if err != nil {
		return 0, err
	}
	s := &session{pid: pid, insn: insn}
	var panicked any
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Never unlocked: the thread exits with the goroutine, and the
		// kernel detaches whatever it still traces.
		runtime.LockOSThread()
		s.tid = unix.Gettid()
		if err = s.attach(ctx); err != nil {
			return
		}
		var ferr error
		func() {
			defer func() { panicked = recover() }()
			ferr = f(func(nr uintptr, args ...uintptr) (uintptr, error) {
				// Only the tracing thread may make ptrace requests, and
				// it runs f alone.
				if unix.Gettid() != s.tid || s.detached {
					return 0, fmt.Errorf("ptrace: system call %d in pid %d: %w", nr, pid, ErrDetached)
				}
				return s.syscall(ctx, nr, args)
			})
		}()
		err = errors.Join(ferr, s.detach())
		held = time.Since(s.stopped)
	}()
	<-done
	if panicked != nil {
		panic(panicked)
	}
	return held, err
}

// Inject runs one system call in process pid's main thread; see Do and
// Caller.
func Inject(ctx context.Context, pid int, nr uintptr, args ...uintptr) (uintptr, error) {
	var ret uintptr
	_, err := Do(ctx, pid, func(call Caller) error {
		var err error
		ret, err = call(nr, args...)
		return err
	})
	return ret, err
}

// session is the state of one Do, owned by its tracing goroutine.
type session struct {
	pid      int
	tid      int             // the tracing thread
	insn     uintptr         // address of a syscall instruction in the target
	saved    unix.PtraceRegs // the thread's registers at the stop
	sigStop  bool            // the thread sits in a signal-delivery-stop
	pending  []unix.Siginfo  // signals held back, delivered at detach
	stopped  time.Time       // when the thread stopped
	broken   error           // the target's state could not be restored
	detached bool
}

// stopEvent returns the ptrace event of a stop (PTRACE_EVENT_STOP for an
// interrupt or group stop), 0 for a signal-delivery-stop.
func stopEvent(ws unix.WaitStatus) int { return int(ws) >> 16 }

// checkTarget reads /proc/PID/status for what would make a session fail
// or do harm, to say so clearly.
func checkTarget(pid int) error {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("ptrace: attach to pid %d: no such process: %w", pid, unix.ESRCH)
	}
	if err != nil {
		return fmt.Errorf("ptrace: attach to pid %d: %w", pid, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		v = strings.TrimSpace(v)
		switch k {
		case "Tgid":
			if v != strconv.Itoa(pid) {
				return fmt.Errorf("ptrace: attach to pid %d: it is a thread of process %s, not a process", pid, v)
			}
		case "PPid":
			if v == strconv.Itoa(os.Getpid()) {
				return fmt.Errorf("%w: pid %d (its ptrace stops would reach a Wait for it as if it had ended)", ErrChild, pid)
			}
		case "TracerPid":
			if v != "0" {
				return fmt.Errorf("ptrace: attach to pid %d: already traced by pid %s", pid, v)
			}
		}
	}
	return nil
}

// attach seizes the thread, interrupts it and waits for it to stop.
func (s *session) attach(ctx context.Context) error {
	if err := unix.PtraceSeize(s.pid); err != nil {
		return fmt.Errorf("ptrace: seize pid %d: %w", s.pid, err)
	}
	if err := unix.PtraceInterrupt(s.pid); err != nil {
		return fmt.Errorf("ptrace: interrupt pid %d: %w", s.pid, err)
	}
	for {
		ws, err := s.wait(ctx)
		if err != nil {
			// Still running: the thread's exit detaches it.
			return fmt.Errorf("ptrace: wait for pid %d to stop: %w", s.pid, err)
		}
		if err := exited(s.pid, ws); err != nil {
			return err
		}
		if stopEvent(ws) == unix.PTRACE_EVENT_STOP {
			if sig := ws.StopSignal(); sig != unix.SIGTRAP {
				// A group stop (SIGSTOP and the like): whoever stopped
				// the process expects it to stay stopped.
				_ = unix.PtraceDetach(s.pid)
				return fmt.Errorf("ptrace: pid %d is stopped by %v", s.pid, sig)
			}
			break
		}
		// A signal arrived before the interrupt took effect: let the
		// thread take it; the interrupt stops it afterwards.
		if err := unix.PtraceCont(s.pid, int(ws.StopSignal())); err != nil {
			return fmt.Errorf("ptrace: pass signal %v to pid %d: %w", ws.StopSignal(), s.pid, err)
		}
	}
	s.stopped = time.Now()
	if err := unix.PtraceGetRegs(s.pid, &s.saved); err != nil {
		_ = unix.PtraceDetach(s.pid)
		return fmt.Errorf("ptrace: registers of pid %d: %w", s.pid, err)
	}
	return nil
}

// wait waits for the next stop (or end) of the thread. It polls, so that
// ctx can end the wait: a blocking wait4 could not be called off. An
// interrupted or single-stepped thread stops within microseconds once it
// runs, so for the first spinWait the polls follow one another, yielding
// the CPU in between (the tracee may be waiting for it); then they back
// off to one per millisecond.
func (s *session) wait(ctx context.Context) (unix.WaitStatus, error) {
	var ws unix.WaitStatus
	start := time.Now()
	pause := time.Duration(0)
	for {
		wpid, err := unix.Wait4(s.pid, &ws, unix.WNOHANG|unix.WALL, nil)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return ws, err
		case wpid == s.pid:
			return ws, nil
		}
		if err := ctx.Err(); err != nil {
			return ws, err
		}
		if time.Since(start) < spinWait {
			unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
			continue
		}
		pause = min(max(2*pause, 10*time.Microsecond), time.Millisecond)
		time.Sleep(pause)
	}
}

// spinWait is how long wait polls without sleeping.
const spinWait = 2 * time.Millisecond

// exited returns an error when ws says the thread's process has ended.
func exited(pid int, ws unix.WaitStatus) error {
	switch {
	case ws.Exited():
		return fmt.Errorf("ptrace: pid %d exited with status %d", pid, ws.ExitStatus())
	case ws.Signaled():
		return fmt.Errorf("ptrace: pid %d killed by %v", pid, ws.Signal())
	}
	return nil
}

func (s *session) syscall(ctx context.Context, nr uintptr, args []uintptr) (uintptr, error) {
	if s.broken != nil {
		return 0, s.broken
	}
	regs := s.saved
	loadSyscall(&regs, s.insn, nr, args)
	if err := unix.PtraceSetRegs(s.pid, &regs); err != nil {
		return 0, fmt.Errorf("ptrace: set registers of pid %d: %w", s.pid, err)
	}
	// From the first stop, or from the previous call's SIGTRAP: resuming
	// with no signal discards that SIGTRAP.
	if err := unix.PtraceSingleStep(s.pid); err != nil {
		return 0, s.restore(fmt.Errorf("ptrace: single-step pid %d: %w", s.pid, err))
	}
	for {
		ws, err := s.wait(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return 0, s.regain(fmt.Errorf("ptrace: system call %d in pid %d: %w", nr, s.pid, err))
			}
			return 0, s.fail(fmt.Errorf("ptrace: wait for pid %d: %w", s.pid, err))
		}
		if err := exited(s.pid, ws); err != nil {
			return 0, s.fail(err)
		}
		if stopEvent(ws) != 0 {
			// An event stop (a group stop, a stray interrupt): the
			// call may not have run yet.
			if err := s.stepAgain(&regs); err != nil {
				return 0, err
			}
			continue
		}
		// A signal-delivery-stop: the step's SIGTRAP, or a signal for the
		// thread, which waits for Detach.
		s.sigStop = true
		var info unix.Siginfo
		if err := getSiginfo(s.pid, &info); err != nil {
			return 0, s.restore(fmt.Errorf("ptrace: siginfo of pid %d: %w", s.pid, err))
		}
		if err := unix.PtraceGetRegs(s.pid, &regs); err != nil {
			return 0, s.restore(fmt.Errorf("ptrace: registers of pid %d: %w", s.pid, err))
		}
		if ws.StopSignal() == unix.SIGTRAP && info.Code > 0 && pc(&regs) == s.insn+syscallInsnLen {
			ret := result(&regs)
			if err := s.restore(nil); err != nil {
				return 0, err
			}
			if errno := int64(ret); errno < 0 && errno >= -4095 {
				return ret, &SyscallError{Pid: s.pid, Nr: nr, Errno: unix.Errno(-errno)}
			}
			return ret, nil
		}
		s.pending = append(s.pending, info)
		if err := s.stepAgain(&regs); err != nil {
			return 0, err
		}
	}
}

// stepAgain resumes a thread stopped before the injected call ran (its
// instruction pointer still at the syscall instruction) with another
// single step. A thread stopped anywhere else is in a state this session
// did not expect: its registers are restored and the session refuses
// further calls.
func (s *session) stepAgain(regs *unix.PtraceRegs) error {
	if err := unix.PtraceGetRegs(s.pid, regs); err != nil {
		return s.restore(fmt.Errorf("ptrace: registers of pid %d: %w", s.pid, err))
	}
	if pc(regs) != s.insn {
		return s.fail(fmt.Errorf("ptrace: pid %d stopped at %#x during an injected system call at %#x", s.pid, pc(regs), s.insn))
	}
	if err := unix.PtraceSingleStep(s.pid); err != nil {
		return s.restore(fmt.Errorf("ptrace: single-step pid %d: %w", s.pid, err))
	}
	return nil
}

// restore puts the saved registers back, and returns err, or the failure
// to restore them, which also breaks the session.
func (s *session) restore(err error) error {
	if rerr := unix.PtraceSetRegs(s.pid, &s.saved); rerr != nil {
		s.broken = fmt.Errorf("ptrace: restore the registers of pid %d: %w", s.pid, rerr)
		return errors.Join(err, s.broken)
	}
	return err
}

// fail restores the registers where it can and marks the session broken:
// no more calls.
func (s *session) fail(err error) error {
	err = s.restore(err)
	if s.broken == nil {
		s.broken = err
	}
	return err
}

// regain brings back a thread whose injected call outlived ctx: it
// interrupts it, waits (at most recoverGrace) for the stop, and restores
// the registers. The step's SIGTRAP may then still be queued for the
// thread; it is drained so that it is not delivered after Detach, which
// would kill the target.
func (s *session) regain(err error) error {
	ctx, cancel := context.WithTimeout(context.Background(), recoverGrace)
	defer cancel()
	if ierr := unix.PtraceInterrupt(s.pid); ierr != nil {
		return s.fail(errors.Join(err, fmt.Errorf("ptrace: interrupt pid %d: %w", s.pid, ierr)))
	}
	for {
		ws, werr := s.wait(ctx)
		if werr != nil {
			s.broken = fmt.Errorf("ptrace: pid %d did not stop after its injected system call was interrupted (%w): its registers could not be restored", s.pid, werr)
			return errors.Join(err, s.broken)
		}
		if xerr := exited(s.pid, ws); xerr != nil {
			return s.fail(errors.Join(err, xerr))
		}
		if rerr := s.restore(nil); rerr != nil {
			return errors.Join(err, rerr)
		}
		if stopEvent(ws) == 0 {
			// A signal-delivery-stop.
			var info unix.Siginfo
			if gerr := getSiginfo(s.pid, &info); gerr != nil {
				return s.fail(errors.Join(err, gerr))
			}
			s.sigStop = true
			if ws.StopSignal() == unix.SIGTRAP && info.Code > 0 {
				return err // the step's SIGTRAP, discarded at the next resume
			}
			s.pending = append(s.pending, info)
		} else {
			s.sigStop = false
			pendingTrap, perr := trapPending(s.pid)
			if perr != nil {
				return s.fail(errors.Join(err, perr))
			}
			if !pendingTrap {
				return err
			}
		}
		// With the registers restored, the thread would only resume its
		// own code; it stops first to take the queued SIGTRAP.
		if cerr := unix.PtraceCont(s.pid, 0); cerr != nil {
			return s.fail(errors.Join(err, fmt.Errorf("ptrace: resume pid %d: %w", s.pid, cerr)))
		}
	}
}

// trapPending reports whether SIGTRAP is pending for thread pid (SigPnd in
// /proc/PID/task/PID/status).
func trapPending(pid int) (bool, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/status", pid, pid))
	if err != nil {
		return false, fmt.Errorf("ptrace: pending signals of pid %d: %w", pid, err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "SigPnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return false, fmt.Errorf("ptrace: pending signals of pid %d: %q: %w", pid, l, err)
			}
			return mask&(1<<(unix.SIGTRAP-1)) != 0, nil
		}
	}
	return false, fmt.Errorf("ptrace: pending signals of pid %d: no SigPnd line", pid)
}

// detach lets the thread go on, with the registers it had at the stop,
// and delivers the signals held back meanwhile: the first with its
// siginfo, as the signal it stops for at detach, any further ones with
// tgkill (same signal, siginfo of a tgkill).
func (s *session) detach() error {
	s.detached = true
	var errs []error
	if s.broken == nil {
		if err := unix.PtraceSetRegs(s.pid, &s.saved); err != nil {
			errs = append(errs, fmt.Errorf("ptrace: restore the registers of pid %d: %w", s.pid, err))
		}
	}
	sig, rest := 0, s.pending
	if s.sigStop && len(rest) > 0 {
		if err := setSiginfo(s.pid, &rest[0]); err == nil {
			sig, rest = int(rest[0].Signo), rest[1:]
		}
	}
	if err := ptraceDetach(s.pid, sig); err != nil {
		errs = append(errs, fmt.Errorf("ptrace: detach from pid %d: %w", s.pid, err))
	}
	for _, info := range rest {
		if err := unix.Tgkill(s.pid, s.pid, unix.Signal(info.Signo)); err != nil {
			errs = append(errs, fmt.Errorf("ptrace: deliver signal %d held back from pid %d: %w", info.Signo, s.pid, err))
		}
	}
	return errors.Join(errs...)
}

func getSiginfo(pid int, info *unix.Siginfo) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_GETSIGINFO, uintptr(pid), 0, uintptr(unsafe.Pointer(info)), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

func setSiginfo(pid int, info *unix.Siginfo) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SETSIGINFO, uintptr(pid), 0, uintptr(unsafe.Pointer(info)), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// ptraceDetach detaches, delivering signal sig when the tracee sits in a
// signal-delivery-stop (unix.PtraceDetach passes none).
func ptraceDetach(pid, sig int) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_DETACH, uintptr(pid), 0, uintptr(sig), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// ptraceSeccompGetFilter is PTRACE_SECCOMP_GET_FILTER (linux/ptrace.h).
const ptraceSeccompGetFilter = 0x420c

// SeccompFilters returns the classic BPF programs of the seccomp filters
// of the thread that Do holds stopped in process pid, the most recently
// installed first (the kernel runs them all and the strictest verdict
// wins). It must be called from inside Do's f, on the tracing goroutine.
// The kernel hands them out only to a tracer with CAP_SYS_ADMIN that runs
// under no seccomp filter itself, and only with CONFIG_CHECKPOINT_RESTORE.
func SeccompFilters(pid int) ([][]unix.SockFilter, error) {
	var filters [][]unix.SockFilter
	for i := 0; ; i++ {
		n, _, errno := unix.Syscall6(unix.SYS_PTRACE, ptraceSeccompGetFilter, uintptr(pid), uintptr(i), 0, 0, 0)
		switch {
		case errno == unix.ENOENT || (errno == unix.EINVAL && i == 0):
			// Past the last one; EINVAL: no filter mode at all.
			return filters, nil
		case errno != 0:
			return filters, fmt.Errorf("ptrace: seccomp filter %d of pid %d: %w", i, pid, errno)
		case n == 0:
			return filters, fmt.Errorf("ptrace: seccomp filter %d of pid %d is empty", i, pid)
		}
		prog := make([]unix.SockFilter, n)
		if _, _, errno := unix.Syscall6(unix.SYS_PTRACE, ptraceSeccompGetFilter, uintptr(pid), uintptr(i), uintptr(unsafe.Pointer(&prog[0])), 0, 0); errno != 0 {
			return filters, fmt.Errorf("ptrace: seccomp filter %d of pid %d: %w", i, pid, errno)
		}
		filters = append(filters, prog)
	}
}

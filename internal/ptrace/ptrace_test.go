package ptrace

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// waitInSyscall waits until the target's main thread sits in system call
// nr (the first field of /proc/PID/syscall), so that a test stops it where
// it means to.
func waitInSyscall(t testing.TB, tg *target, nr int) {
	t.Helper()
	want := strconv.Itoa(nr) + " "
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", tg.pid))
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the target's main thread is not in system call %d: /proc/PID/syscall says %q", nr, b)
		}
		time.Sleep(time.Millisecond)
	}
}

// modeSyscall is the system call each mode's main thread blocks in.
var modeSyscall = map[string]int{"ppoll": unix.SYS_PPOLL, "read": unix.SYS_READ}

// TestInject injects system calls into a target whose main thread is
// blocked in ppoll (restarted after -ERESTARTNOHAND), in read
// (-ERESTARTSYS): getpid answers the target's pid, userfaultfd and
// memfd_create open fds there that injected closes close again, and the
// target answers on its pipe afterwards.
func TestInject(t *testing.T) {
	for _, mode := range []string{"ppoll", "read"} {
		t.Run(mode, func(t *testing.T) {
			tg := startTarget(t, mode)
			tg.ping(t, 1)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()

			waitInSyscall(t, tg, modeSyscall[mode])
			pid, err := Inject(ctx, tg.pid, unix.SYS_GETPID)
			if err != nil || int(pid) != tg.pid {
				t.Fatalf("getpid in the target: %d, %v; want %d", pid, err, tg.pid)
			}
			tg.ping(t, 2)

			waitInSyscall(t, tg, modeSyscall[mode])
			var caller Caller
			held, err := Do(ctx, tg.pid, func(call Caller) error {
				caller = call
				uffd, err := call(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK|1 /* UFFD_USER_MODE_ONLY */)
				if err != nil {
					return fmt.Errorf("userfaultfd in the target: %w", err)
				}
				memfd, err := call(unix.SYS_MEMFD_CREATE, tg.name, unix.MFD_CLOEXEC)
				if err != nil {
					return fmt.Errorf("memfd_create in the target: %w", err)
				}
				if l := tg.fdLink(uffd); l != "anon_inode:[userfaultfd]" {
					t.Errorf("fd %d of the target links to %q, want the userfaultfd", uffd, l)
				}
				if l := tg.fdLink(memfd); l != "/memfd:ptrace-test-memfd (deleted)" {
					t.Errorf("fd %d of the target links to %q, want the memfd", memfd, l)
				}
				for _, fd := range []uintptr{uffd, memfd} {
					if _, err := call(unix.SYS_CLOSE, fd); err != nil {
						t.Errorf("close(%d) in the target: %v", fd, err)
					}
					if l := tg.fdLink(fd); l != "" {
						t.Errorf("fd %d still open in the target after close: %q", fd, l)
					}
				}
				// Only the goroutine running f may call.
				other := make(chan error)
				go func() { _, err := call(unix.SYS_GETPID); other <- err }()
				if err := <-other; !errors.Is(err, ErrDetached) {
					t.Errorf("call from another goroutine: %v", err)
				}
				// A call that fails returns its errno.
				_, err = call(unix.SYS_CLOSE, uffd)
				var se *SyscallError
				if !errors.As(err, &se) || !errors.Is(err, unix.EBADF) || se.Nr != unix.SYS_CLOSE {
					t.Errorf("close of a closed fd: %v, want EBADF", err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("main thread held stopped for %v for 5 system calls", held)
			if _, err := caller(unix.SYS_GETPID); !errors.Is(err, ErrDetached) {
				t.Errorf("system call after Do returned: %v", err)
			}
			// f's error comes back, and the thread is let go all the same.
			errF := errors.New("f failed")
			if _, err := Do(ctx, tg.pid, func(Caller) error { return errF }); !errors.Is(err, errF) {
				t.Errorf("Do returned %v, want f's error", err)
			}
			for i := 3; i < 10; i++ {
				tg.ping(t, i)
			}
		})
	}
}

// TestInjectRestartsNanosleep stops a main thread in nanosleep, whose
// restart goes through the thread's restart block
// (-ERESTART_RESTARTBLOCK): after the injection the sleep goes on for the
// time it had left, and returns no error.
func TestInjectRestartsNanosleep(t *testing.T) {
	tg := startTarget(t, "nanosleep")
	const ms = 400
	tg.send(t, "sleep "+strconv.Itoa(ms))
	waitInSyscall(t, tg, unix.SYS_NANOSLEEP)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 3 {
		if pid, err := Inject(ctx, tg.pid, unix.SYS_GETPID); err != nil || int(pid) != tg.pid {
			t.Fatalf("getpid: %d, %v", pid, err)
		}
	}
	var slept int
	var errStr string
	line := tg.line(t)
	if _, err := fmt.Sscanf(line, "slept %d err=%s", &slept, &errStr); err != nil {
		t.Fatalf("target said %q: %v", line, err)
	}
	if errStr != "<nil>" || slept < ms || slept > 3*ms {
		t.Fatalf("nanosleep of %d ms interrupted by injections: %q", ms, line)
	}
	tg.ping(t, 1)
}

// TestInjectBusy injects into a main thread that runs in user space: its
// computation goes on with intact registers.
func TestInjectBusy(t *testing.T) {
	tg := startTarget(t, "busy")
	status := func() (progress, corrupt int) {
		tg.send(t, "status")
		var signals int
		if _, err := fmt.Sscanf(tg.line(t), "progress %d corrupt %d signals %d", &progress, &corrupt, &signals); err != nil {
			t.Fatal(err)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	before, _ := status()
	for range 50 {
		if pid, err := Inject(ctx, tg.pid, unix.SYS_GETPID); err != nil || int(pid) != tg.pid {
			t.Fatalf("getpid: %d, %v", pid, err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		progress, corrupt := status()
		if corrupt != 0 {
			t.Fatalf("the target's registers were corrupted %d times", corrupt)
		}
		if progress > before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the target's computation stopped at %d", progress)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestInjectHoldsSignal: a signal sent to the thread while a session holds
// it reaches it after Detach, not before, and not lost.
func TestInjectHoldsSignal(t *testing.T) {
	tg := startTarget(t, "ppoll")
	if n := tg.ping(t, 1); n != 0 {
		t.Fatalf("%d signals before the test sent any", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	waitInSyscall(t, tg, unix.SYS_PPOLL)
	_, err := Do(ctx, tg.pid, func(call Caller) error {
		if err := unix.Tgkill(tg.pid, tg.pid, unix.SIGUSR1); err != nil {
			return err
		}
		for range 2 {
			if pid, err := call(unix.SYS_GETPID); err != nil || int(pid) != tg.pid {
				return fmt.Errorf("getpid: %d, %v", pid, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for i := 2; tg.ping(t, i) != 1; i++ {
		if time.Now().After(deadline) {
			t.Fatal("SIGUSR1 sent during the session never reached the target")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestInjectDeadline: a context that ends while the injected call blocks
// (pause) ends the call; the thread gets its registers back and goes on.
// One that ended before is refused at once.
func TestInjectDeadline(t *testing.T) {
	tg := startTarget(t, "ppoll")
	tg.ping(t, 1)
	waitInSyscall(t, tg, unix.SYS_PPOLL)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Inject(ctx, tg.pid, unix.SYS_PAUSE)
	took := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("blocking call past the deadline: %v", err)
	}
	if took > 2*time.Second {
		t.Fatalf("the deadline of 200 ms ended the call after %v", took)
	}
	t.Logf("after %v: %v", took, err)
	for i := 2; i < 5; i++ {
		tg.ping(t, i)
	}

	if _, err := Inject(ctx, tg.pid, unix.SYS_GETPID); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("expired context: %v", err)
	}
	tg.ping(t, 5)
}

// TestAttachRefuses: a pid that names no process, one that names a
// thread, and a child of this process.
func TestAttachRefuses(t *testing.T) {
	ctx := context.Background()
	_, err := Inject(ctx, 1<<22+12345, unix.SYS_GETPID)
	if !errors.Is(err, unix.ESRCH) || !strings.Contains(err.Error(), "no such process") {
		t.Errorf("absent pid: %v", err)
	}
	if _, err := Inject(ctx, 0, unix.SYS_GETPID); err == nil {
		t.Error("pid 0 accepted")
	}
	tids, _ := os.ReadDir("/proc/self/task")
	for _, d := range tids {
		if d.Name() != strconv.Itoa(os.Getpid()) {
			if _, err := Inject(ctx, atoi(d.Name()), unix.SYS_GETPID); err == nil || !strings.Contains(err.Error(), "is a thread of process") {
				t.Errorf("thread %s: %v", d.Name(), err)
			}
			break
		}
	}
	child := exec.Command("sleep", "60")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	if _, err := Inject(ctx, child.Process.Pid, unix.SYS_GETPID); !errors.Is(err, ErrChild) {
		t.Errorf("a child: %v", err)
	}
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

// BenchmarkInject measures a getpid injected into a target blocked in
// ppoll; held-µs is how long its main thread stayed stopped.
func BenchmarkInject(b *testing.B) {
	tg := startTarget(b, "ppoll")
	tg.ping(b, 1)
	ctx := context.Background()
	var held time.Duration
	for b.Loop() {
		h, err := Do(ctx, tg.pid, func(call Caller) error {
			_, err := call(unix.SYS_GETPID)
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		held += h
	}
	b.ReportMetric(float64(held.Microseconds())/float64(b.N), "held-µs/op")
	tg.ping(b, 2)
}

package ptrace

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Environment variables that turn the test binary into a helper process.
const (
	// launchEnv makes it start the target (targetEnv set to the same mode)
	// and exit at once, so that the target is not a child of the test.
	launchEnv = "PTRACE_TEST_LAUNCH"
	// targetEnv makes it the target process, in the mode it names.
	targetEnv = "PTRACE_TEST_TARGET"
)

func init() {
	// The target's main goroutine must run on the main thread (tid ==
	// pid), the thread a session stops.
	if os.Getenv(targetEnv) != "" {
		runtime.LockOSThread()
	}
}

func TestMain(m *testing.M) {
	if mode := os.Getenv(launchEnv); mode != "" {
		os.Exit(launchMain(mode))
	}
	if mode := os.Getenv(targetEnv); mode != "" {
		os.Exit(targetMain(mode))
	}
	os.Exit(m.Run())
}

// launchMain starts the target with the launcher's fds 3 (commands) and 4
// (replies), writes "pid N" to fd 4 and exits without waiting for it.
func launchMain(mode string) int {
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "launch:", err)
		return 2
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), targetEnv+"="+mode, launchEnv+"=")
	cmd.ExtraFiles = []*os.File{os.NewFile(3, "commands"), os.NewFile(4, "replies")}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "launch:", err)
		return 2
	}
	fmt.Fprintf(cmd.ExtraFiles[1], "pid %d\n", cmd.Process.Pid)
	return 0
}

// memfdName is the name the tests give memfd_create calls they inject into
// the target, which prints its address.
var memfdName = []byte("ptrace-test-memfd\x00")

// targetMain is the target process. Its main thread, where sessions stop
// it, spends its time as mode says:
//
//	ppoll      in ppoll on the command pipe (as QEMU's main loop)
//	read       in read on the command pipe
//	nanosleep  in nanosleep, when told "sleep MS"
//	busy       in user space, computing
//
// It prints "ready name=ADDR" on the reply pipe, then answers commands:
// "ping N" with "pong N", "sleep MS" with "slept MS err=E" (nanosleep
// mode), "status" with "progress P corrupt C signals S" (busy mode, from
// another thread). SIGUSR1 is counted in signals, which the main thread's
// modes also report as " signals S" after "pong N".
func targetMain(mode string) int {
	cmds, replies := os.NewFile(3, "commands"), os.NewFile(4, "replies")
	var signals atomic.Int64
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGUSR1)
	go func() {
		for range sigs {
			signals.Add(1)
		}
	}()
	reply := func(format string, a ...any) {
		fmt.Fprintf(replies, format+"\n", a...)
	}
	reply("ready name=%#x", uintptr(unsafe.Pointer(&memfdName[0])))
	fd := int(cmds.Fd())

	if mode == "busy" {
		var progress, corrupt atomic.Uint64
		go func() {
			sc := bufio.NewScanner(cmds)
			for sc.Scan() {
				if sc.Text() == "status" {
					reply("progress %d corrupt %d signals %d", progress.Load(), corrupt.Load(), signals.Load())
				}
			}
			os.Exit(0)
		}()
		spin(&progress, &corrupt)
	}

	line := make([]byte, 0, 64)
	for {
		switch mode {
		case "ppoll":
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if _, err := unix.Ppoll(fds, nil, nil); err == unix.EINTR {
				continue // a signal with a handler: ppoll never restarts then
			} else if err != nil {
				fmt.Fprintln(os.Stderr, "target: ppoll:", err)
				return 2
			}
		}
		var b [1]byte
		n, err := unix.Read(fd, b[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return 0 // the test is done
		}
		if b[0] != '\n' {
			line = append(line, b[0])
			continue
		}
		cmd, arg, _ := strings.Cut(string(line), " ")
		line = line[:0]
		switch cmd {
		case "ping":
			reply("pong %s signals %d", arg, signals.Load())
		case "sleep":
			ms, _ := strconv.Atoi(arg)
			ts := unix.NsecToTimespec(int64(ms) * 1e6)
			start := time.Now()
			err := unix.Nanosleep(&ts, nil)
			reply("slept %d err=%v", time.Since(start).Milliseconds(), err)
		}
	}
}

// spin computes forever, checking invariants between values that live in
// registers: a register the injection failed to restore shows as a
// corrupt count.
func spin(progress, corrupt *atomic.Uint64) {
	a, b, c := uint64(1), uint64(2), uint64(3)
	for i := uint64(0); ; i++ {
		a++
		b += 2
		c += 3
		if b != 2*a || c != 3*a {
			corrupt.Add(1)
			a, b, c = 1, 2, 3
		}
		if i&0xffff == 0 {
			progress.Store(i)
		}
	}
}

// target is a running target process, not a child of the test.
type target struct {
	pid     int
	pidfd   int
	cmds    *os.File
	replies *bufio.Reader
	name    uintptr // address of memfdName in the target
}

// startTarget starts a target process in mode through a launcher, and
// kills it at cleanup.
func startTarget(t testing.TB, mode string) *target {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cr, cw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	rr, rw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	launcher := exec.Command(exe, "-test.run=^$")
	// GORACE: a race-enabled helper would otherwise linger a second at exit.
	launcher.Env = append(os.Environ(), launchEnv+"="+mode, "GORACE=atexit_sleep_ms=0")
	launcher.ExtraFiles = []*os.File{cr, rw}
	launcher.Stderr = os.Stderr
	if err := launcher.Run(); err != nil {
		t.Fatalf("launch the target: %v", err)
	}
	cr.Close()
	rw.Close()
	tg := &target{cmds: cw, replies: bufio.NewReader(rr), pidfd: -1}
	t.Cleanup(func() {
		cw.Close()
		rr.Close()
		if tg.pidfd >= 0 {
			unix.PidfdSendSignal(tg.pidfd, unix.SIGKILL, nil, 0)
			fds := []unix.PollFd{{Fd: int32(tg.pidfd), Events: unix.POLLIN}}
			unix.Poll(fds, 5000) // readable once it has exited
			unix.Close(tg.pidfd)
		}
	})
	if _, err := fmt.Sscanf(tg.line(t), "pid %d", &tg.pid); err != nil {
		t.Fatalf("launcher: %v", err)
	}
	if tg.pidfd, err = unix.PidfdOpen(tg.pid, 0); err != nil {
		t.Fatalf("pidfd of the target: %v", err)
	}
	if _, err := fmt.Sscanf(tg.line(t), "ready name=%v", &tg.name); err != nil {
		t.Fatalf("target: %v", err)
	}
	return tg
}

// line reads one reply of the target, failing the test after 10 s.
func (tg *target) line(t testing.TB) string {
	t.Helper()
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := tg.replies.ReadString('\n')
		ch <- res{strings.TrimSpace(s), err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("target: %v (after %q)", r.err, r.s)
		}
		return r.s
	case <-time.After(10 * time.Second):
		t.Fatal("target: no answer within 10 s")
		return ""
	}
}

// send writes a command to the target.
func (tg *target) send(t testing.TB, cmd string) {
	t.Helper()
	if _, err := fmt.Fprintln(tg.cmds, cmd); err != nil {
		t.Fatalf("target: %v", err)
	}
}

// ping checks that the target's main thread still answers, and returns the
// number of SIGUSR1 it has taken.
func (tg *target) ping(t testing.TB, n int) int {
	t.Helper()
	tg.send(t, "ping "+strconv.Itoa(n))
	var got, signals int
	if _, err := fmt.Sscanf(tg.line(t), "pong %d signals %d", &got, &signals); err != nil || got != n {
		t.Fatalf("ping %d: answered pong %d, %v", n, got, err)
	}
	return signals
}

// fdLink returns what /proc/PID/fd/FD of the target links to, "" when the
// fd is not open.
func (tg *target) fdLink(fd uintptr) string {
	l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", tg.pid, fd))
	if err != nil {
		return ""
	}
	return l
}

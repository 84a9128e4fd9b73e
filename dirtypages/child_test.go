package dirtypages

import (
	"bufio"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inGuest is set when the test binary runs inside the test guest (see
// TestSoftDirtyInGuest): there the kernel tracks soft-dirty pages, so the
// soft-dirty tests must run and fail rather than skip.
var inGuest = flag.Bool("dirtypages.in-guest", false, "the tests run inside the test guest, whose kernel has CONFIG_MEM_SOFT_DIRTY=y")

// childEnv, set in the environment, turns the test binary into the helper
// process of startChild.
const childEnv = "DIRTYPAGES_TEST_CHILD"

// launchEnv, set in the environment to a file name, turns the test binary
// into a launcher: it starts the command its arguments name, with its own
// standard files and fd 3 when open, writes the command's pid to the file
// and exits without waiting. The command is then no child of the test
// (which the uffd tracker's ptrace needs).
const launchEnv = "DIRTYPAGES_TEST_LAUNCH"

func TestMain(m *testing.M) {
	if pidFile := os.Getenv(launchEnv); pidFile != "" {
		os.Exit(launchMain(pidFile, os.Args[1:]))
	}
	if size := os.Getenv(childEnv); size != "" {
		os.Exit(childMain(size))
	}
	os.Exit(m.Run())
}

func launchMain(pidFile string, argv []string) int {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, launchEnv+"=") })
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if _, err := unix.FcntlInt(3, unix.F_GETFD, 0); err == nil {
		cmd.ExtraFiles = []*os.File{os.NewFile(3, "fd3")}
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "launch:", err)
		return 2
	}
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "launch:", err)
		return 2
	}
	return 0
}

// launch starts argv through the launcher, with stdin, stdout, stderr and
// extra (fd 3; nil for none, /dev/null for the others), and returns its pid and a pidfd of it. The process is no
// child of the test; cleanup kills it (SIGKILL) unless it has exited, and
// waits until it has.
func launch(t testing.TB, argv []string, env []string, stdin, stdout, stderr, extra *os.File) (pid, pidfd int) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(t.TempDir(), "pid")
	cmd := exec.Command(exe, argv...)
	// GORACE: a race-enabled helper would otherwise linger a second at exit.
	cmd.Env = append(append(os.Environ(), env...), launchEnv+"="+pidFile, "GORACE=atexit_sleep_ms=0")
	for _, std := range []struct {
		f   *os.File
		dst *io.Writer
	}{{stdout, &cmd.Stdout}, {stderr, &cmd.Stderr}} {
		if std.f != nil {
			*std.dst = std.f
		}
	}
	if stdin != nil {
		cmd.Stdin = stdin
	}
	if extra != nil {
		cmd.ExtraFiles = []*os.File{extra}
	}
	if err := cmd.Run(); err != nil {
		t.Fatalf("launch %s: %v", argv[0], err)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	if pid, err = strconv.Atoi(string(b)); err != nil {
		t.Fatal(err)
	}
	if pidfd, err = unix.PidfdOpen(pid, 0); err != nil {
		t.Fatalf("pidfd of %s: %v", argv[0], err)
	}
	t.Cleanup(func() {
		defer unix.Close(pidfd)
		if !waitExit(pidfd, 5*time.Second) {
			unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
			waitExit(pidfd, 10*time.Second)
		}
	})
	return pid, pidfd
}

// waitExit waits up to d for the process of pidfd to exit.
func waitExit(pidfd int, d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, int(d.Milliseconds()))
	return err == nil && n == 1
}

// childMain is the helper process: it maps the memory passed as fd 3
// shared, prints "ready ADDR" and then obeys lines on stdin, answering each
// with "ok", or "error: " and why when a system call failed:
//
//	w GEN P...   store GEN in a word of each page P (a content change)
//	s P...       store back the word a page holds (a write, no change)
//	l            lock the whole mapping in memory (mlock)
//	p P...       reclaim each page P (madvise MADV_PAGEOUT): unmap it and
//	             write it out, as memory pressure would
//	k P...       have the kernel write 8 random bytes into each page P
//	             (read(2) from /dev/urandom): a content change that is
//	             no write of the process's own
//
// It exits when stdin closes. It runs on one thread pinned to one CPU: a
// page it writes first sits in that CPU's batch of pages waiting for the
// LRU lists, which only that CPU's madvise(MADV_PAGEOUT) drains, and a
// page off the lists is not reclaimed.
func childMain(sizeStr string) int {
	runtime.LockOSThread()
	if err := pinToOneCPU(); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	size, err := strconv.Atoi(sizeStr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: size:", err)
		return 2
	}
	mem, err := unix.Mmap(3, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: mmap:", err)
		return 2
	}
	unix.Close(3)
	random, err := os.Open("/dev/urandom")
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	fmt.Printf("ready %#x %d\n", addrOf(mem), os.Getpid())
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 0, 1<<20), 1<<24)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		var gen uint64
		args := f[1:]
		var callErr error
		if f[0] == "l" {
			callErr = unix.Mlock(mem)
		}
		if f[0] == "w" || f[0] == "k" {
			if gen, err = strconv.ParseUint(args[0], 10, 64); err != nil {
				fmt.Fprintln(os.Stderr, "child:", err)
				return 2
			}
			args = args[1:]
		}
		for _, a := range args {
			p, err := strconv.Atoi(a)
			if err != nil || p < 0 || p >= size/PageSize {
				fmt.Fprintf(os.Stderr, "child: bad page %q\n", a)
				return 2
			}
			w := word(mem, p*PageSize+int(gen%(PageSize/8))*8)
			switch f[0] {
			case "w":
				atomic.StoreUint64(w, gen)
			case "s":
				atomic.StoreUint64(w, atomic.LoadUint64(w))
			case "k":
				if _, err := random.Read(mem[p*PageSize+int(gen%(PageSize/8))*8:][:8]); err != nil && callErr == nil {
					callErr = fmt.Errorf("read into page %d: %w", p, err)
				}
			case "p":
				if err := unix.Madvise(mem[p*PageSize:(p+1)*PageSize], unix.MADV_PAGEOUT); err != nil && callErr == nil {
					callErr = fmt.Errorf("madvise(MADV_PAGEOUT) of page %d: %w", p, err)
				}
			}
		}
		if callErr != nil {
			fmt.Println("error:", callErr)
			continue
		}
		fmt.Println("ok")
	}
	return 0
}

// pinToOneCPU binds the calling thread to the first CPU it may run on.
func pinToOneCPU() error {
	var allowed, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &allowed); err != nil {
		return fmt.Errorf("sched_getaffinity: %w", err)
	}
	for cpu := 0; cpu < len(allowed)*64; cpu++ {
		if allowed.IsSet(cpu) {
			one.Set(cpu)
			if err := unix.SchedSetaffinity(0, &one); err != nil {
				return fmt.Errorf("sched_setaffinity to CPU %d: %w", cpu, err)
			}
			return nil
		}
	}
	return errors.New("sched_getaffinity: no CPU allowed")
}

// child is a running helper process.
type child struct {
	cmd  *exec.Cmd // nil for a detached child
	pid  int
	in   io.WriteCloser
	out  *bufio.Reader
	addr uintptr
	gen  uint64
}

// startChild starts the helper process on the memory of f (size bytes) and
// waits for it to map it. Cleanup closes its stdin and waits for it.
func startChild(t *testing.T, f *os.File, size int) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	// GORACE: a race-enabled helper would otherwise linger a second at exit.
	cmd.Env = append(os.Environ(), childEnv+"="+strconv.Itoa(size), "GORACE=atexit_sleep_ms=0")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start helper process: %v", err)
	}
	c := &child{cmd: cmd, in: in, out: bufio.NewReader(outPipe), gen: 1 << 32}
	t.Cleanup(func() {
		c.in.Close()
		if err := c.cmd.Wait(); err != nil {
			t.Errorf("helper process: %v", err)
		}
	})
	c.ready(t)
	return c
}

// ready reads the child's first line: where it mapped the memory, and its
// pid.
func (c *child) ready(t testing.TB) {
	t.Helper()
	line, err := c.out.ReadString('\n')
	if err != nil {
		t.Fatalf("helper process did not start: %v", err)
	}
	if _, err := fmt.Sscanf(line, "ready %v %d", &c.addr, &c.pid); err != nil {
		t.Fatalf("helper process said %q: %v", line, err)
	}
}

// startDetachedChild is startChild for a helper process that is no child
// of the test (see launch). Cleanup closes its stdin and waits for it to
// exit.
func startDetachedChild(t *testing.T, f *os.File, size int) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	c := &child{in: inW, out: bufio.NewReader(outR), gen: 1 << 32}
	launch(t, []string{exe, "-test.run=^$"}, []string{childEnv + "=" + strconv.Itoa(size)}, inR, outW, os.Stderr, f)
	// Runs before launch's cleanup, which waits for the child to exit.
	t.Cleanup(func() { inW.Close(); outR.Close() })
	inR.Close()
	outW.Close()
	c.ready(t)
	return c
}

// call sends one command and returns the error the child answered with,
// nil for "ok".
func (c *child) call(t *testing.T, cmd string, pages []int) error {
	t.Helper()
	var b strings.Builder
	b.WriteString(cmd)
	for _, p := range pages {
		b.WriteString(" " + strconv.Itoa(p))
	}
	b.WriteByte('\n')
	if _, err := io.WriteString(c.in, b.String()); err != nil {
		t.Fatalf("helper process: %v", err)
	}
	line, err := c.out.ReadString('\n')
	if err != nil {
		t.Fatalf("helper process answered %q, %v", line, err)
	}
	if line == "ok\n" {
		return nil
	}
	if msg, ok := strings.CutPrefix(line, "error: "); ok {
		return errors.New(strings.TrimSpace(msg))
	}
	t.Fatalf("helper process answered %q", line)
	return nil
}

// do sends one command and waits for its "ok".
func (c *child) do(t *testing.T, cmd string, pages []int) {
	t.Helper()
	if err := c.call(t, cmd, pages); err != nil {
		t.Fatalf("helper process: %s: %v", cmd, err)
	}
}

// lock makes the child lock its mapping in memory, as QEMU's -overcommit
// mem-lock=on does.
func (c *child) lock(t *testing.T) {
	t.Helper()
	c.do(t, "l", nil)
}

// pageOut makes the child reclaim pages, and returns the error of the
// first that could not be.
func (c *child) pageOut(t *testing.T, pages ...int) error {
	t.Helper()
	return c.call(t, "p", pages)
}

// write makes the child change the content of pages.
func (c *child) write(t *testing.T, pages ...int) {
	t.Helper()
	c.gen++
	c.do(t, "w "+strconv.FormatUint(c.gen, 10), pages)
}

// kernelWrite makes the kernel write into pages for the child (read(2)).
func (c *child) kernelWrite(t *testing.T, pages ...int) {
	t.Helper()
	c.gen++
	c.do(t, "k "+strconv.FormatUint(c.gen, 10), pages)
}

// rewrite makes the child write to pages the values they hold.
func (c *child) rewrite(t *testing.T, pages ...int) {
	t.Helper()
	c.do(t, "s", pages)
}

// childMemory is the memory shared with a helper process, and the name
// FindMapping knows it by.
func childMemory(t *testing.T, backing string, size int) (*os.File, string) {
	t.Helper()
	if backing == "memfd" {
		name := "dirtypages-child-" + strconv.Itoa(os.Getpid())
		return newMemfd(t, name, size), name
	}
	f := newRAMFile(t, size)
	return f, f.Name()
}

// TestFindMappingOfChild finds the helper process's mapping of a memfd and
// of a file, as the agent finds QEMU's.
func TestFindMappingOfChild(t *testing.T) {
	const size = 64 * PageSize
	for _, backing := range []string{"memfd", "file"} {
		t.Run(backing, func(t *testing.T) {
			f, name := childMemory(t, backing, size)
			c := startChild(t, f, size)
			m, err := FindMapping(c.cmd.Process.Pid, name)
			if err != nil {
				t.Fatal(err)
			}
			if m.Start != c.addr || m.Len() != size || m.Offset != 0 || m.Perms != "rw-s" {
				t.Fatalf("found %v; the child mapped %d bytes at %#x", m, size, c.addr)
			}
		})
	}
}

// TestSoftDirtyTracksChild tracks a helper process's writes to shared
// memory with the soft-dirty tracker, as the agent tracks QEMU, and checks
// the compare tracker on the same memory against it: soft-dirty must report
// exactly the pages written, compare exactly the pages whose content
// changed. It needs a kernel with CONFIG_MEM_SOFT_DIRTY=y; TestSoftDirtyInGuest
// runs it inside the test guest, which has one.
func TestSoftDirtyTracksChild(t *testing.T) {
	requireSoftDirty(t)
	for _, backing := range []string{"memfd", "file"} {
		t.Run(backing, func(t *testing.T) { testSoftDirtyTracksChild(t, backing) })
	}
}

func testSoftDirtyTracksChild(t *testing.T, backing string) {
	const n = 4096 + 100 // pages: 16 MiB and a partial bitmap word
	size := n * PageSize
	f, name := childMemory(t, backing, size)
	c := startChild(t, f, size)
	pid := c.cmd.Process.Pid

	m, err := FindMapping(pid, name)
	if err != nil {
		t.Fatal(err)
	}
	if m.Start != c.addr || m.Len() != uintptr(size) {
		t.Fatalf("found %v; the child mapped %d bytes at %#x", m, size, c.addr)
	}
	c.lock(t) // NewSoftDirty refuses RAM that reclaim could take
	// Small batches, so one harvest takes several reads on both workers.
	sd, err := NewSoftDirty(pid, m, Options{Workers: 2, BatchPages: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer sd.Close()
	cmp, err := NewCompare(mapShared(t, f, size), Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer cmp.Close()

	// Some pages hold data before tracking starts.
	c.write(t, 1, 2, 3, 1000)
	wantSet(t, "first soft-dirty harvest", harvest(t, sd), NewFullSet(n))
	wantSet(t, "first compare harvest", harvest(t, cmp), NewFullSet(n))

	rng := rand.New(rand.NewPCG(42, 0))
	randomPages := func(k int) []int {
		out := make([]int, k)
		for i := range out {
			out[i] = rng.IntN(n)
		}
		return out
	}
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	for _, round := range []struct {
		name    string
		written []int // content changed
		same    []int // written with the value they hold
	}{
		{name: "quiet"},
		{name: "first page", written: []int{0}},
		{name: "last page", written: []int{n - 1}},
		{name: "word boundaries", written: []int{60, 61, 62, 63, 64, 65, 127, 128, 1023, 1024, 1025}},
		{name: "random", written: randomPages(300)},
		{name: "quiet again"},
		{name: "same values", written: []int{8}, same: []int{5, 6, 7, 1000}},
		{name: "every page", written: all},
		{name: "random after all", written: randomPages(50), same: randomPages(20)},
	} {
		if len(round.written) > 0 {
			c.write(t, round.written...)
		}
		if len(round.same) > 0 {
			c.rewrite(t, round.same...)
		}
		gotSD := harvest(t, sd)
		gotCmp := harvest(t, cmp)
		changed := setOf(n, round.written...)
		writes := changed.Clone()
		writes.Union(setOf(n, round.same...))
		wantSet(t, round.name+": soft-dirty", gotSD, writes)
		wantSet(t, round.name+": compare", gotCmp, changed)
		// Every change is a write: compare never reports a page that
		// soft-dirty missed.
		both := gotSD.Clone()
		both.Union(gotCmp)
		wantSet(t, round.name+": compare within soft-dirty", both, gotSD)
		t.Logf("%s: soft-dirty %d pages, compare %d pages", round.name, gotSD.Count(), gotCmp.Count())
	}
}

// TestSoftDirtyLockCheckOfChild runs the lock check on a real process's
// smaps: the helper process's mapping of guest RAM is refused until it
// locks it (mlock, as QEMU's -overcommit mem-lock=on does). It needs no
// soft-dirty support, so it runs on any kernel.
func TestSoftDirtyLockCheckOfChild(t *testing.T) {
	const size = 64 * PageSize
	for _, backing := range []string{"memfd", "file"} {
		t.Run(backing, func(t *testing.T) {
			f, name := childMemory(t, backing, size)
			c := startChild(t, f, size)
			pid := c.cmd.Process.Pid
			m, err := FindMapping(pid, name)
			if err != nil {
				t.Fatal(err)
			}
			track := func() error {
				src, err := openProc(pid)
				if err != nil {
					t.Fatal(err)
				}
				sd, err := newLockedSoftDirty(pid, m, src, Options{})
				if err != nil {
					src.Close()
					return err
				}
				return sd.Close()
			}
			err = track()
			if !errors.Is(err, ErrRAMNotLocked) || !strings.Contains(err.Error(), "-overcommit mem-lock=on") {
				t.Fatalf("unlocked mapping: %v", err)
			}
			t.Logf("unlocked: %v", err)
			c.lock(t)
			if err := track(); err != nil {
				t.Fatalf("locked mapping refused: %v", err)
			}
		})
	}
}

// TestSoftDirtyReportsReclaimedPageOfChild reclaims pages of the helper
// process's mapping (madvise MADV_PAGEOUT on a memfd: the kernel unmaps the
// page, and with it goes its soft-dirty bit, even where no swap takes the
// page out of memory), with the lock check bypassed: the pages written and
// reclaimed between two harvests are reported, those written and left are
// reported through their soft-dirty bit where the kernel tracks them. Once
// the child locks its mapping, the kernel refuses to reclaim it. Without
// soft-dirty support (this host) only the reclaimed pages are reported.
func TestSoftDirtyReportsReclaimedPageOfChild(t *testing.T) {
	const n = 256
	f, name := childMemory(t, "memfd", n*PageSize)
	c := startChild(t, f, n*PageSize)
	pid := c.cmd.Process.Pid
	m, err := FindMapping(pid, name)
	if err != nil {
		t.Fatal(err)
	}
	src, err := openProc(pid)
	if err != nil {
		t.Fatal(err)
	}
	sd, err := newSoftDirty(pid, m, src, Options{Workers: 2, BatchPages: 64})
	if err != nil {
		src.Close()
		t.Fatal(err)
	}
	defer sd.Close()
	tracks := SoftDirtySupported() == nil
	if *inGuest && !tracks {
		t.Fatal("in the test guest, whose kernel has CONFIG_MEM_SOFT_DIRTY=y, soft-dirty tracking does not work")
	}

	c.write(t, 10, 11, 12, 100, 200)
	wantSet(t, "first harvest", harvest(t, sd), NewFullSet(n))
	c.write(t, 10, 11, 100)
	present := func(p int) bool {
		var e [8]byte
		if _, err := src.ReadAt(e[:], int64(m.Start/PageSize+uintptr(p))*8); err != nil {
			t.Fatal(err)
		}
		return binary.NativeEndian.Uint64(e[:])>>pmPresent&1 != 0
	}
	// MADV_PAGEOUT is advice: the kernel skips a page it cannot isolate at
	// that moment (one another CPU still holds in a batch, say), so ask
	// again until each is out, as repeated memory pressure would.
	for try, left := 1, []int{10, 12, 100}; len(left) > 0; try++ {
		if err := c.pageOut(t, left...); err != nil {
			t.Fatalf("reclaim: %v", err)
		}
		left = slices.DeleteFunc(left, func(p int) bool { return !present(p) })
		if len(left) > 0 && try == 50 {
			t.Fatalf("pages %v still mapped after %d MADV_PAGEOUT calls", left, try)
		}
		if len(left) > 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	want := setOf(n, 10, 12, 100) // written or not, reclaimed
	if tracks {
		want.Add(11) // written and left
	}
	wantSet(t, "after reclaim", harvest(t, sd), want)
	wantSet(t, "still reclaimed", harvest(t, sd), NewSet(n))

	// Locked, the pages cannot be reclaimed: the check NewSoftDirty makes
	// covers what the harvest cannot see (a page mapped in, written and
	// reclaimed between two harvests).
	c.lock(t)
	c.write(t, 10, 200)
	if err := c.pageOut(t, 10, 200); err == nil {
		t.Log("MADV_PAGEOUT of locked pages succeeded")
	}
	for _, p := range []int{10, 200} {
		if !present(p) {
			t.Fatalf("locked page %d was reclaimed", p)
		}
	}
	want = NewSet(n)
	if tracks {
		want = setOf(n, 10, 200)
	}
	wantSet(t, "locked", harvest(t, sd), want)
}

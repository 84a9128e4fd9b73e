// Package testguest boots the test guest (package testvm) from tests: it
// skips with a clear message when QEMU or the guest kernel is missing, builds
// the initramfs once per test binary, and always kills QEMU at cleanup.
package testguest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/testvm"
)

// BootTimeout bounds a boot to the ready line. Under TCG the guest is ready
// in about 5 s; the race detector and a busy machine can make it slower.
const BootTimeout = 2 * time.Minute

var (
	imageOnce sync.Once
	image     testvm.Image
	imageErr  error
)

// Image returns the test guest image, building it on first use. It skips the
// test when no guest kernel has been unpacked.
func Image(t testing.TB) testvm.Image {
	t.Helper()
	k, err := testvm.FindKernel()
	if errors.Is(err, testvm.ErrNoKernel) {
		t.Skipf("needs the guest kernel: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	imageOnce.Do(func() {
		dir, err := imageDir()
		if err != nil {
			imageErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		image, imageErr = testvm.BuildImage(ctx, k, dir, nil, nil)
	})
	if imageErr != nil {
		t.Fatalf("build guest image: %v", imageErr)
	}
	return image
}

// imageDir returns an empty directory for this test binary's image,
// remus-testguest-PID under the temporary directory. A test binary cannot
// remove its image when its last test ends, so the directories of binaries
// that are gone are removed here instead.
func imageDir() (string, error) {
	stale, _ := filepath.Glob(filepath.Join(os.TempDir(), "remus-testguest-*"))
	for _, d := range stale {
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "remus-testguest-"))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			os.RemoveAll(d)
		}
	}
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("remus-testguest-%d", os.Getpid()))
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	return dir, os.Mkdir(dir, 0o755)
}

// Config returns a guest configuration with files in a fresh temporary
// directory: RAM in a file there, one QMP socket, the serial log, and the
// given QEMU. The caller adds a NIC, a disk and guest settings.
func Config(t testing.TB) testvm.Config {
	t.Helper()
	qemu := testenv.RequireQEMU(t)
	accel, err := testvm.ChooseAccel(context.Background(), qemu, "")
	if err != nil {
		t.Fatal(err)
	}
	img := Image(t)
	dir := t.TempDir()
	return testvm.Config{
		QEMU:      qemu,
		Accel:     accel.Accel,
		MemoryMiB: 256,
		RAM:       testvm.RAMFile,
		RAMPath:   filepath.Join(dir, "guest.ram"),
		Kernel:    img.Kernel.Image,
		Initrd:    img.Initrd,
		QMP:       []string{filepath.Join(dir, "qmp.sock")},
		SerialLog: filepath.Join(dir, "console.log"),
	}
}

// Launch starts QEMU for c and registers cleanup that kills it (and logs
// the console when the test failed). It does not wait for the guest.
func Launch(t testing.TB, c testvm.Config) *testvm.VM {
	t.Helper()
	vm, err := testvm.Start(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vm.Close()
		if t.Failed() {
			t.Logf("guest console:\n%s", vm.Console())
		}
	})
	return vm
}

// WaitReady waits up to BootTimeout for the guest's ready line.
func WaitReady(t testing.TB, vm *testvm.VM) testvm.Ready {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), BootTimeout)
	defer cancel()
	ready, err := vm.WaitReady(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return ready
}

// Start launches c and waits for the guest's ready line.
func Start(t testing.TB, c testvm.Config) (*testvm.VM, testvm.Ready) {
	t.Helper()
	vm := Launch(t, c)
	return vm, WaitReady(t, vm)
}

// InGuest describes a package's tests to run inside the test guest, whose
// Debian kernel has what this machine's may lack (soft-dirty bits, the plug
// qdisc, ...).
type InGuest struct {
	Package string   // import path relative to the module root, e.g. "./dirtypages"
	Run     string   // -test.run pattern
	Pass    []string // tests (and subtests) that must report PASS
	Modules []string // kernel modules to load in the guest besides the usual ones
	Args    []string // more arguments for the test binary, e.g. its in-guest flag
}

// RunInGuest builds the package's test binary statically, puts it in the
// test guest's initramfs, boots the guest with it as the program to run
// (remus.exec) and checks on the console that it exited 0, that every test
// in Pass passed and that none skipped or failed. It returns the console.
func RunInGuest(t *testing.T, g InGuest) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and boots the test guest; skipped in -short mode")
	}
	qemu := testenv.RequireQEMU(t)
	kernel, err := testvm.FindKernel()
	if errors.Is(err, testvm.ErrNoKernel) {
		t.Skipf("needs the guest kernel: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	root, err := testvm.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()

	bin := filepath.Join(dir, "pkg.test")
	build := exec.CommandContext(ctx, "go", "test", "-c", "-trimpath", "-o", bin, g.Package)
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the test binary of %s: %v\n%s", g.Package, err, out)
	}
	const guestBin = "/bin/pkg.test"
	img, err := testvm.BuildImage(ctx, kernel, dir, g.Modules, map[string]string{guestBin: bin})
	if err != nil {
		t.Fatalf("build the guest image: %v", err)
	}
	cfg := testvm.Config{
		QEMU: qemu, MemoryMiB: 256, RAM: testvm.RAMFile, RAMPath: filepath.Join(dir, "guest.ram"),
		Kernel: img.Kernel.Image, Initrd: img.Initrd,
		QMP: []string{filepath.Join(dir, "qmp.sock")}, SerialLog: filepath.Join(dir, "console.log"),
		Guest: testvm.Guest{
			Exec:     guestBin,
			ExecArgs: append([]string{"-test.run=" + g.Run, "-test.v", "-test.timeout=5m"}, g.Args...),
		},
	}
	start := time.Now()
	vm, err := testvm.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	line, err := vm.WaitConsole(ctx, "remus-guest: exit status")
	if err != nil {
		t.Fatal(err)
	}
	console := strings.ReplaceAll(vm.Console(), "\r", "")
	if line != "remus-guest: exit status 0" {
		t.Fatalf("the tests in the guest failed (%s); console:\n%s", line, console)
	}
	for _, name := range g.Pass {
		if !regexp.MustCompile(`(?m)^\s*--- PASS: ` + regexp.QuoteMeta(name) + ` \(`).MatchString(console) {
			t.Errorf("no PASS line for %s on the guest console", name)
		}
	}
	if strings.Contains(console, "--- SKIP") || strings.Contains(console, "--- FAIL") {
		t.Errorf("a test in the guest skipped or failed")
	}
	if t.Failed() {
		t.Fatalf("console:\n%s", console)
	}
	t.Logf("guest booted, ran the tests and reported in %v (accelerator %s)", time.Since(start).Round(time.Millisecond), vm.Config.Accel)
	return console
}

// Package testguest boots the test guest (package testvm) from tests: it
// skips with a clear message when QEMU or the guest kernel is missing, builds
// the initramfs once per test binary, and always kills QEMU at cleanup.
package testguest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
	img := Image(t)
	dir := t.TempDir()
	return testvm.Config{
		QEMU:      qemu,
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

package dirtypages

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/testvm"
)

// guestTests are the tests TestSoftDirtyInGuest runs inside the guest, and
// the PASS lines it expects from them.
var guestTests = struct {
	run  string
	pass []string
}{
	run: "^(TestSoftDirtySupported|TestPagemapReadPathOwn|TestSoftDirtyTracksChild)$",
	pass: []string{
		"TestSoftDirtySupported",
		"TestPagemapReadPathOwn",
		"TestSoftDirtyTracksChild/memfd",
		"TestSoftDirtyTracksChild/file",
		"TestSoftDirtyTracksChild",
	},
}

// TestSoftDirtyInGuest runs the soft-dirty tests against a kernel that has
// CONFIG_MEM_SOFT_DIRTY=y: it builds this package's test binary statically,
// puts it in the test guest's initramfs, boots the guest with the binary as
// the program to run (remus.exec), and checks on the console that the
// tests passed. Inside the guest the -dirtypages.in-guest flag makes them
// fail rather than skip when soft-dirty tracking does not work.
func TestSoftDirtyInGuest(t *testing.T) {
	if *inGuest {
		t.Skip("already inside the test guest")
	}
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

	bin := filepath.Join(dir, "dirtypages.test")
	build := exec.CommandContext(ctx, "go", "test", "-c", "-trimpath", "-o", bin, "./dirtypages")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the test binary: %v\n%s", err, out)
	}
	const guestBin = "/bin/dirtypages.test"
	img, err := testvm.BuildImage(ctx, kernel, dir, nil, map[string]string{guestBin: bin})
	if err != nil {
		t.Fatalf("build the guest image: %v", err)
	}

	cfg := testvm.Config{
		QEMU:      qemu,
		MemoryMiB: 256,
		RAM:       testvm.RAMFile,
		RAMPath:   filepath.Join(dir, "guest.ram"),
		Kernel:    img.Kernel.Image,
		Initrd:    img.Initrd,
		QMP:       []string{filepath.Join(dir, "qmp.sock")},
		SerialLog: filepath.Join(dir, "console.log"),
		Guest: testvm.Guest{
			Exec:     guestBin,
			ExecArgs: []string{"-test.run=" + guestTests.run, "-test.v", "-test.timeout=5m", "-dirtypages.in-guest"},
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
	elapsed := time.Since(start)
	console := strings.ReplaceAll(vm.Console(), "\r", "")
	if line != "remus-guest: exit status 0" {
		t.Fatalf("the tests in the guest failed (%s); console:\n%s", line, console)
	}
	for _, name := range guestTests.pass {
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
	for _, l := range strings.Split(console, "\n") {
		if strings.Contains(l, "--- PASS") || strings.Contains(l, "SoftDirtySupported() =") {
			t.Log("guest: " + strings.TrimSpace(l))
		}
	}
	t.Logf("guest booted, ran the tests and reported in %v (accelerator %s)", elapsed.Round(time.Millisecond), vm.Config.Accel)
}

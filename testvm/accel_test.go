package testvm_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/testvm"
)

// fakeQEMU writes a stand-in for qemu-system-x86_64 that records each run
// in runs.log and then behaves as told when started with -accel kvm:
//
//	abort  print QEMU's MSR error and assertion, then die of SIGABRT (a
//	       /dev/kvm that opens but cannot run guests)
//	hang   print nothing and never boot (-cpu qemu64 on the same hosts)
//	boot   write the firmware's end-of-self-test line to the debug console
//	       and keep running, as QEMU does
func fakeQEMU(t *testing.T, underKVM string) (qemu, runs string) {
	t.Helper()
	dir := t.TempDir()
	qemu, runs = filepath.Join(dir, "qemu-system-x86_64"), filepath.Join(dir, "runs.log")
	script := `#!/bin/sh
echo "$*" >> ` + runs + `
fw=
for a in "$@"; do
	case "$a" in *id=fw,path=*) fw="${a#*path=}" ;; esac
done
case "$*" in
*"-accel kvm"*) mode=` + underKVM + ` ;;
*) mode=boot ;;
esac
case $mode in
abort)
	echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69" >&2
	echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion 'ret == cpu->kvm_msr_buf->nmsrs' failed." >&2
	kill -ABRT $$ ;;
hang)
	exec sleep 60 ;;
boot)
	printf 'SeaBIOS (version fake)\nBooting from Floppy...\nNo bootable device.\n' > "$fw"
	exec sleep 60 ;;
esac
`
	if err := os.WriteFile(qemu, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return qemu, runs
}

// fakeKVMDevice is a file that opens for reading and writing, as /dev/kvm
// does on the hosts this probe is for.
func fakeKVMDevice(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kvm")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAccelProbe(t *testing.T) {
	for _, tc := range []struct {
		name, underKVM string
		noDevice       bool
		want           string
		reason         []string // each must appear in the reason
		notInReason    []string
		qemuRuns       int
	}{
		{name: "KVM works", underKVM: "boot", want: testvm.AccelKVM, reason: []string{"under KVM"}, qemuRuns: 1},
		{name: "QEMU aborts under KVM", underKVM: "abort", want: testvm.AccelTCG,
			reason:      []string{"KVM is present but QEMU cannot run a guest under it", "failed to set MSR 0x10a to 0x69", "signal: aborted"},
			notInReason: []string{"Assertion"}, qemuRuns: 1},
		{name: "QEMU hangs under KVM", underKVM: "hang", want: testvm.AccelTCG,
			reason: []string{"KVM is present but QEMU cannot run a guest under it", "did not finish within"}, qemuRuns: 1},
		{name: "no KVM device", underKVM: "boot", noDevice: true, want: testvm.AccelTCG, reason: []string{"no ", "on this host"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			qemu, runs := fakeQEMU(t, tc.underKVM)
			dev := fakeKVMDevice(t)
			if tc.noDevice {
				dev = filepath.Join(t.TempDir(), "no-kvm")
			}
			start := time.Now()
			c := testvm.AccelProbe{QEMU: qemu, KVMDevice: dev, Timeout: time.Second}.Run(context.Background())
			if c.Accel != tc.want {
				t.Fatalf("chose %s, want %s (reason: %s)", c.Accel, tc.want, c.Reason)
			}
			for _, s := range tc.reason {
				if !strings.Contains(c.Reason, s) {
					t.Errorf("reason %q lacks %q", c.Reason, s)
				}
			}
			for _, s := range tc.notInReason {
				if strings.Contains(c.Reason, s) {
					t.Errorf("reason %q contains %q", c.Reason, s)
				}
			}
			if got := countLines(t, runs); got != tc.qemuRuns {
				t.Errorf("QEMU ran %d times, want %d", got, tc.qemuRuns)
			}
			if tc.underKVM == "abort" && time.Since(start) > 900*time.Millisecond {
				t.Errorf("an abort took %v to be noticed: the probe waited for its timeout", time.Since(start))
			}
		})
	}
}

func countLines(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

func TestChooseAccel(t *testing.T) {
	t.Setenv(testvm.AccelEnv, "")
	defer testvm.SetKVMDevice(fakeKVMDevice(t))()
	ctx := context.Background()

	t.Run("auto falls back to TCG with QEMU's error, probing once", func(t *testing.T) {
		qemu, runs := fakeQEMU(t, "abort")
		for i := 0; i < 3; i++ {
			c, err := testvm.ChooseAccel(ctx, qemu, "auto")
			if err != nil || c.Accel != testvm.AccelTCG || !c.Fallback() || !strings.Contains(c.Reason, "MSR 0x10a") {
				t.Fatalf("ChooseAccel = %+v, %v; want TCG for QEMU's MSR error", c, err)
			}
		}
		if n := countLines(t, runs); n != 1 {
			t.Fatalf("probed %d times in one process, want once", n)
		}
	})
	t.Run("auto takes KVM where it works", func(t *testing.T) {
		qemu, _ := fakeQEMU(t, "boot")
		c, err := testvm.ChooseAccel(ctx, qemu, "")
		if err != nil || c.Accel != testvm.AccelKVM || c.Forced || c.Fallback() {
			t.Fatalf("ChooseAccel = %+v, %v; want KVM by the probe", c, err)
		}
	})
	t.Run("forced TCG does not run QEMU", func(t *testing.T) {
		qemu, runs := fakeQEMU(t, "abort")
		c, err := testvm.ChooseAccel(ctx, qemu, "tcg")
		if err != nil || c.Accel != testvm.AccelTCG || !c.Forced {
			t.Fatalf("ChooseAccel = %+v, %v", c, err)
		}
		if n := countLines(t, runs); n != 0 {
			t.Fatalf("QEMU ran %d times", n)
		}
	})
	t.Run("forced KVM that cannot work fails with QEMU's error", func(t *testing.T) {
		qemu, _ := fakeQEMU(t, "abort")
		_, err := testvm.ChooseAccel(ctx, qemu, "kvm")
		if err == nil || !strings.Contains(err.Error(), "failed to set MSR 0x10a to 0x69") || strings.Contains(err.Error(), "Assertion") {
			t.Fatalf("forcing a broken KVM: err = %v", err)
		}
	})
	t.Run("forced KVM that hangs fails instead of hanging", func(t *testing.T) {
		qemu, _ := fakeQEMU(t, "hang")
		ctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		if _, err := testvm.ChooseAccel(ctx, qemu, "kvm"); err == nil || !strings.Contains(err.Error(), "cancelled") {
			t.Fatalf("forcing a hanging KVM: err = %v", err)
		}
	})
	t.Run("the environment overrides the probe", func(t *testing.T) {
		qemu, runs := fakeQEMU(t, "boot")
		t.Setenv(testvm.AccelEnv, "tcg")
		c, err := testvm.ChooseAccel(ctx, qemu, "")
		if err != nil || c.Accel != testvm.AccelTCG || !strings.Contains(c.Reason, testvm.AccelEnv) {
			t.Fatalf("ChooseAccel = %+v, %v", c, err)
		}
		if n := countLines(t, runs); n != 0 {
			t.Fatalf("QEMU ran %d times", n)
		}
	})
	t.Run("an unknown accelerator is refused", func(t *testing.T) {
		if _, err := testvm.ChooseAccel(ctx, "qemu", "hvf"); err == nil {
			t.Fatal("accepted hvf")
		}
	})
}

// TestProbeMarkerWithRealFirmware boots the real QEMU's firmware under TCG:
// the probe's end-of-self-test marker must be what this QEMU's firmware
// prints, or the probe would never choose KVM anywhere.
func TestProbeMarkerWithRealFirmware(t *testing.T) {
	qemu := testenv.RequireQEMU(t)
	if err := testvm.BootFirmware(context.Background(), qemu, testvm.AccelTCG, 30*time.Second); err != nil {
		t.Fatalf("the firmware under TCG: %v", err)
	}
}

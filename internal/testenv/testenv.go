// Package testenv holds the checks that tests use to find what they need on
// the host (root, /dev/net/tun, a QEMU binary, KVM) and to skip with a clear
// message when it is missing. CI installs everything these checks look for,
// so in CI nothing is skipped.
//
// Only tests import it: it imports "testing". What programs need to find
// the same things lives beside them (testvm.FindQEMU for QEMU).
package testenv

import (
	"os"
	"os/exec"
	"testing"

	"github.com/remus-kvm/remus/testvm"
)

// RequireQEMU skips the test when no QEMU system emulator is available
// (testvm.FindQEMU: $REMUS_QEMU, else qemu-system-x86_64 from PATH) and
// returns its path otherwise.
func RequireQEMU(t testing.TB) string {
	t.Helper()
	p, why := testvm.FindQEMU()
	if p == "" {
		t.Skip("needs QEMU: " + why)
	}
	return p
}

// RequireRoot skips the test unless it runs as root (network namespaces, tap
// devices and /proc/PID/clear_refs of another process need it).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces and tap devices); run the tests as root, as `make test` in CI does")
	}
}

// RequireTun skips the test unless it runs as root and /dev/net/tun exists.
func RequireTun(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("needs /dev/net/tun for tap devices: " + err.Error())
	}
}

// RequireIP skips the test when iproute2's `ip` command is missing.
func RequireIP(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("ip")
	if err != nil {
		t.Skip("needs iproute2's `ip` command (run `make setup`)")
	}
	return p
}

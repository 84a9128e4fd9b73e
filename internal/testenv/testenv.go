// Package testenv holds the checks that tests use to find what they need on
// the host (root, /dev/net/tun, a QEMU binary, KVM) and to skip with a clear
// message when it is missing. CI installs everything these checks look for,
// so in CI nothing is skipped.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// QEMUEnv names the environment variable that selects the QEMU system
// emulator used by tests and the demo (for example a QEMU 10.0 build from
// bookworm-backports). Unset, qemu-system-x86_64 is taken from PATH.
const QEMUEnv = "REMUS_QEMU"

// QEMUBinary returns the QEMU system emulator to use, or an empty string and
// the reason when there is none.
func QEMUBinary() (string, string) {
	if p := os.Getenv(QEMUEnv); p != "" {
		if _, err := exec.LookPath(p); err != nil {
			return "", QEMUEnv + "=" + p + " is not an executable: " + err.Error()
		}
		return p, ""
	}
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", "qemu-system-x86_64 is not installed (run `make setup`, or set " + QEMUEnv + ")"
	}
	return p, ""
}

// RequireQEMU skips the test when no QEMU system emulator is available and
// returns its path otherwise.
func RequireQEMU(t testing.TB) string {
	t.Helper()
	p, why := QEMUBinary()
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

package testvm

import (
	"os"
	"os/exec"
)

// QEMUEnv names the environment variable that selects the QEMU system
// emulator the tests, the demo and remusctl bench use (for example a QEMU
// 10.0 build from bookworm-backports). Unset, DefaultQEMU is taken from
// PATH.
const QEMUEnv = "REMUS_QEMU"

// DefaultQEMU is the QEMU system emulator used when none is named.
const DefaultQEMU = "qemu-system-x86_64"

// FindQEMU returns the QEMU system emulator to use, or an empty string and
// the reason when there is none.
func FindQEMU() (path, why string) {
	if p := os.Getenv(QEMUEnv); p != "" {
		if _, err := exec.LookPath(p); err != nil {
			return "", QEMUEnv + "=" + p + " is not an executable: " + err.Error()
		}
		return p, ""
	}
	p, err := exec.LookPath(DefaultQEMU)
	if err != nil {
		return "", DefaultQEMU + " is not installed (run `make setup`, or set " + QEMUEnv + ")"
	}
	return p, ""
}

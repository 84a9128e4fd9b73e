package testvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Accelerators QEMU runs the guest with.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
)

// AccelEnv names the environment variable that overrides the accelerator
// probe: "kvm" or "tcg" ("auto" or unset: probe).
const AccelEnv = "REMUS_ACCEL"

// AccelUsage is the help text of the --accel flag of the commands that boot
// the test guest.
const AccelUsage = "accelerator for the guest: kvm, tcg or auto (auto checks that QEMU can boot a guest under KVM, else uses TCG and says why)"

// DefaultKVMDevice is the KVM device the probe opens.
const DefaultKVMDevice = "/dev/kvm"

// AccelChoice is the accelerator the guest runs under and why.
type AccelChoice struct {
	Accel  string // AccelKVM or AccelTCG
	Forced bool   // chosen by the caller or REMUS_ACCEL, not by the probe
	// Reason says why, in words: the override, the missing device, or the
	// error QEMU gave under KVM.
	Reason string
}

// Fallback reports whether KVM was wanted (the device opens) but did not
// work, so the guest runs under TCG.
func (c AccelChoice) Fallback() bool {
	return c.Accel == AccelTCG && strings.HasPrefix(c.Reason, kvmFailedPrefix)
}

func (c AccelChoice) String() string { return c.Accel + " (" + c.Reason + ")" }

const kvmFailedPrefix = "KVM is present but QEMU cannot run a guest under it"

// firmwareDone is what SeaBIOS, the firmware Debian's QEMU boots, prints on
// its debug console at the end of its power-on self test when it finds
// nothing to boot. Reaching it means the vCPU ran real mode, protected mode,
// PCI and ACPI setup under the accelerator.
const firmwareDone = "No bootable device"

// DefaultProbeTimeout bounds one probe. SeaBIOS reaches firmwareDone in
// about 0.2 s even under TCG; the margin is for a loaded machine. A probe
// that times out falls back to TCG, which is slower but never wrong.
const DefaultProbeTimeout = 10 * time.Second

// AccelProbe finds out whether QEMU can run a guest under KVM on this host:
// not merely whether /dev/kvm opens (a host whose KVM comes from a
// paravirtual hypervisor may open it and still fail every normal guest, for
// example "failed to set MSR 0x10a" and an assertion in QEMU), but whether
// QEMU, with the CPU model the test guest uses (-cpu host), boots its
// firmware to the end of the power-on self test.
type AccelProbe struct {
	QEMU      string        // qemu-system-x86_64 binary; default from PATH
	KVMDevice string        // default DefaultKVMDevice
	Timeout   time.Duration // default DefaultProbeTimeout
}

// Run probes KVM and returns KVM if it works, else TCG with the reason
// (QEMU's own error where QEMU failed). It never returns an error: every
// failure is a reason to use TCG.
func (p AccelProbe) Run(ctx context.Context) AccelChoice {
	if err := p.tryKVM(ctx); err != nil {
		return AccelChoice{Accel: AccelTCG, Reason: err.Error()}
	}
	return AccelChoice{Accel: AccelKVM, Reason: "QEMU booted its firmware under KVM"}
}

// tryKVM returns nil when QEMU ran the firmware to its end under KVM, else
// why not.
func (p AccelProbe) tryKVM(ctx context.Context) error {
	if p.QEMU == "" {
		p.QEMU = DefaultQEMU
	}
	if p.KVMDevice == "" {
		p.KVMDevice = DefaultKVMDevice
	}
	if p.Timeout <= 0 {
		p.Timeout = DefaultProbeTimeout
	}
	f, err := os.OpenFile(p.KVMDevice, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("no %s on this host", p.KVMDevice)
		}
		return fmt.Errorf("%s cannot be used: %w", p.KVMDevice, err)
	}
	f.Close()

	if err := bootFirmware(ctx, p.QEMU, AccelKVM, p.Timeout); err != nil {
		return fmt.Errorf("%s: %w", kvmFailedPrefix, err)
	}
	return nil
}

// bootFirmware runs QEMU's firmware under accel until it reports the end of
// its self test on the debug console, and returns why not otherwise: QEMU's
// own error if it exited, or the time it took too long.
func bootFirmware(ctx context.Context, qemu, accel string, timeout time.Duration) error {
	dir, err := os.MkdirTemp("", "remus-accel-probe-")
	if err != nil {
		return fmt.Errorf("probe directory: %w", err)
	}
	defer os.RemoveAll(dir)
	fw := filepath.Join(dir, "firmware.log")
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.Command(qemu,
		"-accel", accel, "-cpu", cpuModel(accel), "-machine", "q35", "-m", "64",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-chardev", "file,id=fw,path="+fw, "-device", "isa-debugcon,iobase=0x402,chardev=fw")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", qemu, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if firmwareFinished(fw) {
				return nil
			}
			return fmt.Errorf("%s exited (%v): %s", filepath.Base(qemu), err, qemuError(out.String()))
		case <-ctx.Done():
			cmd.Process.Kill()
			<-done
			msg := fmt.Sprintf("its firmware did not finish within %v", timeout)
			if parent.Err() != nil {
				msg = "probe cancelled: " + parent.Err().Error()
			}
			if s := qemuError(out.String()); s != "no message" {
				msg += ": " + s
			}
			return errors.New(msg)
		case <-tick.C:
			if firmwareFinished(fw) {
				cmd.Process.Kill()
				<-done
				return nil
			}
		}
	}
}

func firmwareFinished(path string) bool {
	b, _ := os.ReadFile(path)
	return bytes.Contains(b, []byte(firmwareDone))
}

// qemuError condenses what QEMU printed to its first few lines, without the
// assertion and abort noise that follows its own error message.
func qemuError(s string) string {
	var keep []string
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.Contains(line, "Assertion") || strings.HasPrefix(line, "Aborted") {
			continue
		}
		keep = append(keep, line)
		if len(keep) == 3 {
			break
		}
	}
	if len(keep) == 0 {
		return "no message"
	}
	return strings.Join(keep, "; ")
}

// ChooseAccel decides the accelerator for guests run by qemu. want is
// "kvm", "tcg", or "" / "auto" for the environment's REMUS_ACCEL, then the
// probe. Forcing TCG needs no probe; forcing KVM probes too and fails with
// QEMU's error where KVM cannot run a guest, instead of starting a guest
// that would abort or hang. The probe runs once per process and QEMU
// binary; a fallback to TCG is logged once, with QEMU's error.
func ChooseAccel(ctx context.Context, qemu, want string) (AccelChoice, error) {
	src := "requested"
	if want == "" || want == "auto" {
		want, src = os.Getenv(AccelEnv), AccelEnv
	}
	switch want {
	case "", "auto":
		return probeOnce(ctx, qemu), nil
	case AccelTCG:
		return AccelChoice{Accel: AccelTCG, Forced: true, Reason: src + "=tcg"}, nil
	case AccelKVM:
		c := probeOnce(ctx, qemu)
		if c.Accel != AccelKVM {
			return AccelChoice{}, fmt.Errorf("testvm: %s=kvm, but %s", src, c.Reason)
		}
		return AccelChoice{Accel: AccelKVM, Forced: true, Reason: src + "=kvm; " + c.Reason}, nil
	default:
		return AccelChoice{}, fmt.Errorf("testvm: %s=%q: want kvm, tcg or auto", src, want)
	}
}

// kvmDevice is the device ChooseAccel's probe opens (tests point it at a
// stand-in).
var kvmDevice = DefaultKVMDevice

var probes struct {
	sync.Mutex
	done map[string]AccelChoice // by QEMU binary
}

// probeOnce runs the probe for qemu unless this process has its answer. A
// probe cut short by ctx is not remembered.
func probeOnce(ctx context.Context, qemu string) AccelChoice {
	if qemu == "" {
		qemu = DefaultQEMU
	}
	probes.Lock()
	defer probes.Unlock()
	if c, ok := probes.done[qemu]; ok {
		return c
	}
	c := AccelProbe{QEMU: qemu, KVMDevice: kvmDevice}.Run(ctx)
	if ctx.Err() != nil {
		return c
	}
	if probes.done == nil {
		probes.done = map[string]AccelChoice{}
	}
	probes.done[qemu] = c
	if c.Fallback() {
		slog.Warn("testvm: using TCG: the guest is emulated and runs slower", "reason", c.Reason)
	}
	return c
}

func cpuModel(accel string) string {
	if accel == AccelKVM {
		return "host"
	}
	return "max"
}

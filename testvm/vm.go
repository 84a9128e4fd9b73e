// Package testvm builds and boots the project's test guest: Debian's kernel
// with an initramfs whose /init is a small Go program (testvm/guestinit)
// serving a counter over TCP, optionally persisting it to a virtio disk and
// dirtying memory at a set rate. It runs under QEMU with its RAM in a shared
// backend (a file under /dev/shm, or a memfd), a QMP socket, the serial
// console in a file and its NIC on a -netdev stream socket or a tap, with
// KVM where QEMU can run a guest under it (see ChooseAccel: a /dev/kvm that
// opens is not enough) and TCG otherwise.
//
// Config.Args renders the QEMU command line deterministically, so the backup
// side can start the very same machine again with only the RAM path and
// -incoming changed.
package testvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ReadyPrefix starts the line the guest prints on its console when its
// counter service is listening.
const ReadyPrefix = "remus-guest: ready"

// RAMKind says where the guest's RAM lives.
type RAMKind int

const (
	// RAMFile keeps guest RAM in a file (memory-backend-file, share=on),
	// normally under /dev/shm.
	RAMFile RAMKind = iota
	// RAMMemfd keeps guest RAM in an anonymous memfd (memory-backend-memfd,
	// share=on).
	RAMMemfd
)

// RAMBackendID is the QOM id of the guest RAM backend object.
const RAMBackendID = "ram0"

// NICMode says how the guest's NIC reaches the host.
type NICMode int

const (
	// NICNone gives the guest no network.
	NICNone NICMode = iota
	// NICStream connects the NIC to a unix socket with -netdev stream
	// (4-byte big-endian length, then the Ethernet frame).
	NICStream
	// NICTap attaches the NIC to an existing tap device.
	NICTap
)

// NIC configures the guest's network interface.
type NIC struct {
	Mode NICMode
	// Path of the unix socket (NICStream). With Server false QEMU connects
	// to a listener that must already exist; with Server true QEMU listens.
	Path   string
	Server bool
	Tap    string // tap device name (NICTap)
	MAC    string // defaults to DefaultMAC
}

// DiskNode is the block node name of the guest's disk (Config.Disk), the
// one remusd primary --disk mirrors.
const DiskNode = "disk0"

// DefaultMAC is the guest NIC's address unless NIC.MAC says otherwise.
const DefaultMAC = "52:54:00:12:34:56"

// Guest configures the program inside the guest (kernel command line).
type Guest struct {
	IP           netip.Prefix // static address of the guest NIC
	Port         int          // counter service port; default 7000
	DirtyPerSec  int          // pages dirtied per second; 0 disables
	Work         string       // a workload besides: "compress" (compile-like)
	DirtyMiB     int          // size of the dirtied buffer; default 32
	TickMillis   int          // print a tick line on the console this often; 0 disables
	Exec         string       // run this program instead of the service, then power off
	ExecArgs     []string
	ExtraCmdline []string
}

// Config is one test guest's QEMU configuration.
type Config struct {
	QEMU      string // qemu-system-x86_64 binary; default from PATH
	Name      string // -name; default "remus-testvm"
	MemoryMiB int    // default 256
	CPUs      int    // default 1
	RAM       RAMKind
	RAMPath   string // file backing guest RAM (RAMFile)
	Kernel    string
	Initrd    string
	Guest     Guest
	QMP       []string // unix socket paths; each gets its own QMP monitor
	SerialLog string   // file receiving the serial console
	Disk      string   // raw disk image attached as virtio-blk; empty for none
	NIC       NIC
	// Accel is "kvm" or "tcg". Start fills in an empty one with
	// ChooseAccel's answer; Args needs it set.
	Accel string
	// Incoming, when set, starts QEMU waiting for an incoming migration
	// ("defer" to give the URI later with migrate-incoming).
	Incoming string
	Extra    []string // appended verbatim
}

func (c Config) withDefaults() Config {
	if c.QEMU == "" {
		c.QEMU = DefaultQEMU
	}
	if c.Name == "" {
		c.Name = "remus-testvm"
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = 256
	}
	if c.CPUs == 0 {
		c.CPUs = 1
	}
	if c.Guest.Port == 0 {
		c.Guest.Port = 7000
	}
	if c.NIC.MAC == "" {
		c.NIC.MAC = DefaultMAC
	}
	return c
}

// Validate reports configurations QEMU would reject or that could not be
// protected.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch {
	case c.Kernel == "" || c.Initrd == "":
		return errors.New("testvm: config needs Kernel and Initrd")
	case c.MemoryMiB < 64:
		return fmt.Errorf("testvm: %d MiB of guest RAM is too little (at least 64)", c.MemoryMiB)
	case c.RAM == RAMFile && c.RAMPath == "":
		return errors.New("testvm: RAM in a file needs RAMPath")
	case len(c.QMP) == 0:
		return errors.New("testvm: config needs at least one QMP socket")
	case c.SerialLog == "":
		return errors.New("testvm: config needs SerialLog")
	case c.NIC.Mode == NICStream && c.NIC.Path == "":
		return errors.New("testvm: stream NIC needs a socket path")
	case c.NIC.Mode == NICTap && c.NIC.Tap == "":
		return errors.New("testvm: tap NIC needs a tap name")
	case c.NIC.Mode != NICNone && !c.Guest.IP.IsValid() && c.Guest.Exec == "":
		return errors.New("testvm: a guest with a NIC needs Guest.IP")
	case c.Accel == "":
		return errors.New("testvm: no accelerator chosen (set Config.Accel, for example from ChooseAccel)")
	case c.Accel != AccelKVM && c.Accel != AccelTCG:
		return fmt.Errorf("testvm: unknown accelerator %q", c.Accel)
	}
	return nil
}

// Cmdline is the guest kernel command line.
func (c Config) Cmdline() string {
	c = c.withDefaults()
	// panic=-1 with -no-reboot makes a guest panic end QEMU at once.
	args := []string{"console=ttyS0", "quiet", "panic=-1", "rdinit=/init"}
	if c.Guest.IP.IsValid() {
		args = append(args, "remus.ip="+c.Guest.IP.String())
	}
	args = append(args, "remus.port="+strconv.Itoa(c.Guest.Port))
	if c.Guest.Work != "" {
		args = append(args, "remus.work="+c.Guest.Work)
	}
	if c.Guest.DirtyPerSec > 0 {
		args = append(args, "remus.dirty="+strconv.Itoa(c.Guest.DirtyPerSec))
		if c.Guest.DirtyMiB > 0 {
			args = append(args, "remus.dirtymem="+strconv.Itoa(c.Guest.DirtyMiB))
		}
	}
	if c.Guest.TickMillis > 0 {
		args = append(args, "remus.tick="+strconv.Itoa(c.Guest.TickMillis))
	}
	if c.Disk != "" {
		args = append(args, "remus.disk=/dev/vda")
	}
	if c.Guest.Exec != "" {
		args = append(args, "remus.exec="+c.Guest.Exec)
		if len(c.Guest.ExecArgs) > 0 {
			args = append(args, "remus.args="+strings.Join(c.Guest.ExecArgs, ","))
		}
	}
	return strings.Join(append(args, c.Guest.ExtraCmdline...), " ")
}

// Args renders the QEMU command line (without the binary). The same Config
// always renders the same arguments.
func (c Config) Args() ([]string, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c = c.withDefaults()
	mem := strconv.Itoa(c.MemoryMiB) + "M"
	a := []string{
		"-name", c.Name,
		"-nodefaults", "-no-user-config", "-no-reboot",
		"-display", "none", "-vga", "none",
		"-machine", "q35,memory-backend=" + RAMBackendID,
		"-accel", c.Accel,
		"-cpu", cpuModel(c.Accel),
		"-smp", strconv.Itoa(c.CPUs),
		"-m", mem,
	}
	switch c.RAM {
	case RAMFile:
		a = append(a, "-object", "memory-backend-file,id="+RAMBackendID+",size="+mem+",mem-path="+c.RAMPath+",share=on")
	case RAMMemfd:
		a = append(a, "-object", "memory-backend-memfd,id="+RAMBackendID+",size="+mem+",share=on")
	}
	a = append(a, "-kernel", c.Kernel, "-initrd", c.Initrd, "-append", c.Cmdline())
	for i, q := range c.QMP {
		id := "qmp" + strconv.Itoa(i)
		a = append(a, "-chardev", "socket,id="+id+",path="+q+",server=on,wait=off", "-mon", "chardev="+id+",mode=control")
	}
	a = append(a, "-chardev", "file,id=serial0,path="+c.SerialLog, "-serial", "chardev:serial0")
	if c.Disk != "" {
		a = append(a,
			"-blockdev", "driver=file,node-name="+DiskNode+"-file,filename="+c.Disk,
			"-blockdev", "driver=raw,node-name="+DiskNode+",file="+DiskNode+"-file",
			"-device", "virtio-blk-pci,drive="+DiskNode+",id=vda")
	}
	switch c.NIC.Mode {
	case NICStream:
		a = append(a, "-netdev", "stream,id=net0,server="+onOff(c.NIC.Server)+",addr.type=unix,addr.path="+c.NIC.Path)
	case NICTap:
		a = append(a, "-netdev", "tap,id=net0,ifname="+c.NIC.Tap+",script=no,downscript=no")
	}
	if c.NIC.Mode != NICNone {
		a = append(a, "-device", "virtio-net-pci,netdev=net0,mac="+c.NIC.MAC+",romfile=")
	}
	if c.Incoming != "" {
		a = append(a, "-incoming", c.Incoming)
	}
	return append(a, c.Extra...), nil
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// VM is a running QEMU process.
type VM struct {
	Config Config
	cmd    *exec.Cmd
	stderr *bytes.Buffer

	waitOnce sync.Once
	done     chan struct{}
	waitErr  error
}

// Start launches QEMU. The process dies with the calling process (SIGKILL on
// parent death) and Close always kills it.
func Start(ctx context.Context, c Config) (*VM, error) {
	if c.Accel == "" {
		choice, err := ChooseAccel(ctx, c.QEMU, "")
		if err != nil {
			return nil, err
		}
		c.Accel = choice.Accel
	}
	args, err := c.Args()
	if err != nil {
		return nil, err
	}
	c = c.withDefaults()
	if c.SerialLog != "" {
		// QEMU appends to an existing file; a stale ready line from an
		// earlier run must not be mistaken for this one's.
		if err := os.WriteFile(c.SerialLog, nil, 0o644); err != nil {
			return nil, fmt.Errorf("testvm: serial log: %w", err)
		}
	}
	cmd := exec.Command(c.QEMU, args...)
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("testvm: start %s: %w", c.QEMU, err)
	}
	vm := &VM{Config: c, cmd: cmd, stderr: &stderr, done: make(chan struct{})}
	go func() {
		vm.waitErr = cmd.Wait()
		close(vm.done)
	}()
	return vm, nil
}

// PID is the QEMU process id.
func (vm *VM) PID() int { return vm.cmd.Process.Pid }

// Done is closed when QEMU has exited.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// ExitError is QEMU's exit status once Done is closed.
func (vm *VM) ExitError() error { <-vm.done; return vm.waitErr }

// Stderr is what QEMU printed so far (only safe to read after Done).
func (vm *VM) Stderr() string { <-vm.done; return vm.stderr.String() }

// Kill sends SIGKILL to QEMU and waits for it to exit.
func (vm *VM) Kill() {
	vm.cmd.Process.Kill()
	<-vm.done
}

// Close kills QEMU if it is still running.
func (vm *VM) Close() error {
	vm.Kill()
	return nil
}

// Ready is what the guest announced on its ready line.
type Ready struct {
	BootID string
	Line   string
}

// WaitReady waits until the guest prints its ready line on the console, QEMU
// exits, or ctx ends. Errors include the tail of the console and QEMU's
// output.
func (vm *VM) WaitReady(ctx context.Context) (Ready, error) {
	line, err := vm.WaitConsole(ctx, ReadyPrefix)
	if err != nil {
		return Ready{}, err
	}
	r := Ready{Line: line}
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, "boot="); ok {
			r.BootID = v
		}
	}
	if r.BootID == "" {
		return r, fmt.Errorf("testvm: ready line without boot id: %q", line)
	}
	return r, nil
}

// WaitConsole waits for a console line starting with prefix and returns it.
// The serial log is polled: QEMU writes it as a plain file.
func (vm *VM) WaitConsole(ctx context.Context, prefix string) (string, error) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if line, ok := findLine(vm.Config.SerialLog, prefix); ok {
			return line, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("testvm: waiting for %q on the console: %w\n%s", prefix, ctx.Err(), vm.diagnostics())
		case <-vm.done:
			if line, ok := findLine(vm.Config.SerialLog, prefix); ok {
				return line, nil
			}
			return "", fmt.Errorf("testvm: QEMU exited (%v) before %q appeared on the console\n%s", vm.waitErr, prefix, vm.diagnostics())
		case <-tick.C:
		}
	}
}

// findLine returns the first whole line (ended by a newline: QEMU may be in
// the middle of writing the last one) that starts with prefix.
func findLine(path, prefix string) (string, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", false
	}
	lines := strings.Split(string(b), "\n")
	for _, line := range lines[:len(lines)-1] {
		if line = strings.TrimRight(line, "\r"); strings.HasPrefix(line, prefix) {
			return line, true
		}
	}
	return "", false
}

// Console returns the serial console output so far.
func (vm *VM) Console() string {
	b, _ := os.ReadFile(vm.Config.SerialLog)
	return string(b)
}

func (vm *VM) diagnostics() string {
	console := vm.Console()
	if len(console) > 4000 {
		console = "..." + console[len(console)-4000:]
	}
	s := "--- console ---\n" + console
	select {
	case <-vm.done:
		s += "\n--- qemu ---\n" + vm.stderr.String()
	default:
	}
	return s
}

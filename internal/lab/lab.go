// Package lab sets up a protected test guest on one host, for the demo, the
// end-to-end tests and the benchmarks: the test guest under QEMU, its
// outside network (a tap device in a network namespace of its own, where the
// client lives), and the two remusd agents as separate processes on
// loopback, so that the primary can be killed like a dying host.
package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/netns"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/witness"
)

// Addresses on the lab's outside network.
const (
	ClientAddr = "10.213.9.1/24"
	GuestAddr  = "10.213.9.2/24"
	GuestSvc   = "10.213.9.2:7000"
)

// Lab is one protected-guest setup. Close undoes all of it.
type Lab struct {
	Dir    string // under /dev/shm: RAM files, sockets, logs
	QEMU   string
	Remusd string
	// Accel is the accelerator the lab's guests run under, and why.
	Accel testvm.AccelChoice
	Image testvm.Image
	Net   *Network

	mu      sync.Mutex
	cleanup []func()
}

// Options configures New.
type Options struct {
	QEMU   string // qemu-system-x86_64 to use
	Remusd string // remusd binary; built from the module when empty
	// Accel is "kvm", "tcg", or empty / "auto" for testvm.ChooseAccel's
	// choice ($REMUS_ACCEL, else the probe).
	Accel string
}

// New builds what the lab needs and creates its network.
func New(ctx context.Context, o Options) (*Lab, error) {
	dir, err := os.MkdirTemp("/dev/shm", "remus-lab-")
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	l := &Lab{Dir: dir, QEMU: o.QEMU, Remusd: o.Remusd}
	l.defer_(func() { os.RemoveAll(dir) })
	if err := l.setup(ctx, o.Accel); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

func (l *Lab) setup(ctx context.Context, accel string) error {
	var err error
	if l.Accel, err = testvm.ChooseAccel(ctx, l.QEMU, accel); err != nil {
		return err
	}
	k, err := testvm.FindKernel()
	if err != nil {
		return err
	}
	if l.Image, err = testvm.BuildImage(ctx, k, l.Dir, nil, nil); err != nil {
		return err
	}
	if l.Remusd == "" {
		l.Remusd = filepath.Join(l.Dir, "remusd")
		if err := BuildRemusd(ctx, l.Remusd); err != nil {
			return err
		}
	}
	l.Net, err = newNetwork()
	if err != nil {
		return err
	}
	l.defer_(l.Net.close)
	return nil
}

// BuildRemusd builds cmd/remusd of this module into out.
func BuildRemusd(ctx context.Context, out string) error { return BuildCommand(ctx, "remusd", out) }

// BuildCommand builds cmd/NAME of this module into out.
func BuildCommand(ctx context.Context, name, out string) error {
	root, err := testvm.RepoRoot()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/"+name)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("lab: build %s: %w\n%s", name, err, b)
	}
	return nil
}

func (l *Lab) defer_(f func()) {
	l.mu.Lock()
	l.cleanup = append(l.cleanup, f)
	l.mu.Unlock()
}

// Close stops every process the lab started and removes its network and
// files, newest first.
func (l *Lab) Close() {
	l.mu.Lock()
	fs := l.cleanup
	l.cleanup = nil
	l.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

// GuestConfig is the lab's guest for one role ("primary" or "backup"):
// 256 MiB in a file under the lab directory, a QMP socket for the caller
// and one for remusd, the NIC on a stream socket that QEMU listens on and
// that role's remusd relays to the lab's network, the page dirtier at
// dirtyPerSec.
func (l *Lab) GuestConfig(role string, dirtyPerSec int) testvm.Config {
	c := testvm.Config{
		QEMU: l.QEMU, Accel: l.Accel.Accel, Name: "remus-lab", MemoryMiB: 256, RAM: testvm.RAMFile,
		RAMPath: filepath.Join(l.Dir, role+".ram"),
		Kernel:  l.Image.Kernel.Image, Initrd: l.Image.Initrd,
		QMP:       []string{filepath.Join(l.Dir, role+"-user.qmp"), filepath.Join(l.Dir, role+"-remusd.qmp")},
		SerialLog: filepath.Join(l.Dir, role+"-console.log"),
		NIC:       testvm.NIC{Mode: testvm.NICStream, Server: true, Path: filepath.Join(l.Dir, role+"-net.sock")},
	}
	c.Guest.IP = netip.MustParsePrefix(GuestAddr)
	c.Guest.DirtyPerSec = dirtyPerSec
	return c
}

// AddDisk gives the primary a raw disk of sizeMiB (zeroes) and the backup
// its own copy to fail over with, equally sized and empty: remusd fills it
// with the primary's contents and then with each committed epoch's writes.
func (l *Lab) AddDisk(prim, back *testvm.Config, sizeMiB int) error {
	prim.Disk = filepath.Join(l.Dir, "primary-disk.img")
	back.Disk = filepath.Join(l.Dir, "backup-disk.img")
	for _, p := range []string{prim.Disk, back.Disk} {
		f, err := os.Create(p)
		if err != nil {
			return fmt.Errorf("lab: %w", err)
		}
		err = f.Truncate(int64(sizeMiB) << 20)
		f.Close()
		if err != nil {
			return fmt.Errorf("lab: %w", err)
		}
	}
	return nil
}

// Network is the guest's outside world: a network namespace with a bridge
// that holds the client's address, and a tap on the bridge for each host's
// remusd (persistent taps, so that the primary's and the backup's are there
// before their remusd attaches, as with libvirt). After a failover the
// guest's MAC address moves from the primary's tap to the backup's, and the
// bridge learns it from the guest's announcement.
type Network struct {
	NS                    *netns.Namespace
	TapPrimary, TapBackup string
}

func newNetwork() (*Network, error) {
	ns, err := netns.Create()
	if err != nil {
		return nil, err
	}
	n := &Network{NS: ns, TapPrimary: "lab-p", TapBackup: "lab-b"}
	steps := [][]string{
		{"link", "add", "br0", "type", "bridge"},
		{"addr", "add", ClientAddr, "dev", "br0"},
		{"link", "set", "dev", "br0", "up"},
		// The guest's ARP replies wait for an epoch's commit like all
		// its output: on a loaded host one can take seconds, and the
		// kernel gives up on an address after 3 tries a second apart.
		// Ask for 15 s.
		{"ntable", "change", "name", "arp_cache", "dev", "br0", "mcast_probes", "15"},
	}
	for _, tap := range []string{n.TapPrimary, n.TapBackup} {
		steps = append(steps,
			[]string{"tuntap", "add", "dev", tap, "mode", "tap"},
			[]string{"link", "set", "dev", tap, "master", "br0", "up"})
	}
	for _, args := range steps {
		if err := ns.Exec(args...); err != nil {
			n.close()
			return nil, err
		}
	}
	return n, nil
}

func (n *Network) close() { n.NS.Remove() }

// Dial connects to the guest's counter service from the client namespace.
func (l *Lab) Dial(ctx context.Context) (net.Conn, error) {
	return l.Net.NS.DialContext(ctx, "tcp", GuestSvc)
}

// StartVM launches QEMU for c; the lab kills it on Close.
func (l *Lab) StartVM(ctx context.Context, c testvm.Config) (*testvm.VM, error) {
	vm, err := testvm.Start(ctx, c)
	if err != nil {
		return nil, err
	}
	l.defer_(func() { vm.Close() })
	return vm, nil
}

// Proc is a process the lab started; its combined output is kept.
type Proc struct {
	Name  string
	cmd   *exec.Cmd
	mu    sync.Mutex
	out   strings.Builder
	lines chan string
	done  chan struct{}
}

// Start runs a process whose output is kept (and copied to echo, if set).
// The lab kills it on Close.
func (l *Lab) Start(name string, echo io.Writer, args ...string) (*Proc, error) {
	return l.startIn(nil, name, echo, args...)
}

// startIn is Start inside network namespace ns (nil: this process's).
func (l *Lab) startIn(ns *netns.Namespace, name string, echo io.Writer, args ...string) (*Proc, error) {
	cmd := exec.Command(name, args...)
	if ns != nil {
		// nsenter enters the namespace and execs name: the same pid.
		cmd = exec.Command("nsenter", append([]string{"--net=" + ns.Path(), "--", name}, args...)...)
	}
	p := &Proc{Name: filepath.Base(name) + " " + args[0], cmd: cmd, lines: make(chan string, 1000), done: make(chan struct{})}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := p.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	p.cmd.Stdout = p.cmd.Stderr
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("lab: start %s: %w", p.Name, err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.out.WriteString(line + "\n")
			p.mu.Unlock()
			if echo != nil {
				fmt.Fprintf(echo, "  [%s] %s\n", p.Name, line)
			}
			select {
			case p.lines <- line:
			default:
			}
		}
		p.cmd.Wait()
		close(p.done)
	}()
	l.defer_(p.Kill)
	return p, nil
}

// PID is the process id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Stop sends SIGTERM and waits for the process to end, at most timeout
// (then it is killed and an error returned).
func (p *Proc) Stop(timeout time.Duration) error {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("lab: %s did not end within %v of SIGTERM", p.Name, timeout)
	}
}

// Kill sends SIGKILL and waits for the process to end.
func (p *Proc) Kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Output is everything the process printed so far.
func (p *Proc) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// WaitLine waits for an output line containing s.
func (p *Proc) WaitLine(ctx context.Context, s string) (string, error) {
	for {
		select {
		case line := <-p.lines:
			if strings.Contains(line, s) {
				return line, nil
			}
		case <-p.done:
			return "", fmt.Errorf("lab: %s exited before printing %q", p.Name, s)
		case <-ctx.Done():
			return "", fmt.Errorf("lab: waiting for %q from %s: %w", s, p.Name, ctx.Err())
		}
	}
}

// Protection is a running pair of agents for one guest.
type Protection struct {
	Primary, Backup *Proc
	EpochLog        string
	Report          string
	BackupConfig    testvm.Config
	// StandbyVM is the backup's standby QEMU (ProtectOptions.Standby).
	StandbyVM *testvm.VM

	// BackupAddr is where the backup remusd listens; Control, the
	// primary remusd's control socket.
	BackupAddr, Control       string
	startBackup, startPrimary func() error
}

// ProtectOptions tunes Protect.
type ProtectOptions struct {
	Epoch            time.Duration // default 25 ms
	HeartbeatTimeout time.Duration // default remusd's
	PrimaryArgs      []string      // extra remusd primary flags
	BackupArgs       []string      // extra remusd backup flags
	Echo             io.Writer     // copy agent logs here
	// Via, when set, is given the backup's address and returns the address
	// the primary connects to instead (a test proxy in between).
	Via func(backup string) (string, error)
	// NoOutputCommit lets the guest's output straight through
	// (remusd primary --net-output-commit=false).
	NoOutputCommit bool
	// BackupLater starts only the primary remusd, which relays the
	// guest's network unprotected until StartBackup starts the backup.
	BackupLater bool
	// Witness, when set, is the etcd endpoint both agents use as witness
	// (StartWitness runs one); without it they run --assume-fail-stop.
	// The primary's host is called WitnessA at the witness, the backup's
	// WitnessB (the other way round with Reverse).
	Witness string
	// Reverse protects a guest running on the backup's side (after a
	// failover or switchover) from there: the primary remusd relays to
	// the backup's tap, the backup's to the primary's.
	Reverse bool
	// Standby starts the backup's QEMU at once, waiting for a device
	// state (-incoming defer), and gives it to the backup remusd with
	// --standby-qmp instead of a command line to start on failover: as
	// with libvirt's standby domain. Protection.StandbyVM is that QEMU.
	Standby bool
	// Hosts, when set, runs the primary remusd on host A and the backup's
	// on host B (the other way round with Reverse), linked through the
	// hosts' network; Witness is then the witness on host W.
	Hosts *Hosts
}

// The lab's two hosts as the witness knows them.
const (
	WitnessA = "lab-a"
	WitnessB = "lab-b"
)

// Protect starts the backup and primary agents for a guest started from
// prim (whose second QMP socket is remusd's), with the backup ready to start
// back on failover. Each remusd relays its guest's NIC to its tap on the
// lab's bridge; Protect returns once the primary's relay runs, so that the
// guest can be reached.
func (l *Lab) Protect(prim, back testvm.Config, o ProtectOptions) (*Protection, error) {
	backupArgs, err := back.Args()
	if err != nil {
		return nil, err
	}
	var primaryNS, backupNS *netns.Namespace
	var peer string
	if h := o.Hosts; h != nil {
		primaryNS, backupNS = h.A, h.B
		if o.Reverse {
			primaryNS, backupNS = backupNS, primaryNS
		}
		peer = h.agentAddr(backupNS)
	} else if peer, err = FreePort(); err != nil {
		return nil, err
	}
	p := &Protection{EpochLog: filepath.Join(l.Dir, "epochs.jsonl"), Report: filepath.Join(l.Dir, "failover.json"), BackupConfig: back, BackupAddr: peer}
	os.Remove(p.EpochLog)
	os.Remove(p.Report)
	common := []string{"--vm", "lab", "--net-netns", l.Net.NS.Path()}
	if o.Witness == "" {
		common = append(common, "--assume-fail-stop")
	}
	primaryTap, backupTap, primaryID, backupID := l.Net.TapPrimary, l.Net.TapBackup, WitnessA, WitnessB
	if o.Reverse {
		primaryTap, backupTap, primaryID, backupID = backupTap, primaryTap, backupID, primaryID
	}
	if o.HeartbeatTimeout > 0 {
		common = append(common, "--heartbeat-timeout", o.HeartbeatTimeout.String())
	}
	backupState := filepath.Join(l.Dir, "backup-state")
	bargs := []string{"backup", "--listen", peer, "--state-dir", backupState, "--report", p.Report,
		"--net-guest", back.NIC.Path, "--net-tap", backupTap}
	if o.Standby {
		// The device state the primary saves by default (QMP
		// xen-save-devices-state) has no configuration section.
		sb := back
		sb.Extra = append(append([]string{}, sb.Extra...), qemu.RestoreArgs(qemu.StateFormat{})...)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		p.StandbyVM, err = l.StartVM(ctx, sb)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("lab: start the standby QEMU: %w", err)
		}
		bargs = append(bargs, "--standby-qmp", back.QMP[1])
	} else {
		bargs = append(bargs, "--ram-image", back.RAMPath, "--qmp", back.QMP[1])
	}
	bargs = append(bargs, common...)
	if o.Witness != "" {
		bargs = append(bargs, "--witness", o.Witness, "--witness-id", backupID)
	}
	if back.Disk != "" {
		bargs = append(bargs, "--disk-image", back.Disk)
	}
	bargs = append(bargs, o.BackupArgs...)
	if !o.Standby {
		bargs = append(append(bargs, "--", back.QEMU), backupArgs...)
	}
	p.startBackup = func() error {
		// The QEMU the backup starts on failover outlives remusd by
		// design; remusd names it in its state directory as soon as it
		// started it. Registered first, so that it runs once remusd is
		// gone.
		l.defer_(func() { killPIDFile(agent.QEMUPIDFile(backupState), l.Dir) })
		var err error
		p.Backup, err = l.startIn(backupNS, l.Remusd, o.Echo, bargs...)
		return err
	}
	if !o.BackupLater {
		if err := p.startBackup(); err != nil {
			return nil, err
		}
	}
	if o.Via != nil {
		if peer, err = o.Via(peer); err != nil {
			return nil, err
		}
	}
	p.Control = agent.DefaultControlSocket(filepath.Join(l.Dir, "primary-state"))
	pargs := append([]string{"primary", "--qmp", prim.QMP[1], "--peer", peer, "--state-dir", filepath.Join(l.Dir, "primary-state"),
		"--epoch-log", p.EpochLog, "--net-guest", prim.NIC.Path, "--net-tap", primaryTap}, common...)
	if o.Witness != "" {
		pargs = append(pargs, "--witness", o.Witness, "--witness-id", primaryID)
	}
	if o.Epoch > 0 {
		pargs = append(pargs, "--epoch", o.Epoch.String())
	}
	if o.NoOutputCommit {
		pargs = append(pargs, "--net-output-commit=false")
	}
	if prim.Disk != "" {
		pargs = append(pargs, "--disk", testvm.DiskNode)
	}
	pargs = append(pargs, o.PrimaryArgs...)
	p.startPrimary = func() (err error) {
		p.Primary, err = l.startIn(primaryNS, l.Remusd, o.Echo, pargs...)
		return err
	}
	if err := p.startPrimary(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := p.Primary.WaitLine(ctx, "relay started"); err != nil {
		return nil, fmt.Errorf("lab: the primary's network relay did not start: %w\n%s", err, p.Primary.Output())
	}
	// The primary serves its control socket a few steps later: wait for
	// it, unless the primary exits first (a test may mean it to).
	for {
		if _, err := os.Stat(p.Control); err == nil {
			return p, nil
		}
		select {
		case <-p.Primary.Done():
			return p, nil
		case <-ctx.Done():
			return nil, fmt.Errorf("lab: the primary serves no control socket %s: %w\n%s", p.Control, ctx.Err(), p.Primary.Output())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// StartWitness runs a single-node etcd for the lab's agents (stopped with
// the lab) and returns it.
func (l *Lab) StartWitness(ctx context.Context) (*witness.Local, error) {
	return l.startWitness(ctx, witness.LocalConfig{})
}

// startWitness runs etcd as cfg says, its data in the lab's directory.
func (l *Lab) startWitness(ctx context.Context, cfg witness.LocalConfig) (*witness.Local, error) {
	cfg.Dir = filepath.Join(l.Dir, "witness")
	w, err := witness.StartLocal(ctx, cfg)
	if err != nil {
		return nil, err
	}
	l.defer_(w.Stop)
	return w, nil
}

// RestartPrimary starts the primary remusd again with the same arguments,
// once the previous one has exited.
func (p *Protection) RestartPrimary() error {
	select {
	case <-p.Primary.Done():
	default:
		return errors.New("lab: the primary remusd still runs")
	}
	return p.startPrimary()
}

// Switchover asks the primary remusd to move the guest to the backup.
func (p *Protection) Switchover(ctx context.Context) (agent.SwitchoverResult, error) {
	var r agent.SwitchoverResult
	err := agent.CallControl(ctx, p.Control, http.MethodPost, agent.ControlSwitchoverPath, time.Minute, &r)
	return r, err
}

// Unprotect asks the primary remusd to end protection.
func (p *Protection) Unprotect(ctx context.Context) (agent.UnprotectResult, error) {
	var r agent.UnprotectResult
	err := agent.CallControl(ctx, p.Control, http.MethodPost, agent.ControlUnprotectPath, time.Minute, &r)
	return r, err
}

// Status asks the primary remusd for its status.
func (p *Protection) Status(ctx context.Context) (agent.PrimaryStatus, error) {
	var st agent.PrimaryStatus
	err := agent.CallControl(ctx, p.Control, http.MethodGet, agent.ControlStatusPath, 5*time.Second, &st)
	return st, err
}

// Metrics scrapes the primary remusd's /metrics on its control socket.
func (p *Protection) Metrics(ctx context.Context) (string, error) {
	var b []byte
	err := agent.CallControl(ctx, p.Control, http.MethodGet, agent.MetricsPath, 5*time.Second, &b)
	return string(b), err
}

// StartBackup starts the backup remusd of a Protect with BackupLater.
func (p *Protection) StartBackup() error {
	if p.Backup != nil {
		return errors.New("lab: the backup runs already")
	}
	return p.startBackup()
}

// killPIDFile kills the process named in pidFile if it is still one of the
// lab's (its command line names the lab directory), not a later process that
// reused the pid.
func killPIDFile(pidFile, dir string) {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), dir+"/") {
		return
	}
	syscall.Kill(pid, syscall.SIGKILL)
}

// FreePort is a free TCP address on loopback.
func FreePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// Epochs reads the primary's epoch log.
func (p *Protection) Epochs() ([]agent.EpochRecord, error) {
	return ReadEpochLog(p.EpochLog)
}

// ReadEpochLog reads a remusd --epoch-log file; a missing file is empty.
func ReadEpochLog(path string) ([]agent.EpochRecord, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []agent.EpochRecord
	dec := json.NewDecoder(f)
	for {
		var r agent.EpochRecord
		if err := dec.Decode(&r); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return out, nil
			}
			return out, fmt.Errorf("lab: epoch log %s: %w", path, err)
		}
		out = append(out, r)
	}
}

// ReadReport reads a remusd --report file.
func ReadReport(path string) (*agent.FailoverReport, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r agent.FailoverReport
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// WaitReport waits for the backup's failover report.
func (p *Protection) WaitReport(ctx context.Context) (*agent.FailoverReport, error) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if r, err := ReadReport(p.Report); err == nil {
			return r, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("lab: no failover report: %w", ctx.Err())
		case <-p.Backup.Done():
			if r, err := ReadReport(p.Report); err == nil {
				return r, nil
			}
			return nil, errors.New("lab: backup remusd exited without a failover report")
		case <-t.C:
		}
	}
}

// WaitCommitted waits until the primary logged at least n committed epochs.
func (p *Protection) WaitCommitted(ctx context.Context, n int) ([]agent.EpochRecord, error) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		eps, err := p.Epochs()
		if err != nil || len(eps) >= n {
			return eps, err
		}
		select {
		case <-ctx.Done():
			return eps, fmt.Errorf("lab: %d of %d epochs committed: %w", len(eps), n, ctx.Err())
		case <-p.Primary.Done():
			return eps, fmt.Errorf("lab: primary remusd exited: %s", p.Primary.Output())
		case <-t.C:
		}
	}
}

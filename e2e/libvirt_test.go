package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/internal/libvirttest"
	"github.com/remus-kvm/remus/libvirtdom"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
)

// libvirtDomain is a small domain of type qemu (TCG) as virt-install
// would define it: RAM private to QEMU, no QMP socket for remusd, a VGA and
// a balloon. fixed makes it what `remusctl check` asks for.
func libvirtDomain(name, uuid string, fixed bool) string {
	root, ram, video, balloon, cmdline := "<domain type='qemu'>", "", "vga", "virtio", ""
	if fixed {
		root = "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
		ram = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
		video, balloon = "none", "none"
		cmdline = "<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:" + agentQMP(name) + ",server=on,wait=off'/></qemu:commandline>"
	}
	return root + `
  <name>` + name + `</name>
  <uuid>` + uuid + `</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  ` + ram + `
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'/>
    <console type='pty'/>
    <video><model type='` + video + `'/></video>
    <memballoon model='` + balloon + `'/>
  </devices>
  ` + cmdline + `
</domain>`
}

// agentQMP is where remusctl check tells domain name's QMP socket to go.
func agentQMP(name string) string { return "/run/remus/" + name + "/agent.qmp" }

func newUUID(t *testing.T) string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	b[6], b[8] = b[6]&0x0f|0x40, b[8]&0x3f|0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// remusctlBinary builds cmd/remusctl for the test.
func remusctlBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "remusctl")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := lab.BuildCommand(ctx, "remusctl", bin); err != nil {
		t.Fatal(err)
	}
	return bin
}

// remusctl builds cmd/remusctl for the test and returns a runner that
// gives its output and exit code.
func remusctl(t *testing.T) func(args ...string) (string, int) {
	t.Helper()
	return remusctlRunner(t, remusctlBinary(t))
}

// remusctlRunner runs the remusctl binary bin.
func remusctlRunner(t *testing.T, bin string) func(args ...string) (string, int) {
	return func(args ...string) (string, int) {
		out, err := exec.Command(bin, args...).CombinedOutput()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			return string(out), ee.ExitCode()
		case err != nil:
			t.Fatalf("remusctl %s: %v", strings.Join(args, " "), err)
		}
		return string(out), 0
	}
}

// TestLibvirtCheck asks a real libvirtd for a domain as virt-install
// defines it: remusctl check refuses it, naming each problem with the XML
// that fixes it, and leaves the domain as it was; the domain redefined with
// those fixes passes, starts under libvirt, and its QEMU answers on the QMP
// socket the fix put in for remusd, with its RAM in a shared memfd.
func TestLibvirtCheck(t *testing.T) {
	l := libvirttest.Require(t)
	run := remusctl(t)
	name, uuid := fmt.Sprintf("remus-check-%d", os.Getpid()), newUUID(t)
	d := libvirttest.Define(t, l, libvirtDomain(name, uuid, false))
	before, err := l.DomainGetXMLDesc(d, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}

	out, code := run("check", name)
	if code != 1 {
		t.Fatalf("remusctl check of an unprepared domain exited %d, want 1:\n%s", code, out)
	}
	for _, want := range []string{
		"error ram-not-shared", `<source type="memfd"/>`, `<access mode="shared"/>`,
		"error no-agent-qmp", "<qemu:arg value='-qmp'/>", "unix:" + agentQMP(name) + ",server=on,wait=off",
		"error video-ram", "<model type='none'/>",
		"warning untracked-writes", "<memballoon model='none'/>",
		name + " cannot be protected",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("remusctl check output lacks %q:\n%s", want, out)
		}
	}
	after, err := l.DomainGetXMLDesc(d, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Errorf("remusctl check changed the domain:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	if out, code := run("check", "no-such-domain-"+uuid); code != 1 || !strings.Contains(out, "no domain") {
		t.Errorf("remusctl check of a missing domain: exit %d, output:\n%s", code, out)
	}

	// With the fixes it passes, and libvirt runs it with what remusd needs.
	d, err = l.DomainDefineXML(libvirtDomain(name, uuid, true))
	if err != nil {
		t.Fatalf("define the fixed domain: %v", err)
	}
	if out, code := run("check", name); code != 0 || !strings.Contains(out, "ready to protect") {
		t.Fatalf("remusctl check of the fixed domain: exit %d:\n%s", code, out)
	}
	// Its standby, for the backup host: the same domain, waiting for the
	// device state, with the backup agent's socket.
	out, code = run("standby-xml", "--peer", "10.0.0.1:7700", "--agent-qmp", "/run/remus/"+name+"/standby.qmp", name)
	if code != 0 {
		t.Fatalf("remusctl standby-xml: exit %d:\n%s", code, out)
	}
	for _, want := range []string{"<name>" + name + "</name>", "<uuid>" + uuid + "</uuid>", "unix:/run/remus/" + name + "/standby.qmp,server=on,wait=off",
		`<arg value="-incoming"></arg>`, `<arg value="defer"></arg>`, "migration.send-configuration=off", `role="standby"`, `peer="10.0.0.1:7700"`} {
		if !strings.Contains(out, want) {
			t.Errorf("standby XML lacks %q:\n%s", want, out)
		}
	}
	// As the fix says: install -d -o libvirt-qemu -g libvirt-qemu DIR.
	qemuDir(t, filepath.Dir(agentQMP(name)))
	if err := l.DomainCreate(d); err != nil {
		t.Fatalf("start the fixed domain: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var mon *qmp.Client
	for mon == nil {
		if mon, err = qmp.Dial(ctx, agentQMP(name)); err != nil && ctx.Err() != nil {
			t.Fatalf("the domain's QMP socket for remusd does not answer: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer mon.Close()
	if st, err := qemu.Status(ctx, mon); err != nil || st != "running" {
		t.Fatalf("status over the agent socket: %q, %v", st, err)
	}
	var objs []struct {
		ID   string `json:"id"`
		Type string `json:"type"`
	}
	if err := mon.Execute(ctx, "qom-list", map[string]string{"path": "/objects"}, &objs); err != nil {
		t.Fatal(err)
	}
	var types bytes.Buffer
	memfd := false
	for _, o := range objs {
		fmt.Fprintf(&types, " %s(%s)", o.ID, o.Type)
		memfd = memfd || o.Type == "child<memory-backend-memfd>"
	}
	if !memfd {
		t.Errorf("no memory-backend-memfd among the domain's objects:%s", types.String())
	}
}

// libvirtGuest is the test guest as a libvirt domain of type qemu: kernel
// and initrd from dir, RAM in a shared memfd, remusd's QMP socket and the
// NIC's stream socket (which remusd relays to the lab's network) in dir,
// the console in dir/console.log.
func libvirtGuest(name, uuid, dir, cmdline string) string {
	return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>` + name + `</name>
  <uuid>` + uuid + `</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>` + dir + `/vmlinuz</kernel>
    <initrd>` + dir + `/initrd</initrd>
    <cmdline>` + cmdline + `</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='` + dir + `/console.log'/><target port='0'/></serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:` + dir + `/agent.qmp,server=on,wait=off'/>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='stream,id=net0,server=on,addr.type=unix,addr.path=` + dir + `/net.sock'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile=,bus=pcie.0,addr=0x10'/>
  </qemu:commandline>
</domain>`
}

// qemuDir makes dir for QEMU's user (libvirt-qemu), removed with the test.
func qemuDir(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	u, err := user.Lookup("libvirt-qemu")
	if err != nil {
		t.Fatalf("libvirt's QEMU user: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestLibvirtFailover protects a domain that libvirt runs, with its
// standby domain (libvirtdom.Standby of its XML) started by libvirt on the
// same daemon, waiting with -incoming defer: the backup remusd writes the
// committed epochs into the standby's memfd. When the primary's QEMU and
// agent are killed (-9), the backup hands the standby the device state and
// continues it: libvirt then shows the standby domain running, and the
// client's counter on its connection carries on, the same boot.
func TestLibvirtFailover(t *testing.T) {
	lv := libvirttest.Require(t)
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	name := fmt.Sprintf("remus-fo-%d", os.Getpid())
	pdir, sdir := "/run/remus/"+name, "/run/remus/"+name+"-standby"
	qemuDir(t, pdir)
	qemuDir(t, sdir)
	copyFile(t, l.Image.Kernel.Image, pdir+"/vmlinuz")
	copyFile(t, l.Image.Initrd, pdir+"/initrd")
	cmdline := l.GuestConfig("primary", 4000).Cmdline()

	d := libvirttest.Define(t, lv, libvirtGuest(name, newUUID(t), pdir, cmdline))
	if err := lv.DomainCreate(d); err != nil {
		t.Fatalf("start the domain: %v", err)
	}
	inactive, err := lv.DomainGetXMLDesc(d, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	peer, err := lab.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	sxml, err := libvirtdom.Standby(inactive, libvirtdom.StandbyOptions{AgentQMP: sdir + "/agent.qmp", Peer: peer,
		Name: name + "-standby", UUID: newUUID(t), DeviceStateXen: true,
		ArgPaths: map[string]string{pdir + "/net.sock": sdir + "/net.sock"}})
	if err != nil {
		t.Fatal(err)
	}
	// Both domains run on this one host: the standby's console goes to a
	// file of its own.
	sxml = strings.ReplaceAll(sxml, pdir+"/console.log", sdir+"/console.log")
	sd := libvirttest.Define(t, lv, sxml)
	if err := lv.DomainCreate(sd); err != nil {
		t.Fatalf("start the standby domain: %v", err)
	}
	if st, _, err := lv.DomainGetState(sd, 0); err != nil || libvirt.DomainState(st) != libvirt.DomainPaused {
		t.Fatalf("standby domain state %d (%v), want paused (waiting for the device state)", st, err)
	}

	report, epochs := filepath.Join(l.Dir, "failover.json"), filepath.Join(l.Dir, "epochs.jsonl")
	// Timing is not what this test is about: a generous heartbeat timeout
	// keeps a loaded machine from failing over before the kill.
	common := []string{"--vm", name, "--net-netns", l.Net.NS.Path(), "--assume-fail-stop", "--heartbeat-timeout", "3s"}
	backup, err := l.Start(l.Remusd, nil, append([]string{"backup", "--listen", peer, "--state-dir", filepath.Join(l.Dir, "backup-state"),
		"--standby-qmp", sdir + "/agent.qmp", "--net-guest", sdir + "/net.sock", "--net-tap", l.Net.TapBackup, "--report", report}, common...)...)
	if err != nil {
		t.Fatal(err)
	}
	primary, err := l.Start(l.Remusd, nil, append([]string{"primary", "--qmp", pdir + "/agent.qmp", "--peer", peer,
		"--state-dir", filepath.Join(l.Dir, "primary-state"), "--epoch-log", epochs,
		"--net-guest", pdir + "/net.sock", "--net-tap", l.Net.TapPrimary}, common...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("primary remusd:\n%s\nbackup remusd:\n%s", primary.Output(), backup.Output())
			b, _ := os.ReadFile(pdir + "/console.log")
			t.Logf("console:\n%s", b)
		}
	})
	for {
		eps, err := lab.ReadEpochLog(epochs)
		if err != nil {
			t.Fatal(err)
		}
		if len(eps) >= 3 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%d epochs committed: %v", len(eps), ctx.Err())
		case <-primary.Done():
			t.Fatal("the primary remusd exited")
		case <-time.After(50 * time.Millisecond):
		}
	}
	c := newConsecutiveClient(t, ctx, l)
	c.incFor(time.Second)
	boot := c.last.BootID

	// While protected, libvirt's save (a migration remusd did not start)
	// is refused, and the domain runs on, protected.
	saved := filepath.Join(l.Dir, "saved.img")
	if err := lv.DomainSave(d, saved); err == nil {
		t.Fatal("virsh save of the protected domain succeeded")
	} else {
		t.Logf("virsh save refused: %v", err)
	}
	if err := lv.DomainManagedSave(d, 0); err == nil {
		t.Fatal("virsh managedsave of the protected domain succeeded")
	}
	if st, _, err := lv.DomainGetState(d, 0); err != nil || libvirt.DomainState(st) != libvirt.DomainRunning {
		t.Fatalf("after the refused saves the domain is in state %d (%v), want running", st, err)
	}
	if !strings.Contains(primary.Output(), "cancelling it") {
		t.Errorf("the primary remusd did not say it cancelled the save:\n%s", primary.Output())
	}
	before, _ := lab.ReadEpochLog(epochs)
	c.incFor(2 * time.Second)
	if after, _ := lab.ReadEpochLog(epochs); len(after) < len(before)+2 {
		t.Fatalf("protection did not go on after the refused saves: %d epochs committed in two seconds", len(after)-len(before))
	}

	// The primary's host dies: its QEMU and its agent, -9.
	pidText, err := os.ReadFile("/run/libvirt/qemu/" + name + ".pid")
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(pidText)))
	if err != nil {
		t.Fatal(err)
	}
	primary.Kill()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := lab.ReadReport(report); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no failover: %v", ctx.Err())
		case <-backup.Done():
			t.Fatal("the backup remusd exited without failing over")
		case <-time.After(50 * time.Millisecond):
		}
	}
	c.incFor(time.Second)
	if c.last.BootID != boot {
		t.Fatalf("boot %s after the failover, want %s", c.last.BootID, boot)
	}
	checkGuestMemory(t, c.cl)
	st, reason, err := lv.DomainGetState(sd, 0)
	if err != nil || libvirt.DomainState(st) != libvirt.DomainRunning {
		t.Fatalf("standby domain after the failover: state %d reason %d (%v), want running", st, reason, err)
	}
	rep, _ := lab.ReadReport(report)
	t.Logf("the standby domain runs under libvirt: resumed epoch %d in QEMU %s (pid %d) from %s, restore %.0f ms; %d consecutive replies, one boot",
		rep.Epoch, rep.QEMUVersion, rep.QEMUPID, rep.IncomingURI, rep.RestoreMS, c.n)
}

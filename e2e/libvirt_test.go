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
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/internal/libvirttest"
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

// remusctl builds cmd/remusctl for the test and returns a runner that
// gives its output and exit code.
func remusctl(t *testing.T) func(args ...string) (string, int) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "remusctl")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := lab.BuildCommand(ctx, "remusctl", bin); err != nil {
		t.Fatal(err)
	}
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
	// As the fix says: install -d -o libvirt-qemu -g libvirt-qemu DIR.
	dir := filepath.Dir(agentQMP(name))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if u, err := user.Lookup("libvirt-qemu"); err == nil {
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
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

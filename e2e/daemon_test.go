package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/daemon"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/internal/libvirttest"
)

// hostDaemon is one test "host": a remusd daemon with its own control
// socket, peer API address, state and run directories. Both hosts share
// this machine's libvirtd, so the backup names its standby domains
// NAME-standby.
type hostDaemon struct {
	t       *testing.T
	l       *lab.Lab
	name    string
	control string
	listen  string
	runDir  string
	// metricsAddr serves /metrics over TCP (--metrics).
	metricsAddr string
	args        []string
	proc        *lab.Proc
	cl          *daemon.Client
}

// startHosts starts the daemons of host a (where domains run) and host b
// (their backup), with witnessURL's etcd as their witness, or assuming
// fail-stop hosts without one. Standby domains are NAME-standby on b, NAME-back on a.
// The agents they start are killed at the end of the test.
func startHosts(t *testing.T, l *lab.Lab, witnessURL string) (a, b *hostDaemon) {
	t.Helper()
	key := filepath.Join(l.Dir, "remus.key")
	if err := os.WriteFile(key, []byte("0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		t.Fatal(err)
	}
	mk := func(name, ports, standbyName string) *hostDaemon {
		listen, err := lab.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		h := &hostDaemon{t: t, l: l, name: name, control: filepath.Join(l.Dir, name+".sock"), listen: listen,
			runDir: fmt.Sprintf("/run/remus-test-%d-%s", os.Getpid(), name)}
		t.Cleanup(func() { os.RemoveAll(h.runDir) })
		// A config file holds what a host's configuration would; the
		// test's own paths go on the command line.
		conf := filepath.Join(l.Dir, name+".toml")
		safety := "assume-fail-stop = true\n"
		if witnessURL != "" {
			safety = fmt.Sprintf("witness = [%q]\nwitness-id = %q\n", witnessURL, name)
		}
		if err := os.WriteFile(conf, []byte(fmt.Sprintf("key-file = %q\n%sheartbeat-timeout = \"3s\"\nheal = \"2s\"\nagent-ports = %q\nstandby-name = %q\nhost = %q\n",
			key, safety, ports, standbyName, name)), 0o644); err != nil {
			t.Fatal(err)
		}
		metrics, err := lab.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		h.metricsAddr = metrics
		h.args = []string{"daemon", "--config", conf, "--control", h.control, "--listen", listen,
			"--state-dir", filepath.Join(l.Dir, name+"-state"), "--run-dir", h.runDir, "--metrics", metrics,
			"--images-dir", filepath.Join(h.runDir, "images")}
		h.cl = daemon.NewClient(h.control)
		h.start()
		return h
	}
	a = mk("host-a", "17800-17819", "{name}-back")
	b = mk("host-b", "17820-17839", "{name}-standby")
	killAgents(t, a, b)
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range []*hostDaemon{a, b} {
				t.Logf("%s daemon:\n%s", h.name, h.proc.Output())
				logs, _ := filepath.Glob(filepath.Join(l.Dir, h.name+"-state", "vms", "*.log"))
				for _, f := range logs {
					out, _ := os.ReadFile(f)
					t.Logf("%s agent log %s:\n%s", h.name, filepath.Base(f), out)
				}
			}
		}
	})
	return a, b
}

func (h *hostDaemon) start() {
	h.t.Helper()
	p, err := h.l.Start(h.l.Remusd, nil, h.args...)
	if err != nil {
		h.t.Fatal(err)
	}
	h.proc = p
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := h.cl.List(context.Background()); err == nil {
			return
		} else if time.Now().After(deadline) {
			h.t.Fatalf("%s daemon does not answer: %v\n%s", h.name, err, p.Output())
		}
		select {
		case <-p.Done():
			h.t.Fatalf("%s daemon exited:\n%s", h.name, p.Output())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// status runs remusctl status --json for vm on this host.
func (h *hostDaemon) status(run func(...string) (string, int), vm string) daemon.VMStatus {
	h.t.Helper()
	out, code := run("status", "--daemon", h.control, "--json", vm)
	if code != 0 {
		h.t.Fatalf("remusctl status on %s exited %d:\n%s", h.name, code, out)
	}
	var st daemon.VMStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		h.t.Fatalf("remusctl status --json on %s: %v:\n%s", h.name, err, out)
	}
	return st
}

// waitState waits until vm is in state on this host.
func (h *hostDaemon) waitState(ctx context.Context, run func(...string) (string, int), vm, state string) daemon.VMStatus {
	h.t.Helper()
	for {
		// The VM may not be known yet (the hook protects it in the
		// background): the daemon's answer is checked with remusctl once
		// it is.
		st, err := h.cl.Status(ctx, vm)
		if err == nil && st.State == state {
			return h.status(run, vm)
		}
		select {
		case <-ctx.Done():
			h.t.Fatalf("%s on %s: state %s (%s; %v), want %s: %v", vm, h.name, st.State, st.Why, err, state, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// waitShutDown waits, on the backup host, until it no longer stands by
// for vm, whose primary domain was shut down on purpose: never resuming
// it (failing over) meanwhile.
func (h *hostDaemon) waitShutDown(ctx context.Context, vm string) {
	h.t.Helper()
	for {
		st, err := h.cl.Status(ctx, vm)
		if err != nil && strings.Contains(err.Error(), "not protected") {
			return
		}
		if st.State == daemon.StateFailingOver || st.State == daemon.StateFailedOver {
			h.t.Fatalf("%s resumes %s, which was shut down on purpose: %+v", h.name, vm, st)
		}
		select {
		case <-ctx.Done():
			h.t.Fatalf("%s still stands by for %s after it was shut down: %+v %v", h.name, vm, st, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// committed is the last committed epoch a VM's agent reports.
func committed(t *testing.T, st daemon.VMStatus) uint64 {
	t.Helper()
	var a struct {
		CommittedEpoch uint64 `json:"committed_epoch"`
	}
	if err := json.Unmarshal(st.Agent, &a); err != nil {
		t.Fatalf("agent status of %s: %v: %s", st.Name, err, st.Agent)
	}
	return a.CommittedEpoch
}

// metrics reads GET /metrics on a daemon's control socket.
func (h *hostDaemon) metrics() string {
	h.t.Helper()
	var b []byte
	if err := agent.CallControl(context.Background(), h.control, http.MethodGet, agent.MetricsPath, 10*time.Second, &b); err != nil {
		h.t.Fatalf("GET /metrics on %s: %v", h.name, err)
	}
	return string(b)
}

// killAgents kills, at the end of a test, the agents the daemons started
// (each in a session of its own, they outlive their daemon).
func killAgents(t *testing.T, hosts ...*hostDaemon) {
	t.Cleanup(func() {
		for _, h := range hosts {
			recs, _ := filepath.Glob(filepath.Join(h.l.Dir, h.name+"-state", "vms", "*.json"))
			for _, f := range recs {
				var r struct {
					PID int `json:"pid"`
				}
				b, _ := os.ReadFile(f)
				if json.Unmarshal(b, &r) == nil && r.PID > 0 {
					if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", r.PID)); err == nil && strings.Contains(string(cmd), "remusd") {
						syscall.Kill(r.PID, syscall.SIGKILL)
					}
				}
			}
		}
	})
}

// removeDomain destroys and undefines a domain at the end of a test, if
// it exists then.
func removeDomain(t *testing.T, lv *libvirt.Libvirt, name string) {
	t.Cleanup(func() {
		d, err := lv.DomainLookupByName(name)
		if err != nil {
			return
		}
		lv.DomainDestroy(d)
		lv.DomainUndefine(d)
	})
}

// daemonGuest defines a prepared domain running the test guest, its NIC
// a -netdev stream socket, its console a pty, with meta in its
// <metadata>. Its sockets go to /run/remus/NAME, made here unless the
// hook is to make it (hook). With diskMiB, it has a raw disk of that size
// (vda), where the guest records each increment; its path is returned.
func daemonGuest(t *testing.T, lv *libvirt.Libvirt, l *lab.Lab, name, meta string, hook bool, diskMiB int) (libvirt.Domain, string) {
	t.Helper()
	return daemonGuestNIC(t, lv, l, name, meta, hook, diskMiB, true)
}

// daemonGuestNIC is daemonGuest, the guest without a NIC unless nic.
func daemonGuestNIC(t *testing.T, lv *libvirt.Libvirt, l *lab.Lab, name, meta string, hook bool, diskMiB int, nic bool) (libvirt.Domain, string) {
	t.Helper()
	dir, img := "/run/remus/"+name, "/run/remus-img-"+name
	qemuDir(t, img)
	if hook {
		t.Cleanup(func() { os.RemoveAll(dir) })
	} else {
		qemuDir(t, dir)
	}
	copyFile(t, l.Image.Kernel.Image, img+"/vmlinuz")
	copyFile(t, l.Image.Initrd, img+"/initrd")
	gc := l.GuestConfig("primary", 4000)
	var disk string
	if diskMiB > 0 {
		disk = img + "/disk.img"
		f, err := os.Create(disk)
		if err == nil {
			err = f.Truncate(int64(diskMiB) << 20)
			f.Close()
		}
		if err != nil {
			t.Fatal(err)
		}
		gc.Disk = disk
	}
	if !nic {
		gc.Guest.IP = netip.Prefix{}
	}
	xml := libvirtGuest(name, newUUID(t), dir, gc.Cmdline())
	if !nic {
		xml = regexp.MustCompile(`(?s)\s*<qemu:arg value='-netdev'/>.*?<qemu:arg value='virtio-net-pci[^']*'/>`).ReplaceAllString(xml, "")
		if strings.Contains(xml, "netdev") {
			t.Fatalf("the guest without a NIC has one:\n%s", xml)
		}
	}
	if disk != "" {
		xml = strings.Replace(xml, "  </devices>", "    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='"+disk+"'/><target dev='vda' bus='virtio'/></disk>\n  </devices>", 1)
	}
	xml = strings.Replace(xml, "<serial type='file'><source path='"+dir+"/console.log'/><target port='0'/></serial>", "<serial type='pty'/>", 1)
	xml = strings.NewReplacer(dir+"/vmlinuz", img+"/vmlinuz", dir+"/initrd", img+"/initrd").Replace(xml)
	if meta != "" {
		xml = strings.Replace(xml, "<on_poweroff>", "<metadata>"+meta+"</metadata>\n  <on_poweroff>", 1)
	}
	return libvirttest.Define(t, lv, xml), disk
}

// TestDaemonProtectsALibvirtDomain is the administrator's path with two
// remusd daemons (two "hosts" on this machine, one libvirtd): a domain
// that lacks shared RAM and an agent socket is refused with the XML that
// fixes it, untouched; remusctl protect --wait protects a prepared
// running domain (its standby domain defined and started by the peer's
// daemon), and a second one beside it, later destroyed (its backup does
// not resume it); remusctl status --json says protected on one host and standby
// on the other; both daemons restart, one killed, without a failover
// (the agents are adopted, epochs go on); /metrics has the agents'
// metrics; host b restarts (daemon, agent and standby gone) and host a's
// daemon has it stand by anew for the same primary agent; remusctl unprotect ends protection on both hosts and the guest
// runs on; protected again, host a dies (its daemon, agent and QEMU, -9)
// and the domain runs under libvirt on host b, the same boot, its client
// served, on the backup's copy of its disk, which holds every
// acknowledged write. Host a back, the guest is protected again from host
// b and switched over to host a.
func TestDaemonProtectsALibvirtDomain(t *testing.T) {
	lv := libvirttest.Require(t)
	l := newLab(t)
	run := remusctl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	a, b := startHosts(t, l, "")
	peer := b.listen
	ns := l.Net.NS.Path()
	protectArgs := []string{"protect", "--daemon", a.control, "--peer", peer, "--tap", l.Net.TapPrimary, "--peer-tap", l.Net.TapBackup,
		"--netns", ns, "--peer-netns", ns}

	// An unprepared domain is refused with the fixes and left untouched.
	raw := fmt.Sprintf("remus-raw-%d", os.Getpid())
	rd := libvirttest.Define(t, lv, libvirtDomain(raw, newUUID(t), false))
	before, _ := lv.DomainGetXMLDesc(rd, libvirt.DomainXMLInactive)
	out, code := run(append(protectArgs, raw)...)
	if code != 1 || !strings.Contains(out, "<memoryBacking>") || !strings.Contains(out, "qemu:commandline") {
		t.Fatalf("remusctl protect of an unprepared domain exited %d, want 1 with the memoryBacking and qemu:commandline fixes:\n%s", code, out)
	}
	if after, _ := lv.DomainGetXMLDesc(rd, libvirt.DomainXMLInactive); after != before {
		t.Fatalf("the refused domain's XML changed:\n%s\nwas:\n%s", after, before)
	}
	if out, code := run(append(protectArgs, "no-such-domain")...); code == 0 || !strings.Contains(out, "no such domain") {
		t.Fatalf("remusctl protect of a missing domain exited %d:\n%s", code, out)
	}

	name := fmt.Sprintf("remus-dm-%d", os.Getpid())
	d, _ := daemonGuest(t, lv, l, name, "", false, 64)
	standby := name + "-standby"
	removeDomain(t, lv, standby)
	if err := lv.DomainCreate(d); err != nil {
		t.Fatalf("start the domain: %v", err)
	}
	out, code = run(append(append(protectArgs, "--wait", "--timeout", "3m"), name)...)
	if code != 0 || !strings.Contains(out, name+": protected") {
		t.Fatalf("remusctl protect --wait exited %d:\n%s", code, out)
	}
	t.Logf("remusctl protect --wait:\n%s", out)
	pst := a.status(run, name)
	if pst.Role != daemon.RolePrimary || pst.State != daemon.StateProtected || pst.AgentPID == 0 {
		t.Fatalf("status on host a: %+v", pst)
	}
	bst := b.waitState(ctx, run, name, daemon.StateStandby)
	if bst.Role != daemon.RoleBackup || bst.Domain != standby {
		t.Fatalf("status on host b: %+v", bst)
	}
	if pv := a.status(run, name).PeerView; pv == nil || pv.Role != daemon.RoleBackup || pv.State != daemon.StateStandby || pv.Domain != standby {
		t.Fatalf("host a's view of host b: %+v", pv)
	}
	if st, _, err := lv.DomainGetState(mustLookup(t, lv, standby), 0); err != nil || libvirt.DomainState(st) != libvirt.DomainPaused {
		t.Fatalf("standby domain: state %d (%v), want paused", st, err)
	}
	if out, _ := run("status", "--daemon", a.control); !strings.Contains(out, name) || !strings.Contains(out, "protected") {
		t.Fatalf("remusctl status (all VMs) on host a:\n%s", out)
	}

	c := newConsecutiveClient(t, ctx, l)
	c.incFor(time.Second)
	boot := c.last.BootID

	// A second domain (no NIC, no disk) protected beside the first: each
	// has its agents, the backup's on ports of their own.
	name2 := name + "-2"
	d2, _ := daemonGuestNIC(t, lv, l, name2, "", false, 0, false)
	removeDomain(t, lv, name2+"-standby")
	if err := lv.DomainCreate(d2); err != nil {
		t.Fatalf("start the second domain: %v", err)
	}
	if out, code := run("protect", "--daemon", a.control, "--peer", peer, "--wait", "--timeout", "3m", name2); code != 0 {
		t.Fatalf("remusctl protect of a second domain exited %d:\n%s", code, out)
	}
	b.waitState(ctx, run, name2, daemon.StateStandby)
	out, code = run("status", "--daemon", a.control, "--json")
	var all []daemon.VMStatus
	if err := json.Unmarshal([]byte(out), &all); code != 0 || err != nil || len(all) != 2 ||
		all[0].State != daemon.StateProtected || all[1].State != daemon.StateProtected || all[0].AgentPID == all[1].AgentPID {
		t.Fatalf("host a's VMs (%v): %s", err, out)
	}
	c.incFor(time.Second)

	// A snapshot with the guest's memory is a migration remusd did not
	// start: refused, and the guest runs on, protected.
	snap := `<domainsnapshot><name>remus-test</name><memory snapshot='external' file='` + filepath.Join(l.Dir, "snap.mem") +
		`'/><disks><disk name='vda' snapshot='no'/></disks></domainsnapshot>`
	if _, err := lv.DomainSnapshotCreateXML(d, snap, uint32(libvirt.DomainSnapshotCreateNoMetadata)); err == nil {
		t.Fatal("a snapshot with memory of the protected domain succeeded")
	} else if !strings.Contains(err.Error(), "cancel") {
		t.Fatalf("the snapshot with memory failed, but not because remusd cancelled it: %v", err)
	} else {
		t.Logf("snapshot with memory refused: %v", err)
	}
	c.incFor(time.Second)
	if st := a.status(run, name); st.State != daemon.StateProtected {
		t.Fatalf("after the refused snapshot: %+v", st)
	}

	// Both daemons restart, host a's killed: the agents go on, adopted.
	epoch := committed(t, pst)
	a.proc.Kill()
	<-a.proc.Done()
	if err := b.proc.Stop(10 * time.Second); err != nil {
		t.Fatalf("host b's daemon on SIGTERM: %v", err)
	}
	c.incFor(time.Second)
	a.start()
	b.start()
	c.incFor(time.Second)
	pst2 := a.waitState(ctx, run, name, daemon.StateProtected)
	if pst2.AgentPID != pst.AgentPID || committed(t, pst2) <= epoch {
		t.Fatalf("after the daemons restarted: agent pid %d (was %d), committed epoch %d (was %d)", pst2.AgentPID, pst.AgentPID, committed(t, pst2), epoch)
	}
	if bst2 := b.status(run, name); bst2.State != daemon.StateStandby || bst2.AgentPID != bst.AgentPID {
		t.Fatalf("host b after the restart: %+v (agent was pid %d)", bst2, bst.AgentPID)
	}
	if m := a.metrics(); !strings.Contains(m, `remus_epochs_committed_total{vm="`+name+`"}`) || !strings.Contains(m, `remus_daemon_agent_up{role="primary",vm="`+name+`"} 1`) {
		t.Fatalf("host a's /metrics lacks the agent's or the daemon's metrics:\n%s", m)
	}
	if m := b.metrics(); !strings.Contains(m, `remus_backup_epochs_applied_total{vm="`+name+`"}`) {
		t.Fatalf("host b's /metrics lacks the backup agent's metrics:\n%s", m)
	}
	resp, err := http.Get("http://" + b.metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	m, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(m), `remus_daemon_agent_up{role="backup",vm="`+name+`"} 1`) {
		t.Fatalf("host b's --metrics address lacks the daemon's metrics:\n%s", m)
	}

	// The daemons adopted the second domain's agents too. It is
	// destroyed (not marked for the hook, which is not installed here):
	// its backup does not resume it, and protection ends on both hosts.
	a.waitState(ctx, run, name2, daemon.StateProtected)
	if err := lv.DomainDestroy(d2); err != nil {
		t.Fatal(err)
	}
	b.waitShutDown(ctx, name2)
	if _, err := lv.DomainLookupByName(name2 + "-standby"); err == nil {
		t.Fatal("the second domain's standby is still defined after it was destroyed")
	}
	if st := a.status(run, name2); st.State != daemon.StateEnded || !strings.Contains(st.Why, "shut down") {
		t.Fatalf("host a after the second domain was destroyed: %+v", st)
	}

	// Host b restarts (its daemon and agent killed, its standby domain
	// gone with it): host a's guest runs on unprotected, and once host b's
	// daemon is back, host a's has it stand by anew (--heal) where host
	// a's agent keeps dialing.
	bst = b.status(run, name)
	b.proc.Kill()
	syscall.Kill(bst.AgentPID, syscall.SIGKILL)
	if err := lv.DomainDestroy(mustLookup(t, lv, standby)); err != nil {
		t.Fatal(err)
	}
	a.waitState(ctx, run, name, daemon.StateUnprotected)
	c.incFor(time.Second)
	b.start()
	a.waitState(ctx, run, name, daemon.StateProtected)
	// protect given again, without its flags, finds it protected.
	out, code = run("protect", "--daemon", a.control, "--wait", name)
	if code != 0 || !strings.Contains(out, name+": protected") {
		t.Fatalf("remusctl protect of a protected VM exited %d:\n%s", code, out)
	}
	if st := a.status(run, name); st.AgentPID != pst.AgentPID {
		t.Fatalf("after host b restarted: primary agent pid %d, was %d (it should have found the new backup itself)", st.AgentPID, pst.AgentPID)
	}
	b.waitState(ctx, run, name, daemon.StateStandby)
	c.incFor(time.Second)

	// Unprotect: both hosts end it; the guest runs on here.
	out, code = run("unprotect", "--daemon", a.control, name)
	if code != 0 {
		t.Fatalf("remusctl unprotect exited %d:\n%s", code, out)
	}
	t.Logf("remusctl unprotect: %s", out)
	if _, err := lv.DomainLookupByName(standby); err == nil {
		t.Fatal("the standby domain is still defined after unprotect")
	}
	if out, code := run("status", "--daemon", b.control, "--json", name); code == 0 {
		t.Fatalf("host b still knows %s after unprotect:\n%s", name, out)
	}
	if st := a.status(run, name); st.State != daemon.StateUnprotected || st.AgentPID == 0 {
		t.Fatalf("host a after unprotect: %+v, want unprotected, its NIC relayed", st)
	}
	if syscall.Kill(pst.AgentPID, 0) == nil {
		t.Fatalf("the primary agent (pid %d) runs after unprotect", pst.AgentPID)
	}
	c.incFor(time.Second)

	// Protected again; then host a dies.
	out, code = run(append(append(protectArgs, "--wait", "--timeout", "3m"), name)...)
	if code != 0 {
		t.Fatalf("remusctl protect --wait (again) exited %d:\n%s", code, out)
	}
	b.waitState(ctx, run, name, daemon.StateStandby)
	c.incFor(time.Second)
	pst = a.status(run, name)
	pidText, err := os.ReadFile("/run/libvirt/qemu/" + name + ".pid")
	if err != nil {
		t.Fatal(err)
	}
	qpid, err := strconv.Atoi(strings.TrimSpace(string(pidText)))
	if err != nil {
		t.Fatal(err)
	}
	a.proc.Kill()
	syscall.Kill(pst.AgentPID, syscall.SIGKILL)
	syscall.Kill(qpid, syscall.SIGKILL)
	fo := b.waitState(ctx, run, name, daemon.StateFailedOver)
	c.incFor(time.Second)
	if c.last.BootID != boot {
		t.Fatalf("boot %s after the failover, want %s", c.last.BootID, boot)
	}
	checkGuestMemory(t, c.cl)
	if st, _, err := lv.DomainGetState(mustLookup(t, lv, standby), 0); err != nil || libvirt.DomainState(st) != libvirt.DomainRunning {
		t.Fatalf("standby domain after the failover: state %d (%v), want running", st, err)
	}
	// The guest runs on the backup's copy of its disk, which holds every
	// increment acknowledged, each once, of this one boot.
	img := filepath.Join(b.runDir, "images", name+"-vda.img")
	if n, err := checkRecords(img, c.last.Value, boot); err != nil {
		t.Fatalf("the disk the guest runs on after the failover: %v", err)
	} else {
		t.Logf("the backup's disk holds %d records, the last acknowledged %d", n, c.last.Value)
	}
	t.Logf("failed over: %s; %d consecutive replies, one boot", fo.Agent, c.n)

	// Host a is back: the guest is protected again from host b, host a
	// its backup now, and moved back there by a planned switchover.
	a.start()
	back := name + "-back"
	removeDomain(t, lv, back)
	out, code = run("protect", "--daemon", b.control, "--peer", a.listen, "--tap", l.Net.TapBackup, "--peer-tap", l.Net.TapPrimary,
		"--netns", ns, "--peer-netns", ns, "--wait", "--timeout", "3m", name)
	if code != 0 {
		t.Fatalf("remusctl protect on host b after the failover exited %d:\n%s", code, out)
	}
	if st := a.waitState(ctx, run, name, daemon.StateStandby); st.Domain != back {
		t.Fatalf("host a stands by with domain %s, want %s", st.Domain, back)
	}
	c.incFor(time.Second)
	out, code = run("switchover", "--daemon", b.control, name)
	if code != 0 {
		t.Fatalf("remusctl switchover exited %d:\n%s", code, out)
	}
	t.Logf("remusctl switchover: %s", out)
	a.waitState(ctx, run, name, daemon.StateFailedOver)
	if st := b.status(run, name); st.State != daemon.StateSwitchedOver {
		t.Fatalf("host b after the switchover: %+v", st)
	}
	c.incFor(time.Second)
	if c.last.BootID != boot {
		t.Fatalf("boot %s after the switchover, want %s", c.last.BootID, boot)
	}
	if st, _, err := lv.DomainGetState(mustLookup(t, lv, back), 0); err != nil || libvirt.DomainState(st) != libvirt.DomainRunning {
		t.Fatalf("host a's standby domain after the switchover: state %d (%v), want running", st, err)
	}
	if n, err := checkRecords(filepath.Join(a.runDir, "images", name+"-vda.img"), c.last.Value, boot); err != nil {
		t.Fatalf("host a's copy of the disk after the switchover: %v", err)
	} else {
		t.Logf("switched back to host a: %d records on its disk, %d consecutive replies, one boot", n, c.n)
	}
}

func mustLookup(t *testing.T, lv *libvirt.Libvirt, name string) libvirt.Domain {
	t.Helper()
	d, err := lv.DomainLookupByName(name)
	if err != nil {
		t.Fatalf("domain %s: %v", name, err)
	}
	return d
}

// TestDaemonHookProtectsAMarkedDomain installs a libvirt hook that runs
// remusctl hook, as make install does, and starts a domain marked with
// remus metadata (peer, role primary, the taps), the daemons using an etcd
// witness: the hook makes its
// socket directory as libvirt prepares it, and hands its start to the
// daemon, which protects it once it runs. virsh destroy then ends
// protection on both hosts: the guest was stopped on purpose, and the
// backup does not resume it.
func TestDaemonHookProtectsAMarkedDomain(t *testing.T) {
	lv := libvirttest.Require(t)
	l := newLab(t)
	bin := remusctlBinary(t)
	run := remusctlRunner(t, bin)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	w, err := l.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, b := startHosts(t, l, w.Endpoint)
	installHook(t, "#!/bin/sh\nexec "+bin+" hook --daemon "+a.control+" \"$@\"\n")

	name := fmt.Sprintf("remus-hook-%d", os.Getpid())
	ns := l.Net.NS.Path()
	meta := fmt.Sprintf(`<remus:protect xmlns:remus="https://remus-kvm.org/xmlns/domain/1.0" peer="%s" role="primary" tap="%s" peer-tap="%s" netns="%s" peer-netns="%s"/>`,
		b.listen, l.Net.TapPrimary, l.Net.TapBackup, ns, ns)
	d, _ := daemonGuest(t, lv, l, name, meta, true, 0)
	removeDomain(t, lv, name+"-standby")
	if err := lv.DomainCreate(d); err != nil {
		t.Fatalf("virsh start of the marked domain: %v", err)
	}
	st := a.waitState(ctx, run, name, daemon.StateProtected)
	b.waitState(ctx, run, name, daemon.StateStandby)
	var ps struct {
		Witness string `json:"witness_id"`
		Owner   string `json:"witness_owner"`
	}
	if err := json.Unmarshal(st.Agent, &ps); err != nil || ps.Witness != "host-a" || ps.Owner != "host-a" {
		t.Fatalf("the primary agent's witness: %+v (%v), want host-a holding the guest: %s", ps, err, st.Agent)
	}
	c := newConsecutiveClient(t, ctx, l)
	c.incFor(time.Second)

	// virsh destroy: QEMU shuts down on SIGTERM (a deliberate shutdown,
	// as virsh shutdown's): the backup must not resume the guest, and
	// protection ends on both hosts.
	if err := lv.DomainDestroy(d); err != nil {
		t.Fatal(err)
	}
	b.waitShutDown(ctx, name)
	if _, err := lv.DomainLookupByName(name + "-standby"); err == nil {
		t.Fatal("the standby domain is still defined after the protected domain was destroyed")
	}
	st = a.status(run, name)
	if st.State != daemon.StateEnded || !strings.Contains(st.Why, "shut down") {
		t.Fatalf("host a after virsh destroy: %+v, want ended, shut down", st)
	}
	t.Logf("after virsh destroy: %s (%s)", st.State, st.Why)
}

// installHook installs script as a libvirt qemu hook
// (/etc/libvirt/hooks/qemu.d) for the test and has libvirtd reload its
// hooks (SIGHUP); both undone at the end.
func installHook(t *testing.T, script string) {
	t.Helper()
	dir := "/etc/libvirt/hooks/qemu.d"
	if _, err := os.Stat(dir); os.IsNotExist(err) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(dir) })
	}
	path := filepath.Join(dir, fmt.Sprintf("remus-test-%d", os.Getpid()))
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	reloadLibvirtd(t)
	t.Cleanup(func() {
		os.Remove(path)
		reloadLibvirtd(t)
	})
}

// reloadLibvirtd sends libvirtd SIGHUP (it reloads its hooks) and waits
// until it answers again. A libvirtd that does not run (socket-activated,
// it exits when idle) reads its hooks when it starts.
func reloadLibvirtd(t *testing.T) {
	t.Helper()
	b, err := os.ReadFile("/run/libvirtd.pid")
	if err != nil {
		b, _ = exec.Command("pidof", "libvirtd").Output()
	}
	if pid := libvirtdPID(b); pid > 0 {
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil && err != syscall.ESRCH {
			t.Fatalf("SIGHUP libvirtd: %v", err)
		}
		time.Sleep(time.Second)
	}
	if err := libvirttest.Start(time.Minute); err != nil {
		t.Fatal(err)
	}
}

// libvirtdPID reads a pid (pid file or pidof) that is libvirtd's, 0 when
// it is none (a stale pid file, no libvirtd).
func libvirtdPID(b []byte) int {
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return 0
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "libvirtd" {
		return 0
	}
	return pid
}

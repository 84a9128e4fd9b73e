package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/libvirtdom"
	"github.com/remus-kvm/remus/qmp"
)

// agentStateDir is a VM's agent's state directory (on the run
// directory's tmpfs): its device state, deadman marker, control socket.
func (d *Daemon) agentStateDir(name string) string {
	return filepath.Join(d.cfg.RunDir, ".agents", name)
}

// Protect protects the running domain name with the peer req.Peer as its
// backup host: checks the domain, has the peer stand by (standby domain
// and backup agent) and starts the primary agent. It returns once the
// agent runs; the first sync then goes on (VMStatus.State syncing).
//
// A guest that runs here unprotected (after unprotect, or on the backup
// host after a failover) is protected again the same way; its NIC's
// relay hands over to the primary agent, and back when protecting fails.
func (d *Daemon) Protect(ctx context.Context, name string, req ProtectRequest) (VMStatus, error) {
	d.ops.Lock()
	defer d.ops.Unlock()
	domain := name
	var relayed *record
	if v := d.get(name); v != nil {
		r := v.snapshot()
		switch {
		case r.Relay || r.Role == RoleBackup && d.runs(ctx, r.Domain):
			// Unprotected here, or failed over to here: the new primary
			// agent takes over the NIC.
			d.stopAgent(v)
			d.forget(name)
			d.freePort(r.AgentPort)
			domain, relayed = r.Domain, &r
		case v.alive() && r.Role == RolePrimary:
			st := d.status(ctx, v)
			if st.State != StateUnprotected {
				return st, nil // protected already, or on its way: nothing to do
			}
			// Its backup is gone (that host restarted, its standby
			// ended): the peer stands by again, and the agent, which
			// keeps dialing its backup, finds the new one.
			return d.protect(ctx, name, r.Domain, mergeRequest(req, r.Request), v)
		case v.alive():
			return VMStatus{}, errorf(http.StatusConflict, "%s: this host is its backup (domain %s): protect it from its primary host", name, r.Domain)
		default:
			d.forget(name)
		}
	}
	st, err := d.protect(ctx, name, domain, req, nil)
	if err != nil && relayed != nil && len(relayed.NetArgs) > 0 {
		if rerr := d.startRelay(name, domain, relayed.Peer, relayed.NetArgs, "protecting it again failed"); rerr != nil {
			d.log.Error("the guest's NIC is not relayed", "vm", name, "err", rerr)
		}
	}
	return st, err
}

// runs reports whether a domain runs.
func (d *Daemon) runs(ctx context.Context, domain string) bool {
	st, err := d.hv.domainState(ctx, domain)
	return err == nil && st == libvirt.DomainRunning
}

// heal protects again, every Config.Heal, each primary whose agent runs
// without a backup (its host restarted, its standby ended), seen so twice
// in a row: the peer is
// asked to stand by again, as remusctl protect does. A peer that cannot
// (unreachable, or running the guest itself) is asked again next time.
func (d *Daemon) heal(ctx context.Context) {
	t := time.NewTicker(d.cfg.Heal)
	defer t.Stop()
	// A primary is healed when it was seen unprotected twice in a row:
	// a session that is starting says unprotected for a moment.
	seen := map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		was := seen
		seen = map[string]bool{}
		for _, v := range d.list() {
			r := v.snapshot()
			if r.Role != RolePrimary || r.Relay || !r.Wanted || !v.alive() {
				continue
			}
			if st := d.status(ctx, v); st.State != StateUnprotected {
				continue
			}
			if seen[r.Name] = true; !was[r.Name] {
				continue
			}
			if _, err := d.Protect(ctx, r.Name, ProtectRequest{}); err != nil {
				d.log.Info("a primary without a backup: its peer cannot stand by yet", "vm", r.Name, "peer", r.Peer, "err", err)
			} else {
				d.log.Info("a primary without a backup: its peer stands by again", "vm", r.Name, "peer", r.Peer)
			}
		}
	}
}

// mergeRequest fills what req leaves out from an earlier request.
func mergeRequest(req, earlier ProtectRequest) ProtectRequest {
	if req.Peer == "" {
		req.Peer = earlier.Peer
	}
	if req.Epoch == 0 {
		req.Epoch = earlier.Epoch
	}
	for _, f := range []struct{ to, from *string }{{&req.Tap, &earlier.Tap}, {&req.PeerTap, &earlier.PeerTap},
		{&req.Netns, &earlier.Netns}, {&req.PeerNetns, &earlier.PeerNetns}} {
		if *f.to == "" {
			*f.to = *f.from
		}
	}
	return req
}

// protect protects domain (the VM name's domain here). existing, when
// set, is the VM's primary agent, running but without a backup: it is
// kept when the peer's new backup agent listens where it dials.
func (d *Daemon) protect(ctx context.Context, name, domain string, req ProtectRequest, existing *vm) (VMStatus, error) {
	if req.Peer == "" {
		return VMStatus{}, errorf(http.StatusBadRequest, "%s: no peer: name the backup host's remusd (HOST or HOST:PORT)", name)
	}
	peer, err := d.peer(req.Peer)
	if err != nil {
		return VMStatus{}, err
	}

	// The live XML (an inactive domain's is its definition) is checked
	// first: a domain with problems hears of all of them at once.
	live, err := d.hv.domainXML(ctx, domain, false)
	if errors.Is(err, errNoDomain) {
		return VMStatus{}, errorf(http.StatusNotFound, "%v", err)
	} else if err != nil {
		return VMStatus{}, errorf(http.StatusServiceUnavailable, "%v", err)
	}
	dom, problems, err := libvirtdom.Check(live, libvirtdom.CheckOptions{})
	if err != nil {
		return VMStatus{}, errorf(http.StatusConflict, "%v", err)
	}
	if bad := libvirtdom.Blocking(problems); len(bad) > 0 {
		return VMStatus{}, &httpError{code: http.StatusConflict, err: errors.New("refused"), body: Refusal{
			Error:    fmt.Sprintf("domain %s cannot be protected: %d problem(s) in its definition; it was left as it is", domain, len(bad)),
			Problems: bad}}
	}
	st, err := d.hv.domainState(ctx, domain)
	if err != nil {
		return VMStatus{}, errorf(http.StatusServiceUnavailable, "%v", err)
	}
	if st != libvirt.DomainRunning {
		return VMStatus{}, errorf(http.StatusConflict, "domain %s is %s: protect a running domain (virsh start %s)", domain, stateName(st), domain)
	}
	if err := d.safety(); err != nil {
		return VMStatus{}, err
	}
	netArgs, plug, err := d.primaryNet(dom, req)
	if err != nil {
		return VMStatus{}, err
	}
	var disk *StandbyDisk
	for _, dk := range dom.Disks {
		if !dk.Writable() {
			continue
		}
		if !strings.HasPrefix(dk.Source, "/") {
			return VMStatus{}, errorf(http.StatusConflict, "domain %s: disk %s is %s (a %s disk): remusd mirrors a disk with a file or block device as its source", domain, dk.Target, dk.Source, dk.Type)
		}
		capacity, err := d.hv.diskCapacity(ctx, domain, dk.Target)
		if err != nil {
			return VMStatus{}, errorf(http.StatusServiceUnavailable, "%v", err)
		}
		disk = &StandbyDisk{Target: dk.Target, Capacity: capacity}
		plug = append(plug, "--disk", dk.Source) // Check allows one writable disk
	}
	inactive, err := d.hv.domainXML(ctx, domain, true)
	if err != nil {
		return VMStatus{}, errorf(http.StatusServiceUnavailable, "%v", err)
	}

	var theirs Hello
	if err := peer.call(ctx, http.MethodGet, pathHello, nil, &theirs); err != nil {
		return VMStatus{}, errorf(http.StatusBadGateway, "backup host unreachable: %v", err)
	}
	if theirs.Host == d.cfg.Host {
		return VMStatus{}, errorf(http.StatusBadRequest, "peer %s is this host (%s): name the backup host", req.Peer, d.cfg.Host)
	}
	if theirs.API != APIVersion {
		return VMStatus{}, errorf(http.StatusConflict, "remusd on %s speaks peer API %d, this one %d: run the same remus-kvm on both hosts", theirs.Host, theirs.API, APIVersion)
	}
	var qv string
	if existing != nil {
		qv = existing.snapshot().QEMUVersion // its agent holds the socket
	} else if qv, err = qemuVersion(ctx, dom.AgentQMP); err != nil {
		return VMStatus{}, errorf(http.StatusConflict, "domain %s: %v", domain, err)
	}
	var rep StandbyReply
	if err := peer.call(ctx, http.MethodPost, pathStandby, StandbyRequest{VM: name, XML: inactive, Primary: d.cfg.Host,
		QEMUVersion: qv, DeviceStateXen: true, Tap: req.PeerTap, Netns: req.PeerNetns, Disk: disk}, &rep); err != nil {
		return VMStatus{}, errorf(http.StatusBadGateway, "standby on %s: %v", theirs.Host, err)
	}
	host, _, _ := splitPeer(req.Peer)
	backup := net.JoinHostPort(host, strconv.Itoa(rep.AgentPort))
	if existing != nil {
		if slices.Contains(existing.snapshot().Args, backup) {
			d.log.Info("standing by again for an agent that lost its backup", "vm", name, "peer", req.Peer, "backup_agent", backup)
			return d.status(ctx, existing), nil
		}
		// The new backup listens elsewhere: a new agent dials it.
		d.stopAgent(existing)
		d.forget(name)
	}
	sdir := d.agentStateDir(name)
	os.RemoveAll(sdir)
	args := append([]string{"primary", "--vm", name, "--qmp", dom.AgentQMP, "--peer", backup,
		"--state-dir", sdir, "--control", agent.DefaultControlSocket(sdir), "--device-state", "xen"}, append(netArgs, plug...)...)
	if req.Epoch > 0 {
		args = append(args, "--epoch", req.Epoch.String())
	}
	args = append(args, d.cfg.AgentArgs...)
	v := &vm{rec: record{Name: name, Role: RolePrimary, Domain: domain, Peer: req.Peer, Request: req, QEMUVersion: qv, Args: args, NetArgs: netArgs,
		Control: agent.DefaultControlSocket(sdir), StateDir: sdir, Wanted: true}}
	d.mu.Lock()
	d.vms[name] = v
	d.mu.Unlock()
	if err := d.startAgent(v); err != nil {
		d.forget(name)
		peer.call(context.WithoutCancel(ctx), http.MethodPost, pathRelease, ReleaseRequest{VM: name}, nil)
		return VMStatus{}, err
	}
	if err := d.save(v); err != nil {
		return VMStatus{}, err
	}
	d.log.Info("protecting", "vm", name, "peer", req.Peer, "standby", rep.Domain, "backup_agent_port", rep.AgentPort)
	return d.status(ctx, v), nil
}

// safety refuses protection without a witness, a fence command or the
// operator's word that the hosts fail-stop.
func (d *Daemon) safety() error {
	for _, a := range d.cfg.AgentArgs {
		if a == "--witness" || a == "--assume-fail-stop" {
			return nil
		}
	}
	return errorf(http.StatusConflict, "no witness configured (witness = [\"http://ETCD:2379\"] in remusd.toml) and fail-stop not assumed (assume-fail-stop = true): a partition between the hosts could leave two live guests")
}

// primaryNet returns the primary agent's network arguments: a NIC that
// is a -netdev stream socket is relayed to req.Tap (net, which a relay
// takes over while the guest runs unprotected: relay); a tap NIC's output
// is held with sch_plug (plug).
func (d *Daemon) primaryNet(dom *libvirtdom.Domain, req ProtectRequest) (relay, plug []string, err error) {
	switch {
	case dom.NetSocket != "" && len(dom.NICs) > 0:
		return nil, nil, errorf(http.StatusConflict, "domain %s has a -netdev stream NIC and %d <interface>s: remusd holds the output of one NIC", dom.Name, len(dom.NICs))
	case dom.NetSocket != "":
		if req.Tap == "" || req.PeerTap == "" {
			return nil, nil, errorf(http.StatusBadRequest, "domain %s: its NIC is the socket %s, which remusd relays to a tap on each host: name them (remusctl protect --tap TAP --peer-tap TAP)", dom.Name, dom.NetSocket)
		}
		return netArgs(dom.NetSocket, req.Tap, req.Netns), nil, nil
	case len(dom.NICs) == 1:
		if dom.NICs[0].Tap == "" {
			return nil, nil, errorf(http.StatusConflict, "domain %s: its NIC has no tap device in the live XML", dom.Name)
		}
		return nil, []string{"--net-plug-tap", dom.NICs[0].Tap}, nil
	}
	return nil, nil, nil
}

// netArgs are an agent's arguments for relaying the NIC socket sock to
// tap (in the network namespace netns, "" for the agent's own).
func netArgs(sock, tap, netns string) []string {
	args := []string{"--net-guest", sock, "--net-tap", tap}
	if netns != "" {
		args = append(args, "--net-netns", netns)
	}
	return args
}

// startRelay starts remusd relay for a guest that runs here unprotected,
// its NIC a socket: without it the guest has no network.
func (d *Daemon) startRelay(name, domain, peer string, nic []string, why string) error {
	v := &vm{rec: record{Name: name, Role: RolePrimary, Domain: domain, Peer: peer, Relay: true, NetArgs: nic,
		Args: append([]string{"relay", "--vm", name}, nic...), StateDir: d.agentStateDir(name), Wanted: true}}
	d.mu.Lock()
	d.vms[name] = v
	d.mu.Unlock()
	if err := d.startAgent(v); err != nil {
		return err
	}
	// startAgent clears why an earlier agent ended; a relay's status says
	// why the guest is unprotected.
	v.mu.Lock()
	v.rec.EndState, v.rec.Ended = StateUnprotected, why
	v.mu.Unlock()
	return d.save(v)
}

// replaceWithRelay has a relay take over the NIC of v's guest, which
// runs here unprotected.
func (d *Daemon) replaceWithRelay(v *vm, why string) {
	d.ops.Lock()
	defer d.ops.Unlock()
	r := v.snapshot()
	if d.get(r.Name) != v {
		return
	}
	d.stopAgent(v)
	d.forget(r.Name)
	d.freePort(r.AgentPort)
	if err := d.startRelay(r.Name, r.Domain, r.Peer, r.NetArgs, why); err != nil {
		d.log.Error("the guest's NIC is not relayed", "vm", r.Name, "err", err)
	}
}

// Standby makes this host the backup of a VM: defines and starts its
// standby domain (paused, waiting) and starts the backup agent.
func (d *Daemon) Standby(ctx context.Context, req StandbyRequest) (StandbyReply, error) {
	d.ops.Lock()
	defer d.ops.Unlock()
	if req.VM == "" || strings.ContainsAny(req.VM, "/\x00") {
		return StandbyReply{}, errorf(http.StatusBadRequest, "VM name %q", req.VM)
	}
	sname := strings.ReplaceAll(d.cfg.StandbyName, "{name}", req.VM)
	prefer := 0
	if v := d.get(req.VM); v != nil {
		r := v.snapshot()
		if r.Role != RoleBackup && (v.alive() || d.runs(ctx, r.Domain)) {
			return StandbyReply{}, errorf(http.StatusConflict, "%s runs on %s as primary", req.VM, d.cfg.Host)
		}
		if r.Role != RoleBackup {
			// Its guest ran here and runs no more (the other host took
			// it over): this host becomes its backup.
			d.log.Info("the VM's guest runs elsewhere now: standing by for it", "vm", req.VM, "was", r.Ended)
			d.forget(req.VM)
		} else if st, err := d.hv.domainState(ctx, r.Domain); v.alive() && err == nil && st == libvirt.DomainPaused {
			return StandbyReply{AgentPort: r.AgentPort, Domain: r.Domain}, nil // standing by already
		} else if err == nil && st == libvirt.DomainRunning {
			return StandbyReply{}, errorf(http.StatusConflict, "%s runs on %s (domain %s, failed over): it cannot stand by for another copy", req.VM, d.cfg.Host, r.Domain)
		} else {
			d.stopAgent(v)
			d.forget(req.VM)
			d.freePort(r.AgentPort)
			prefer = r.AgentPort // where the primary agent may still dial
		}
	}
	// libvirt must answer before anything is made for the standby.
	if _, _, err := d.hv.versions(ctx); err != nil {
		return StandbyReply{}, errorf(http.StatusServiceUnavailable, "libvirt on %s: %v", d.cfg.Host, err)
	}
	dom, problems, err := libvirtdom.Check(req.XML, libvirtdom.CheckOptions{})
	if err != nil {
		return StandbyReply{}, errorf(http.StatusBadRequest, "%v", err)
	}
	if err := d.clearStandby(ctx, sname, dom.UUID); err != nil {
		return StandbyReply{}, err
	}
	if bad := libvirtdom.Blocking(problems); len(bad) > 0 {
		return StandbyReply{}, errorf(http.StatusConflict, "domain %s: %s", req.VM, bad[0].Message)
	}
	qdir := filepath.Join(d.cfg.RunDir, sname)
	if err := d.qemuDir(qdir); err != nil {
		return StandbyReply{}, err
	}
	paths := map[string]string{}
	if pd := filepath.Dir(dom.AgentQMP); pd != qdir {
		paths[pd] = qdir
	}
	if dom.NetSocket != "" {
		if nd := filepath.Dir(dom.NetSocket); nd != qdir {
			paths[nd] = qdir
		}
	}
	opts := libvirtdom.StandbyOptions{AgentQMP: filepath.Join(qdir, filepath.Base(dom.AgentQMP)), Peer: req.Primary,
		DeviceStateXen: req.DeviceStateXen, ArgPaths: paths}
	var image string
	if req.Disk != nil {
		if image, err = d.diskImage(req.VM, *req.Disk); err != nil {
			return StandbyReply{}, err
		}
		opts.DiskPaths = map[string]string{req.Disk.Target: image}
	}
	if sname != req.VM {
		opts.Name, opts.UUID = sname, uuid.NewString()
	}
	sxml, err := libvirtdom.Standby(req.XML, opts)
	if err != nil {
		removeImage(image)
		return StandbyReply{}, errorf(http.StatusConflict, "%v", err)
	}
	port, err := d.allocPort(prefer)
	if err != nil {
		removeImage(image)
		return StandbyReply{}, err
	}
	fail := func(err error) (StandbyReply, error) {
		d.freePort(port)
		d.hv.remove(context.WithoutCancel(ctx), sname)
		removeImage(image)
		return StandbyReply{}, err
	}
	if err := d.hv.defineAndStart(ctx, sxml); err != nil {
		return fail(errorf(http.StatusConflict, "standby domain %s on %s: %v", sname, d.cfg.Host, err))
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := d.hv.waitState(wctx, sname, libvirt.DomainPaused, 100*time.Millisecond); err != nil {
		return fail(errorf(http.StatusConflict, "standby domain %s does not wait for the device state: %v", sname, err))
	}
	if err := waitFile(wctx, opts.AgentQMP); err != nil {
		return fail(errorf(http.StatusConflict, "standby domain %s: no agent socket %s: %v", sname, opts.AgentQMP, err))
	}
	// The standby loads the primary's device state: the same QEMU.
	sv, err := qemuVersion(wctx, opts.AgentQMP)
	if err != nil {
		return fail(errorf(http.StatusConflict, "standby domain %s: %v", sname, err))
	}
	if req.QEMUVersion != "" && sv != req.QEMUVersion {
		return fail(errorf(http.StatusConflict, "QEMU versions differ: %s runs the guest on the primary, %s the standby domain %s on %s: the standby must run the primary's QEMU (its device state format)",
			req.QEMUVersion, sv, sname, d.cfg.Host))
	}
	sdir := d.agentStateDir(req.VM)
	os.RemoveAll(sdir)
	args := []string{"backup", "--vm", req.VM, "--listen", ":" + strconv.Itoa(port), "--standby-qmp", opts.AgentQMP,
		"--state-dir", sdir, "--control", agent.DefaultControlSocket(sdir), "--report", filepath.Join(sdir, "failover.json")}
	var nic []string
	if dom.NetSocket != "" {
		if req.Tap == "" {
			return fail(errorf(http.StatusBadRequest, "domain %s: its NIC is a socket remusd relays: name the backup host's tap (--peer-tap)", req.VM))
		}
		// The standby's NIC socket, where its XML has it.
		nic = netArgs(libvirtdom.RewritePaths([]string{dom.NetSocket}, paths)[0], req.Tap, req.Netns)
	}
	if image != "" {
		args = append(args, "--disk-image", image)
	}
	args = append(append(append(args, nic...), d.cfg.AgentArgs...), d.cfg.BackupArgs...)
	v := &vm{rec: record{Name: req.VM, Role: RoleBackup, Domain: sname, Peer: req.Primary, Args: args, AgentPort: port, NetArgs: nic, DiskImage: image,
		Control: agent.DefaultControlSocket(sdir), StateDir: sdir, Wanted: true}}
	d.mu.Lock()
	d.vms[req.VM] = v
	d.mu.Unlock()
	if err := d.startAgent(v); err != nil {
		d.forget(req.VM)
		return fail(err)
	}
	if err := d.save(v); err != nil {
		return StandbyReply{}, err
	}
	d.log.Info("standing by", "vm", req.VM, "primary", req.Primary, "standby_domain", sname, "agent_port", port)
	return StandbyReply{AgentPort: port, Domain: sname}, nil
}

// clearStandby makes room for a standby domain named sname: an earlier
// standby of that name (remus metadata, role standby) that does not run
// the guest, or the guest's own domain (uuid) that no longer runs here
// (after a failover to the other host), is removed; any other domain of
// that name is a conflict.
func (d *Daemon) clearStandby(ctx context.Context, sname, uuid string) error {
	xml, err := d.hv.domainXML(ctx, sname, false)
	if errors.Is(err, errNoDomain) {
		return nil
	} else if err != nil {
		return errorf(http.StatusServiceUnavailable, "%v", err)
	}
	m, ok, _ := libvirtdom.ParseMetadata(xml)
	st, err := d.hv.domainState(ctx, sname)
	if err != nil {
		return errorf(http.StatusServiceUnavailable, "%v", err)
	}
	standby := ok && m.Role == libvirtdom.RoleStandby && st != libvirt.DomainRunning
	stale := !active(st) && strings.EqualFold(domainUUID(xml), uuid)
	if !standby && !stale {
		return errorf(http.StatusConflict, "a domain %s (%s) exists on %s and is not a waiting standby: remove it or choose another standby-name", sname, stateName(st), d.cfg.Host)
	}
	d.log.Info("removing an earlier standby domain, or the guest's own that no longer runs here", "domain", sname, "state", stateName(st))
	return d.hv.remove(ctx, sname)
}

// domainUUID is the UUID of a domain's XML, "" when it has none.
func domainUUID(xml string) string {
	dom, _, err := libvirtdom.Check(xml, libvirtdom.CheckOptions{})
	if err != nil {
		return ""
	}
	return dom.UUID
}

// Release ends standing by for a VM: its backup agent is stopped and its
// standby domain removed, unless that domain runs the guest.
func (d *Daemon) Release(ctx context.Context, name string) (Result, error) {
	d.ops.Lock()
	defer d.ops.Unlock()
	return d.release(ctx, name)
}

func (d *Daemon) release(ctx context.Context, name string) (Result, error) {
	start := d.clock()
	v := d.get(name)
	if v == nil {
		return Result{Result: fmt.Sprintf("%s: %s does not stand by for it", name, d.cfg.Host), Complete: true}, nil
	}
	r := v.snapshot()
	if r.Role != RoleBackup {
		return Result{}, errorf(http.StatusConflict, "%s runs on %s as primary", name, d.cfg.Host)
	}
	st, err := d.hv.domainState(ctx, r.Domain)
	if err == nil && st == libvirt.DomainRunning {
		return Result{}, errorf(http.StatusConflict, "%s: its standby domain %s on %s runs the guest (failed over): left as it is", name, r.Domain, d.cfg.Host)
	}
	if vs := d.status(ctx, v); vs.State == StateFailingOver || vs.State == StateFailedOver {
		return Result{}, errorf(http.StatusConflict, "%s: the backup agent on %s is %s: left as it is", name, d.cfg.Host, vs.State)
	}
	d.stopAgent(v)
	if err := d.hv.remove(ctx, r.Domain); err != nil {
		return Result{}, errorf(http.StatusServiceUnavailable, "%s: remove standby domain %s: %v", name, r.Domain, err)
	}
	d.forget(name)
	d.freePort(r.AgentPort)
	os.RemoveAll(r.StateDir)
	removeImage(r.DiskImage)
	d.log.Info("no longer standing by", "vm", name, "standby_domain", r.Domain)
	return Result{Result: fmt.Sprintf("%s: the backup agent on %s stopped and the standby domain %s removed", name, d.cfg.Host, r.Domain),
		Complete: true, TookMS: ms(d.clock().Sub(start))}, nil
}

// stopAgent stops v's agent (SIGTERM; SIGKILL after 20 s) and waits for
// it to exit; it is not started again.
func (d *Daemon) stopAgent(v *vm) {
	v.mu.Lock()
	v.rec.Wanted = false
	pid, exited := v.rec.PID, v.exited
	v.mu.Unlock()
	d.save(v)
	if exited == nil || pid <= 0 {
		return
	}
	select {
	case <-exited:
		return
	default:
	}
	syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		d.log.Warn("agent does not stop: killing it", "vm", v.snapshot().Name, "pid", pid)
		syscall.Kill(pid, syscall.SIGKILL)
		<-exited
	}
}

// Unprotect ends a VM's protection: on its primary host the agent ends
// its session (the backup confirms it will not resume the guest), then
// the peer removes the standby; on its backup host (the primary is gone)
// the standby is removed unless it runs the guest.
func (d *Daemon) Unprotect(ctx context.Context, name string) (Result, error) {
	d.ops.Lock()
	defer d.ops.Unlock()
	start := d.clock()
	v := d.get(name)
	if v == nil {
		return Result{}, errorf(http.StatusNotFound, "%s: not protected by remusd on %s", name, d.cfg.Host)
	}
	r := v.snapshot()
	switch {
	case r.Relay:
		return Result{Result: fmt.Sprintf("%s: not protected (%s)", name, r.Ended), Complete: true}, nil
	case r.Role == RoleBackup && d.runs(ctx, r.Domain):
		// Failed over to here: the guest runs on here, unprotected.
		d.stopAgent(v)
		d.forget(name)
		d.freePort(r.AgentPort)
		msg := fmt.Sprintf("%s: the guest runs here (domain %s), unprotected", name, r.Domain)
		if len(r.NetArgs) > 0 {
			if err := d.startRelay(name, r.Domain, r.Peer, r.NetArgs, "protection ended (unprotect after a failover)"); err != nil {
				return Result{Result: msg + "; its NIC is not relayed: " + err.Error()}, nil
			}
		}
		return Result{Result: msg, Complete: true, TookMS: ms(d.clock().Sub(start))}, nil
	case r.Role == RoleBackup:
		return d.release(ctx, name)
	}
	var out []string
	complete := true
	v.mu.Lock()
	v.rec.Wanted = false
	v.mu.Unlock()
	d.save(v)
	if v.alive() {
		var ur agent.UnprotectResult
		if err := agent.CallControl(ctx, r.Control, http.MethodPost, agent.ControlUnprotectPath, time.Minute, &ur); err != nil {
			out = append(out, fmt.Sprintf("the primary agent did not answer (%v): stopped", err))
			complete = false
		} else {
			out = append(out, ur.Result)
			complete = complete && ur.Confirmed
		}
		d.stopAgent(v)
	}
	if p, err := d.peer(r.Peer); err == nil {
		var res Result
		if err := p.call(ctx, http.MethodPost, pathRelease, ReleaseRequest{VM: name}, &res); err != nil {
			out = append(out, fmt.Sprintf("the backup host's standby was not removed: %v", err))
			complete = false
		} else {
			out = append(out, res.Result)
		}
	}
	d.forget(name)
	if len(r.NetArgs) > 0 && d.runs(ctx, r.Domain) {
		if err := d.startRelay(name, r.Domain, r.Peer, r.NetArgs, "protection ended (remusctl unprotect)"); err != nil {
			out = append(out, "the guest's NIC is not relayed: "+err.Error())
			complete = false
		}
	}
	return Result{Result: strings.Join(out, "; "), Complete: complete, TookMS: ms(d.clock().Sub(start))}, nil
}

// Switchover moves a protected VM to its backup host with nothing lost.
func (d *Daemon) Switchover(ctx context.Context, name string) (Result, error) {
	d.ops.Lock()
	defer d.ops.Unlock()
	v := d.get(name)
	if v == nil {
		return Result{}, errorf(http.StatusNotFound, "%s: not protected by remusd on %s", name, d.cfg.Host)
	}
	r := v.snapshot()
	if r.Role != RolePrimary {
		return Result{}, errorf(http.StatusConflict, "%s: %s is its backup: run the switchover on its primary host", name, d.cfg.Host)
	}
	if !v.alive() {
		return Result{}, errorf(http.StatusConflict, "%s: its agent does not run (%s)", name, r.Ended)
	}
	// Marked before the agent is asked: it exits as soon as it answered.
	v.mu.Lock()
	v.rec.Wanted, v.rec.EndState, v.rec.Ended = false, StateSwitchedOver, "switched over to "+r.Peer
	v.mu.Unlock()
	d.save(v)
	var sr agent.SwitchoverResult
	if err := agent.CallControl(ctx, r.Control, http.MethodPost, agent.ControlSwitchoverPath, time.Minute, &sr); err != nil {
		v.mu.Lock()
		v.rec.Wanted, v.rec.EndState, v.rec.Ended = true, "", ""
		v.mu.Unlock()
		d.save(v)
		return Result{}, errorf(http.StatusConflict, "%s: %v", name, err)
	}
	return Result{Result: sr.Result, Complete: true, TookMS: sr.TookMS}, nil
}

// qemuDir makes dir for libvirt's QEMU (owned by cfg.QEMUUser).
func (d *Daemon) qemuDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	if d.cfg.QEMUUser == "" {
		return nil
	}
	u, err := user.Lookup(d.cfg.QEMUUser)
	if err != nil {
		return fmt.Errorf("socket directory %s: QEMU's user: %w", dir, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	return nil
}

// allocPort returns a free port of the agent range, prefer if it is one.
func (d *Daemon) allocPort(prefer int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ports := []int{}
	if prefer >= d.cfg.AgentPorts[0] && prefer <= d.cfg.AgentPorts[1] {
		ports = append(ports, prefer)
	}
	for p := d.cfg.AgentPorts[0]; p <= d.cfg.AgentPorts[1]; p++ {
		ports = append(ports, p)
	}
	for _, p := range ports {
		if d.ports[p] {
			continue
		}
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		ln.Close()
		d.ports[p] = true
		return p, nil
	}
	return 0, errorf(http.StatusServiceUnavailable, "no free port for a backup agent in %d-%d", d.cfg.AgentPorts[0], d.cfg.AgentPorts[1])
}

func (d *Daemon) freePort(p int) {
	d.mu.Lock()
	delete(d.ports, p)
	d.mu.Unlock()
}

// diskImage makes the backup's copy of a guest's disk: a new sparse raw
// image of its capacity (all zeroes: the primary's first copy skips what
// reads as zeroes), in ImagesDir, which libvirt's QEMU can reach.
func (d *Daemon) diskImage(vm string, disk StandbyDisk) (string, error) {
	if disk.Target == "" || strings.ContainsAny(disk.Target, "/\x00") || disk.Capacity == 0 {
		return "", errorf(http.StatusBadRequest, "disk %q of %d bytes", disk.Target, disk.Capacity)
	}
	if err := os.MkdirAll(d.cfg.ImagesDir, 0o711); err != nil {
		return "", fmt.Errorf("disk image: %w", err)
	}
	img := filepath.Join(d.cfg.ImagesDir, vm+"-"+disk.Target+".img")
	os.Remove(img)
	f, err := os.OpenFile(img, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("disk image: %w", err)
	}
	err = f.Truncate(int64(disk.Capacity))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(img)
		return "", fmt.Errorf("disk image %s: %w", img, err)
	}
	return img, nil
}

// removeImage removes a backup's disk image that no guest runs on.
func removeImage(path string) {
	if path != "" {
		os.Remove(path)
	}
}

// qemuVersion asks the QEMU behind an agent QMP socket for its version
// (MAJOR.MINOR.MICRO), before the agent connects: the socket takes one
// client at a time.
func qemuVersion(ctx context.Context, socket string) (string, error) {
	// A socket that has a client already (an agent) accepts and says
	// nothing: bounded.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	mon, err := qmp.Dial(ctx, socket)
	if err != nil {
		return "", fmt.Errorf("QEMU's version: %w", err)
	}
	defer mon.Close()
	v := mon.Version()
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro), nil
}

// waitFile waits for path to exist.
func waitFile(ctx context.Context, path string) error {
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

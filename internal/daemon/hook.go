package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/remus-kvm/remus/libvirtdom"
)

// Hook handles an event of libvirt's qemu hook (/etc/libvirt/hooks/qemu.d/remus,
// which runs remusctl hook) for a domain marked with remus metadata. It
// answers at once and never calls into libvirt before answering: libvirt
// waits for its hooks with the domain locked.
//
//	prepare begin   the directories of the domain's agent and NIC sockets are made for QEMU's user
//	started begin   a primary domain is protected, with its metadata's peer, epoch and the
//	                attributes tap, peer-tap, netns and peer-netns, once it runs (in the
//	                background: errors go to the daemon's log and the VM's status)
//	stopped end     its agent is not started again
func (d *Daemon) Hook(ev HookEvent) string {
	m, ok, err := libvirtdom.ParseMetadata(ev.XML)
	switch {
	case err != nil:
		d.log.Warn("hook: unreadable remus metadata", "domain", ev.Domain, "op", ev.Op, "err", err)
		return fmt.Sprintf("ignored: domain %s: remus metadata: %v", ev.Domain, err)
	case !ok:
		return "ignored: domain " + ev.Domain + " has no remus metadata"
	}
	switch {
	case ev.Op == "prepare" && ev.SubOp == "begin":
		dom, _, err := libvirtdom.Check(ev.XML, libvirtdom.CheckOptions{})
		if err != nil {
			return fmt.Sprintf("domain %s: %v", ev.Domain, err)
		}
		for _, p := range []string{dom.AgentQMP, dom.NetSocket} {
			if p == "" {
				continue
			}
			if err := d.qemuDir(filepath.Dir(p)); err != nil {
				d.log.Warn("hook: socket directory", "domain", ev.Domain, "err", err)
				return fmt.Sprintf("domain %s: %v", ev.Domain, err)
			}
		}
		return "domain " + ev.Domain + ": socket directories ready"
	case ev.Op == "started" && ev.SubOp == "begin" && m.Role == libvirtdom.RolePrimary:
		req := ProtectRequest{Peer: m.Peer, Epoch: m.Epoch, Tap: attr(m, "tap"), PeerTap: attr(m, "peer-tap"),
			Netns: attr(m, "netns"), PeerNetns: attr(m, "peer-netns")}
		go d.protectStarted(ev.Domain, req)
		return "domain " + ev.Domain + ": protecting it with " + m.Peer + " as its backup once it runs"
	case ev.Op == "stopped" && ev.SubOp == "end":
		if v := d.get(ev.Domain); v != nil && v.snapshot().Role == RolePrimary {
			v.mu.Lock()
			v.rec.Wanted = false
			v.mu.Unlock()
			d.save(v)
			if !v.snapshot().Relay {
				go d.afterStop(v)
			}
			return "domain " + ev.Domain + ": stopped; its agent is not started again"
		}
	}
	return "nothing to do for " + ev.Op + " " + ev.SubOp
}

// afterStop ends the protection of a primary domain that stopped (the
// hook said so, or its agent exited with the domain no longer running),
// once its agent exited: when the backup holds nothing it would resume (the
// guest was shut down on purpose, and the agent's goodbye confirmed), its
// standby is released. A backup that holds a committed epoch (the primary
// crashed) is left to fail over, as it should.
func (d *Daemon) afterStop(v *vm) {
	r := v.snapshot()
	log := d.log.With("vm", r.Name)
	v.mu.Lock()
	exited := v.exited
	v.mu.Unlock()
	if exited != nil {
		select {
		case <-exited:
		case <-time.After(time.Minute):
			log.Warn("the domain stopped but its agent runs on: the backup is left as it is")
			return
		}
	}
	ctx, cancel := context.WithTimeout(d.ctx, 2*time.Minute)
	defer cancel()
	p, err := d.peer(r.Peer)
	if err != nil {
		return
	}
	var st VMStatus
	if err := p.call(ctx, http.MethodGet, pathPeerVMs+"/"+url.PathEscape(r.Name), nil, &st); err != nil {
		log.Warn("the domain stopped; the backup's state is unknown: left as it is", "err", err)
		return
	}
	if st.State != StateWaiting {
		log.Warn("the domain stopped without ending protection (a crash?): the backup may resume the guest", "backup_state", st.State)
		return
	}
	d.ops.Lock()
	defer d.ops.Unlock()
	var res Result
	if err := p.call(ctx, http.MethodPost, pathRelease, ReleaseRequest{VM: r.Name}, &res); err != nil {
		log.Warn("the domain stopped; releasing its standby failed", "err", err)
		return
	}
	log.Info("the domain was shut down: protection ended on both hosts", "backup", res.Result)
	d.ended(v, "the domain was shut down: protection ended on both hosts ("+res.Result+")", StateEnded)
}

func attr(m *libvirtdom.Metadata, name string) string {
	for _, a := range m.Attrs {
		if a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

// hookRetry is how often protectStarted tries again while the peer cannot
// be reached.
const hookRetry = 10 * time.Second

// protectStarted protects a domain the hook saw start, once libvirt
// resumed it, trying again while the backup host cannot be reached.
func (d *Daemon) protectStarted(name string, req ProtectRequest) {
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Minute)
	defer cancel()
	log := d.log.With("vm", name, "peer", req.Peer)
	if err := d.hv.waitState(ctx, name, libvirt.DomainRunning, 200*time.Millisecond); err != nil {
		log.Error("hook: the domain does not run: not protected", "err", err)
		return
	}
	for {
		_, err := d.Protect(ctx, name, req)
		if err == nil {
			log.Info("hook: protection started")
			return
		}
		var he *httpError
		if !errors.As(err, &he) || (he.code != http.StatusBadGateway && he.code != http.StatusServiceUnavailable) {
			log.Error("hook: domain not protected", "err", err)
			return
		}
		log.Warn("hook: cannot protect the domain yet: trying again", "err", err, "in", hookRetry)
		select {
		case <-ctx.Done():
			log.Error("hook: domain not protected: gave up", "err", err)
			return
		case <-time.After(hookRetry):
		}
	}
}

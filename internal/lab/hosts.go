package lab

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strings"

	"github.com/remus-kvm/remus/internal/netns"
	"github.com/remus-kvm/remus/witness"
)

// Hosts are the lab's three machines for partition tests: the primary's
// host A, the backup's host B and the witness's host W, each a network
// namespace of its own with one veth link to a switch (a bridge in the
// lab's namespace), on 10.214.0.0/24: A .1, B .2, W .3. This process
// reaches them from .9 (for the witness's status). The agents' QEMU and
// their network relays to the clients' bridge are as without Hosts (unix
// sockets and taps cross no namespace); what the namespaces carry is the
// agents' link and their way to the witness, which tests cut with
// Isolate and Cut.
type Hosts struct {
	A, B, W *netns.Namespace
	lab     *Lab
	ports   map[*netns.Namespace]string // the switch's end of each host's link
}

// The hosts' addresses and ports.
const (
	HostA       = "10.214.0.1"
	HostB       = "10.214.0.2"
	HostW       = "10.214.0.3"
	hostsRoot   = "10.214.0.9"
	agentPort   = "7700"
	witnessPort = 2379
)

// NewHosts creates the three namespaces and their links; the lab removes
// them.
func (l *Lab) NewHosts() (*Hosts, error) {
	h := &Hosts{lab: l, ports: map[*netns.Namespace]string{}}
	if err := l.Net.NS.Exec("link", "add", "sw0", "type", "bridge"); err != nil {
		return nil, err
	}
	if err := l.Net.NS.Exec("link", "set", "dev", "sw0", "up"); err != nil {
		return nil, err
	}
	for _, host := range []struct {
		ns   **netns.Namespace
		addr string
	}{{&h.A, HostA}, {&h.B, HostB}, {&h.W, HostW}} {
		ns, err := netns.Create()
		if err != nil {
			return nil, err
		}
		l.defer_(func() { ns.Remove() })
		*host.ns = ns
		if h.ports[ns], err = l.plugIntoSwitch(ns, ns.Name(), host.addr); err != nil {
			return nil, err
		}
	}
	// This process's way in (it stays in the host's namespace).
	if _, err := l.plugIntoSwitch(nil, l.Net.NS.Name(), hostsRoot); err != nil {
		return nil, err
	}
	return h, nil
}

// plugIntoSwitch links namespace ns (nil: this process's) to the hosts'
// switch with a veth pair named after base: its end (h+base) gets addr; it
// returns the name of the switch's end (s+base).
func (l *Lab) plugIntoSwitch(ns *netns.Namespace, base, addr string) (string, error) {
	name, sw := "h"+base, "s"+base
	if err := ip("link", "add", name, "type", "veth", "peer", "name", sw); err != nil {
		return "", err
	}
	inside := ip
	if ns != nil {
		if err := ip("link", "set", "dev", name, "netns", ns.Name()); err != nil {
			return "", err
		}
		inside = ns.Exec
	} else {
		l.defer_(func() { ip("link", "del", name) })
	}
	if err := ip("link", "set", "dev", sw, "netns", l.Net.NS.Name()); err != nil {
		return "", err
	}
	for _, s := range [][]string{{"addr", "add", addr + "/24", "dev", name}, {"link", "set", "dev", name, "up"}} {
		if err := inside(s...); err != nil {
			return "", err
		}
	}
	for _, s := range [][]string{{"link", "set", "dev", sw, "master", "sw0"}, {"link", "set", "dev", sw, "up"}} {
		if err := l.Net.NS.Exec(s...); err != nil {
			return "", err
		}
	}
	return sw, nil
}

func ip(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("lab: ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// StartWitness runs the witness's etcd on host W.
func (h *Hosts) StartWitness(ctx context.Context) (*witness.Local, error) {
	return h.lab.startWitness(ctx, witness.LocalConfig{Netns: h.W.Path(), Host: HostW, ClientPort: witnessPort, PeerPort: witnessPort + 1})
}

// Isolate cuts host's link to the switch (ip link set down): it reaches
// none of the others, and none of them it.
func (h *Hosts) Isolate(host *netns.Namespace) error {
	return h.lab.Net.NS.Exec("link", "set", "dev", h.ports[host], "down")
}

// Rejoin undoes Isolate.
func (h *Hosts) Rejoin(host *netns.Namespace) error {
	return h.lab.Net.NS.Exec("link", "set", "dev", h.ports[host], "up")
}

// Cut drops every packet between hosts x and y (a blackhole route each
// way), leaving their ways to the third.
func (h *Hosts) Cut(x, y *netns.Namespace) error {
	if err := x.Exec("route", "add", "blackhole", h.addr(y)+"/32"); err != nil {
		return err
	}
	return y.Exec("route", "add", "blackhole", h.addr(x)+"/32")
}

// Heal undoes Cut.
func (h *Hosts) Heal(x, y *netns.Namespace) error {
	if err := x.Exec("route", "del", "blackhole", h.addr(y)+"/32"); err != nil {
		return err
	}
	return y.Exec("route", "del", "blackhole", h.addr(x)+"/32")
}

func (h *Hosts) addr(n *netns.Namespace) string {
	switch n {
	case h.A:
		return HostA
	case h.B:
		return HostB
	}
	return HostW
}

// agentAddr is where host's backup agent listens.
func (h *Hosts) agentAddr(host *netns.Namespace) string {
	return net.JoinHostPort(h.addr(host), agentPort)
}

// NewLinkProxy starts a LinkProxy to target (the backup agent's address)
// that the agents' hosts reach on this process's address on the switch;
// the lab closes it.
func (h *Hosts) NewLinkProxy(target string, seed uint64) (*LinkProxy, error) {
	p, err := NewLinkProxy(net.JoinHostPort(hostsRoot, "0"), target, seed)
	if err != nil {
		return nil, err
	}
	h.lab.defer_(p.Close)
	return p, nil
}

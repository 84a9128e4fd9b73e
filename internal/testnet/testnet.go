// Package testnet gives tests real networks to work in: network namespaces
// (package netns) that a test creates, configures with iproute2 and enters
// to open sockets, and that are deleted when the test ends.
//
// Everything here needs root and iproute2's ip command; New skips the test
// (through testenv) when either is missing. The methods defined here take a
// testing.TB, call its Fatal and must run on the test's goroutine; those of
// the embedded netns.Namespace (Do, DialContext, Listen, ListenPacket, ...)
// return errors and may be used from any goroutine.
package testnet

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"github.com/remus-kvm/remus/internal/netns"
	"github.com/remus-kvm/remus/internal/testenv"
)

// Namespace is a network namespace made for one test.
type Namespace struct {
	*netns.Namespace
	ip string // path of the ip command
}

// New creates a network namespace with a unique name (rk-<random hex>) and
// brings its loopback up. t.Cleanup kills the processes still inside it and
// deletes it. It skips the test when not root or when ip is missing.
func New(t testing.TB) *Namespace {
	t.Helper()
	testenv.RequireRoot(t)
	ip := testenv.RequireIP(t)
	n, err := netns.Create()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Remove(); err != nil {
			t.Errorf("testnet: %v", err)
		}
	})
	return &Namespace{Namespace: n, ip: ip}
}

// IP runs `ip -n NAME args...` and returns its output; it fails the test
// if the command fails.
func (n *Namespace) IP(t testing.TB, args ...string) string {
	t.Helper()
	return n.run(t, n.ip, append([]string{"-n", n.Name()}, args...)...)
}

// Run runs the command args inside the namespace (`ip netns exec NAME
// args...`) and returns its combined output; it fails the test if the
// command fails.
func (n *Namespace) Run(t testing.TB, args ...string) string {
	t.Helper()
	if len(args) == 0 {
		t.Fatal("testnet: Run needs a command")
	}
	return n.run(t, n.ip, append([]string{"netns", "exec", n.Name()}, args...)...)
}

func (n *Namespace) run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("testnet: %s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out)
}

// MoveLink moves the link called link from the test's (host) namespace
// into n. Open file descriptors on it, such as a tap's, stay valid.
func (n *Namespace) MoveLink(t testing.TB, link string) {
	t.Helper()
	if err := n.MoveLinkIn(link); err != nil {
		t.Fatal(err)
	}
}

// AddAddr adds the address prefix (such as "10.213.1.1/24") to link inside
// n.
func (n *Namespace) AddAddr(t testing.TB, link, prefix string) {
	t.Helper()
	n.IP(t, "addr", "add", prefix, "dev", link)
}

// Up sets link inside n up.
func (n *Namespace) Up(t testing.TB, link string) {
	t.Helper()
	n.IP(t, "link", "set", "dev", link, "up")
}

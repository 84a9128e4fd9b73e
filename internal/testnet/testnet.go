// Package testnet gives tests real networks to work in: network namespaces
// that a test creates, configures with iproute2 and enters to open sockets,
// and that are deleted when the test ends.
//
// Everything here needs root and iproute2's ip command; New skips the test
// (through testenv) when either is missing. The methods that take a
// testing.TB call its Fatal and must run on the test's goroutine; Do,
// DialContext, Listen and ListenPacket return errors and may be used from
// any goroutine.
package testnet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/remus-kvm/remus/internal/testenv"
)

// Namespace is a network namespace made for one test. Its loopback
// interface is up; nothing else is in it until the test adds it.
type Namespace struct {
	name string
	ip   string // path of the ip command
}

// New creates a network namespace with a unique name (rk-<random hex>) and
// brings its loopback up. t.Cleanup kills the processes still inside it and
// deletes it. It skips the test when not root or when ip is missing.
func New(t testing.TB) *Namespace {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireIP(t)
	n, err := Create()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Remove(); err != nil {
			t.Errorf("testnet: %v", err)
		}
	})
	return n
}

// Create makes a network namespace with a unique name (rk-<random hex>)
// and brings its loopback up, for users that are not tests (the demo). The
// caller must Remove it.
func Create() (*Namespace, error) {
	ip, err := exec.LookPath("ip")
	if err != nil {
		return nil, fmt.Errorf("testnet: needs iproute2's ip command: %w", err)
	}
	n := &Namespace{name: "rk-" + randomHex(4), ip: ip}
	if out, err := exec.Command(ip, "netns", "add", n.name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("testnet: ip netns add %s: %w: %s", n.name, err, bytes.TrimSpace(out))
	}
	if err := n.Exec("link", "set", "dev", "lo", "up"); err != nil {
		n.Remove()
		return nil, err
	}
	return n, nil
}

// Exec runs `ip -n NAME args...`.
func (n *Namespace) Exec(args ...string) error {
	args = append([]string{"-n", n.name}, args...)
	if out, err := exec.Command(n.ip, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("testnet: ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// MoveLinkIn moves the host link called link into n.
func (n *Namespace) MoveLinkIn(link string) error {
	if out, err := exec.Command(n.ip, "link", "set", "dev", link, "netns", n.name).CombinedOutput(); err != nil {
		return fmt.Errorf("testnet: move %s into %s: %w: %s", link, n.name, err, bytes.TrimSpace(out))
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Name returns the namespace's name, as `ip netns` knows it.
func (n *Namespace) Name() string { return n.name }

// Path returns the file that holds the namespace (/run/netns/NAME).
func (n *Namespace) Path() string { return "/run/netns/" + n.name }

// Remove kills what is left in the namespace and deletes it.
func (n *Namespace) Remove() error {
	out, err := exec.Command(n.ip, "netns", "pids", n.name).Output()
	if err != nil {
		return fmt.Errorf("ip netns pids %s: %w", n.name, err)
	}
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid <= 1 || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kill process %d left in namespace %s: %w", pid, n.name, err)
		}
	}
	if out, err := exec.Command(n.ip, "netns", "delete", n.name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns delete %s: %w: %s", n.name, err, bytes.TrimSpace(out))
	}
	return nil
}

// IP runs `ip -n NAME args...` and returns its output; it fails the test
// if the command fails.
func (n *Namespace) IP(t testing.TB, args ...string) string {
	t.Helper()
	return n.run(t, n.ip, append([]string{"-n", n.name}, args...)...)
}

// Run runs the command args inside the namespace (`ip netns exec NAME
// args...`) and returns its combined output; it fails the test if the
// command fails.
func (n *Namespace) Run(t testing.TB, args ...string) string {
	t.Helper()
	if len(args) == 0 {
		t.Fatal("testnet: Run needs a command")
	}
	return n.run(t, n.ip, append([]string{"netns", "exec", n.name}, args...)...)
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

// Do runs fn on a thread that is inside n, and switches the thread back
// before returning.
//
// Network namespaces belong to threads, not processes, so Do locks the
// goroutine to its thread (runtime.LockOSThread), moves that thread into n
// (setns through netns.Set), runs fn, moves it back and unlocks it. While
// locked, no other goroutine runs on the thread, and the runtime starts new
// threads from a clean template thread rather than from this one, so
// nothing else ends up in n by accident. If switching back fails, the
// thread stays locked and the runtime discards it when the goroutine
// exits.
//
// Sockets, tap devices and other objects created by fn keep n as their
// namespace for their whole life, wherever they are used later: the
// namespace is fixed when the object is created. fn must not rely on other
// goroutines it starts being in n, and must not resolve host names (the
// resolver may use other threads).
func (n *Namespace) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("testnet: current network namespace: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(n.Path())
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("testnet: open namespace %s: %w", n.name, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("testnet: enter namespace %s: %w", n.name, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: it dies with the goroutine.
		return errors.Join(ferr, fmt.Errorf("testnet: leave namespace %s: %w", n.name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// checkAddr refuses addresses that would need the resolver, which may run
// on threads outside the namespace.
func checkAddr(network, addr string) error {
	switch network {
	case "unix", "unixgram", "unixpacket":
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("testnet: address %q: %w", addr, err)
	}
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return fmt.Errorf("testnet: address %q: the host must be an IP literal", addr)
	}
	return nil
}

// DialContext connects to addr over network from inside n. The host in
// addr must be an IP literal. See Do for why the connection stays in n.
func (n *Namespace) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if err := checkAddr(network, addr); err != nil {
		return nil, err
	}
	// A single address means the dialer connects on this goroutine, so on
	// the thread Do moved into n.
	var c net.Conn
	err := n.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen listens on addr over a stream network (tcp, tcp4, tcp6, unix)
// inside n. The host in addr must be an IP literal or empty.
func (n *Namespace) Listen(ctx context.Context, network, addr string) (net.Listener, error) {
	if err := checkAddr(network, addr); err != nil {
		return nil, err
	}
	var ln net.Listener
	err := n.Do(func() error {
		var lc net.ListenConfig
		var err error
		ln, err = lc.Listen(ctx, network, addr)
		return err
	})
	return ln, err
}

// ListenPacket listens on addr over a packet network (udp, udp4, udp6,
// ip4:icmp, unixgram) inside n. The host in addr must be an IP literal or
// empty.
func (n *Namespace) ListenPacket(ctx context.Context, network, addr string) (net.PacketConn, error) {
	if !strings.HasPrefix(network, "ip") {
		if err := checkAddr(network, addr); err != nil {
			return nil, err
		}
	} else if addr != "" {
		if _, err := netip.ParseAddr(addr); err != nil {
			return nil, fmt.Errorf("testnet: address %q: must be an IP literal", addr)
		}
	}
	var pc net.PacketConn
	err := n.Do(func() error {
		var lc net.ListenConfig
		var err error
		pc, err = lc.ListenPacket(ctx, network, addr)
		return err
	})
	return pc, err
}

// Exists reports whether a namespace called name is registered with ip
// netns (its file under /run/netns exists).
func Exists(name string) bool {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return false
	}
	return slices.ContainsFunc(entries, func(e os.DirEntry) bool { return e.Name() == name })
}

// Package netns makes network namespaces and works in them: Create makes
// one with its loopback up, Exec configures it with iproute2, Do,
// DialContext, Listen and ListenPacket open sockets inside it, and Remove
// kills what is left in it and deletes it. The lab (internal/lab) runs the
// demo's and the end-to-end tests' network in one; tests get theirs, removed
// when they end, from internal/testnet.
//
// Everything here needs root and iproute2's ip command. The methods return
// errors and may be used from any goroutine.
package netns

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

	vnetns "github.com/vishvananda/netns"
)

// Namespace is a network namespace made by Create. Its loopback interface
// is up; nothing else is in it until its user adds it.
type Namespace struct {
	name string
	ip   string // path of the ip command
}

// Create makes a network namespace with a unique name (rk-<random hex>)
// and brings its loopback up. The caller must Remove it.
func Create() (*Namespace, error) {
	ip, err := exec.LookPath("ip")
	if err != nil {
		return nil, fmt.Errorf("netns: needs iproute2's ip command: %w", err)
	}
	n := &Namespace{name: "rk-" + randomHex(4), ip: ip}
	if out, err := exec.Command(ip, "netns", "add", n.name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("netns: ip netns add %s: %w: %s", n.name, err, bytes.TrimSpace(out))
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
		return fmt.Errorf("netns: ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// MoveLinkIn moves the host link called link into n.
func (n *Namespace) MoveLinkIn(link string) error {
	if out, err := exec.Command(n.ip, "link", "set", "dev", link, "netns", n.name).CombinedOutput(); err != nil {
		return fmt.Errorf("netns: move %s into %s: %w: %s", link, n.name, err, bytes.TrimSpace(out))
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

// Do runs fn on a thread that is inside n, and switches the thread back
// before returning.
//
// Network namespaces belong to threads, not processes, so Do locks the
// goroutine to its thread (runtime.LockOSThread), moves that thread into n
// (setns, through vishvananda/netns), runs fn, moves it back and unlocks
// it. While locked, no other goroutine runs on the thread, and the runtime
// starts new threads from a clean template thread rather than from this
// one, so nothing else ends up in n by accident. If switching back fails, the
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
	orig, err := vnetns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: current network namespace: %w", err)
	}
	defer orig.Close()
	target, err := vnetns.GetFromPath(n.Path())
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: open namespace %s: %w", n.name, err)
	}
	defer target.Close()
	if err := vnetns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: enter namespace %s: %w", n.name, err)
	}
	ferr := fn()
	if err := vnetns.Set(orig); err != nil {
		// Leave the thread locked: it dies with the goroutine.
		return errors.Join(ferr, fmt.Errorf("netns: leave namespace %s: %w", n.name, err))
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
		return fmt.Errorf("netns: address %q: %w", addr, err)
	}
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return fmt.Errorf("netns: address %q: the host must be an IP literal", addr)
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
	var d net.Dialer
	return inside(n, func() (net.Conn, error) { return d.DialContext(ctx, network, addr) })
}

// Listen listens on addr over a stream network (tcp, tcp4, tcp6, unix)
// inside n. The host in addr must be an IP literal or empty.
func (n *Namespace) Listen(ctx context.Context, network, addr string) (net.Listener, error) {
	if err := checkAddr(network, addr); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	return inside(n, func() (net.Listener, error) { return lc.Listen(ctx, network, addr) })
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
			return nil, fmt.Errorf("netns: address %q: must be an IP literal", addr)
		}
	}
	var lc net.ListenConfig
	return inside(n, func() (net.PacketConn, error) { return lc.ListenPacket(ctx, network, addr) })
}

// inside returns what open makes on a thread inside n (see Do).
func inside[T any](n *Namespace, open func() (T, error)) (T, error) {
	var v T
	err := n.Do(func() (err error) {
		v, err = open()
		return err
	})
	return v, err
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

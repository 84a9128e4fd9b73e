package testnet

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	vnetns "github.com/vishvananda/netns"

	"github.com/remus-kvm/remus/internal/netns"
)

// vethPair puts a veth pair with addresses 10.213.200.1/24 and
// 10.213.200.2/24 into n and brings it up.
func vethPair(t *testing.T, n *Namespace) {
	t.Helper()
	n.IP(t, "link", "add", "rkv0", "type", "veth", "peer", "name", "rkv1")
	n.AddAddr(t, "rkv0", "10.213.200.1/24")
	n.AddAddr(t, "rkv1", "10.213.200.2/24")
	n.Up(t, "rkv0")
	n.Up(t, "rkv1")
}

func TestNamespaceDialListen(t *testing.T) {
	t.Parallel()
	n := New(t)
	vethPair(t, n)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	ln, err := n.Listen(ctx, "tcp4", "10.213.200.1:0")
	if err != nil {
		t.Fatalf("Listen in the namespace: %v", err)
	}
	defer ln.Close()
	// 10.213.200.1 exists only inside the namespace: binding to it proves
	// the listener's socket was made there.
	if hostHas(t, "10.213.200.1") {
		t.Fatal("the host namespace has 10.213.200.1; the test cannot tell namespaces apart")
	}

	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil {
			served <- err
			return
		}
		if string(buf) != "ping" {
			served <- errors.New("server read " + string(buf))
			return
		}
		_, err = c.Write([]byte("pong from " + c.LocalAddr().String()))
		served <- err
	}()

	c, err := n.DialContext(ctx, "tcp4", ln.Addr().String())
	if err != nil {
		t.Fatalf("DialContext in the namespace: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if want := "pong from " + ln.Addr().String(); string(reply) != want {
		t.Fatalf("reply %q, want %q", reply, want)
	}
	if err := <-served; err != nil {
		t.Fatalf("server: %v", err)
	}
}

func TestNamespaceListenPacket(t *testing.T) {
	t.Parallel()
	n := New(t)
	vethPair(t, n)
	ctx := t.Context()
	a, err := n.ListenPacket(ctx, "udp4", "10.213.200.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := n.ListenPacket(ctx, "udp4", "10.213.200.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := b.WriteTo([]byte("datagram"), a.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	m, from, err := a.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	if string(buf[:m]) != "datagram" || from.String() != b.LocalAddr().String() {
		t.Fatalf("got %q from %v, want \"datagram\" from %v", buf[:m], from, b.LocalAddr())
	}
}

// hostHas reports whether an interface of the host namespace has the
// address ip.
func hostHas(t *testing.T, ip string) bool {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if p, ok := a.(*net.IPNet); ok && p.IP.String() == ip {
			return true
		}
	}
	return false
}

func TestDoSwitchesBack(t *testing.T) {
	n := New(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	host, err := vnetns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	want, err := vnetns.GetFromPath(n.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer want.Close()

	var inside bool
	err = n.Do(func() error {
		cur, err := vnetns.Get()
		if err != nil {
			return err
		}
		defer cur.Close()
		inside = cur.Equal(want) && !cur.Equal(host)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !inside {
		t.Fatal("fn did not run inside the namespace")
	}
	after, err := vnetns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close()
	if !after.Equal(host) {
		t.Fatal("the thread is still in the namespace after Do")
	}

	boom := errors.New("boom")
	if err := n.Do(func() error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("Do returned %v, want fn's error", err)
	}
}

func TestRunAndIP(t *testing.T) {
	n := New(t)
	if out := n.Run(t, "ip", "-o", "link", "show"); !strings.Contains(out, "lo:") || strings.Count(out, "\n") != 1 {
		t.Fatalf("a new namespace should hold only lo, got:\n%s", out)
	}
	if out := n.IP(t, "-o", "addr", "show", "dev", "lo"); !strings.Contains(out, "127.0.0.1/8") {
		t.Fatalf("loopback is not up with 127.0.0.1 in the namespace:\n%s", out)
	}
}

func TestMoveLink(t *testing.T) {
	n := New(t)
	other := New(t)
	// A veth pair made in other; one end goes to the test's namespace and
	// from there into n, the way a test moves a host link in.
	link := "rkmv" + strings.TrimPrefix(other.Name(), "rk-")[:6] // unique as the name
	other.IP(t, "link", "add", link, "type", "veth", "peer", "name", link+"p")
	other.IP(t, "link", "set", "dev", link, "netns", strconv.Itoa(os.Getpid()))
	t.Cleanup(func() {
		// Only if the move into n failed; then the link is still here.
		exec.Command("ip", "link", "del", "dev", link).Run()
	})
	n.MoveLink(t, link)
	if out := n.IP(t, "-o", "link", "show"); !strings.Contains(out, link+"@") {
		t.Fatalf("%s not in the namespace after MoveLink:\n%s", link, out)
	}
	if _, err := net.InterfaceByName(link); err == nil {
		t.Fatalf("%s is still in the host namespace after MoveLink", link)
	}
}

func TestNamespaceRemovedOnCleanup(t *testing.T) {
	var name string
	var leftover *exec.Cmd
	t.Run("use", func(t *testing.T) {
		n := New(t)
		name = n.Name()
		if !netns.Exists(name) {
			t.Fatalf("namespace %s does not exist after New", name)
		}
		if !strings.HasPrefix(name, "rk-") {
			t.Fatalf("name %q does not start with rk-", name)
		}
		// A process left running inside: cleanup must kill it.
		// It reports once it is inside, so the cleanup cannot run before
		// it got there.
		leftover = exec.Command("ip", "netns", "exec", name, "sh", "-c", "echo inside; exec sleep 600")
		out, err := leftover.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := leftover.Start(); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(out).ReadString('\n')
		if line != "inside\n" {
			t.Fatalf("process in the namespace said %q, %v", line, err)
		}
	})
	if name == "" {
		t.Fatal("subtest did not create a namespace")
	}
	if netns.Exists(name) {
		t.Fatalf("namespace %s still exists after the test's cleanup", name)
	}
	if out, err := exec.Command("ip", "netns", "list").Output(); err != nil {
		t.Fatal(err)
	} else if strings.Contains(string(out), name) {
		t.Fatalf("ip netns list still shows %s:\n%s", name, out)
	}
	if leftover != nil {
		err := leftover.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ProcessState.Success() {
			t.Fatalf("process left in the namespace: Wait = %v, want it killed", err)
		}
	}
}

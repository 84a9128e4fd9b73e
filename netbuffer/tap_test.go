package netbuffer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/internal/testnet"
)

func tapName(t testing.TB) string {
	b := make([]byte, 4)
	rand.Read(b)
	return "rkt" + hex.EncodeToString(b) // 11 bytes, within IFNAMSIZ
}

// openTapIn opens a tap device inside ns with OpenTapIn.
func openTapIn(t testing.TB, ns *testnet.Namespace, name string) *Tap {
	t.Helper()
	tap, err := OpenTapIn(ns.Path(), name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tap.Close() })
	return tap
}

func TestOpenTapNameTooLong(t *testing.T) {
	if _, err := OpenTap("a-name-of-16-chr"); err == nil || !strings.Contains(err.Error(), "longer than 15") {
		t.Fatalf("OpenTap with a 16-byte name = %v, want an error", err)
	}
}

func TestTapCloseUnblocksRead(t *testing.T) {
	testenv.RequireTun(t)
	ns := testnet.New(t)
	tap := openTapIn(t, ns, tapName(t))
	res := make(chan error, 1)
	go func() {
		_, err := tap.Read(make([]byte, MaxFrameSize))
		res <- err
	}()
	if err := tap.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-res:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("Read after Close = %v, want os.ErrClosed", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("Close did not unblock Read")
	}
}

func TestTapReadDeadline(t *testing.T) {
	testenv.RequireTun(t)
	ns := testnet.New(t)
	tap := openTapIn(t, ns, tapName(t))
	tap.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := tap.ReadFrame(make([]byte, MaxFrameSize)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadFrame past the deadline = %v, want os.ErrDeadlineExceeded", err)
	}
}

func TestOpenTapAttachesToExisting(t *testing.T) {
	testenv.RequireTun(t)
	ns := testnet.New(t)
	name := tapName(t)
	ns.IP(t, "tuntap", "add", "dev", name, "mode", "tap")
	tap := openTapIn(t, ns, name)
	if tap.Name() != name {
		t.Fatalf("Name() = %q, want %q", tap.Name(), name)
	}
	frame := ethernet(broadcastMAC, net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, 0x88b5, []byte("local experimental"))
	if err := tap.WriteFrame(frame); !errors.Is(err, ErrFrameRejected) {
		t.Fatalf("WriteFrame to a tap that is down = %v, want ErrFrameRejected", err)
	}
	ns.Up(t, name)
	if err := tap.WriteFrame(frame); err != nil {
		t.Fatalf("WriteFrame to a tap that is up: %v", err)
	}
	if err := tap.WriteFrame(frame[:10]); !errors.Is(err, ErrFrameRejected) {
		t.Fatalf("WriteFrame of a runt = %v, want ErrFrameRejected", err)
	}

	// Attached already.
	err := ns.Do(func() error {
		_, err := OpenTap(name)
		return err
	})
	if !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), "already attached") {
		t.Fatalf("OpenTap of a tap in use = %v, want EBUSY with an explanation", err)
	}

	// Not a single-queue tap, or not a tap at all.
	mq := tapName(t)
	ns.IP(t, "tuntap", "add", "dev", mq, "mode", "tap", "multi_queue")
	veth := tapName(t)
	ns.IP(t, "link", "add", veth, "type", "veth", "peer", "name", veth+"p")
	for _, other := range []string{mq, veth} {
		err := ns.Do(func() error {
			tap, err := OpenTap(other)
			if err == nil {
				tap.Close()
			}
			return err
		})
		if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "not a single-queue tap") {
			t.Fatalf("OpenTap(%s) = %v, want EINVAL with an explanation", other, err)
		}
	}
}

// The addressing of TestRelayTap: the namespace's kernel owns hostIP on
// the tap; the fake guest is guestIP with guestMAC.
var (
	hostIP   = netip.MustParseAddr("10.213.7.1")
	guestIP  = netip.MustParseAddr("10.213.7.2")
	guestMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
)

// fakeGuest is the test's side of the relay's guest connection, playing a
// guest NIC at guestIP.
type fakeGuest struct {
	*peer
	t testing.TB
	// sent holds the lengths of the frames sent, read counts those
	// received.
	sent []int
	read int
}

func (g *fakeGuest) send(f []byte) {
	g.t.Helper()
	g.peer.send(f)
	g.sent = append(g.sent, len(f))
}

// await returns the first frame for which match is true. On the way it
// answers ARP requests for guestIP, as a guest's kernel would, and skips
// other frames (IPv6 router and neighbour traffic from the namespace).
func (g *fakeGuest) await(what string, match func([]byte) bool) []byte {
	g.t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		g.conn.SetReadDeadline(deadline)
		f, err := g.fr.ReadFrame()
		if err != nil {
			g.t.Fatalf("waiting for %s: %v", what, err)
		}
		g.read++
		if match(f) {
			return bytes.Clone(f)
		}
		if a, ok := parseARP(f); ok && a.op == arpRequest && a.tpa == guestIP {
			g.send(arpFrame(arpReply, guestMAC, guestIP, a.sha, a.spa))
		}
	}
}

func TestRelayTap(t *testing.T) {
	testenv.RequireTun(t)
	ns := testnet.New(t)

	// The tap is made in the host namespace and moved into the test's; the
	// open file descriptor stays valid across the move.
	name := tapName(t)
	tap, err := OpenTap(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tap.Close() })
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatal(err)
	}
	tapMAC := ifi.HardwareAddr
	ns.MoveLink(t, name)
	ns.AddAddr(t, name, hostIP.String()+"/24")
	ns.Up(t, name)

	r := startRelay(t, tap)
	g := &fakeGuest{peer: r.guest, t: t}

	// ARP: who has 10.213.7.1? The namespace's kernel answers with the
	// tap's MAC.
	req := arpFrame(arpRequest, guestMAC, guestIP, nil, hostIP)
	g.send(req)
	reply := g.await("the ARP reply for "+hostIP.String(), func(f []byte) bool {
		a, ok := parseARP(f)
		return ok && a.op == arpReply && a.spa == hostIP
	})
	a, _ := parseARP(reply)
	if !bytes.Equal(a.sha, tapMAC) || !bytes.Equal(reply[6:12], tapMAC) {
		t.Fatalf("ARP reply says %s is at %s (Ethernet source %s), want the tap's MAC %s", hostIP, a.sha, net.HardwareAddr(reply[6:12]), tapMAC)
	}
	if !bytes.Equal(a.tha, guestMAC) || a.tpa != guestIP || !bytes.Equal(reply[:6], guestMAC) {
		t.Fatalf("ARP reply addressed to %s/%s, want %s/%s", a.tha, a.tpa, guestMAC, guestIP)
	}

	// UDP from the guest to a socket of the namespace's kernel, and back.
	pc, err := ns.ListenPacket(t.Context(), "udp4", hostIP.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
	const guestPort = 40000
	udp := ethernet(tapMAC, guestMAC, etherTypeIPv4,
		ipv4Packet(guestIP, hostIP, protoUDP, udpDatagram(guestPort, port, []byte("hello from the guest"))))
	g.send(udp)
	pc.SetReadDeadline(time.Now().Add(ioTimeout))
	buf := make([]byte, 1500)
	n, from, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatalf("UDP socket in the namespace: %v", err)
	}
	if string(buf[:n]) != "hello from the guest" || from.String() != "10.213.7.2:40000" {
		t.Fatalf("namespace received %q from %v", buf[:n], from)
	}
	if _, err := pc.WriteTo([]byte("hello guest"), from); err != nil {
		t.Fatal(err)
	}
	g.await("the UDP reply", func(f []byte) bool {
		ip, ok := parseIPv4(f)
		if !ok || ip.proto != protoUDP || ip.src != hostIP || ip.dst != guestIP {
			return false
		}
		sp, dp, payload, ok := parseUDP(ip.payload)
		return ok && sp == port && dp == guestPort && string(payload) == "hello guest"
	})

	// ICMP echo: the namespace's kernel answers.
	ping := ethernet(tapMAC, guestMAC, etherTypeIPv4,
		ipv4Packet(guestIP, hostIP, protoICMP, icmpEcho(8, 0x4242, 7, []byte("are you there"))))
	g.send(ping)
	g.await("the echo reply", func(f []byte) bool {
		ip, ok := parseIPv4(f)
		return ok && ip.proto == protoICMP && ip.src == hostIP && ip.dst == guestIP &&
			bytes.Equal(ip.payload, icmpEcho(0, 0x4242, 7, []byte("are you there")))
	})

	// A runt the tap refuses is dropped; the relay goes on.
	g.peer.send([]byte{1, 2, 3, 4, 5})
	g.send(ping)
	g.await("the second echo reply", func(f []byte) bool {
		ip, ok := parseIPv4(f)
		return ok && ip.proto == protoICMP && ip.src == hostIP && ip.payload[0] == 0
	})

	r.stop()
	if err := r.wait(t); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
	var sum uint64
	for _, l := range g.sent {
		sum += uint64(l)
	}
	st := r.relay.Stats()
	if want := (FlowStats{Frames: uint64(len(g.sent)), Bytes: sum, Dropped: 1}); st.Outbound != want {
		t.Fatalf("outbound stats %+v, want %+v", st.Outbound, want)
	}
	if st.Inbound.Frames < uint64(g.read) || st.Inbound.Dropped != 0 {
		t.Fatalf("inbound stats %+v, want at least the %d frames the guest read", st.Inbound, g.read)
	}
	t.Logf("stats: %+v", st)
}

func TestRelayTapGuestDisconnect(t *testing.T) {
	testenv.RequireTun(t)
	ns := testnet.New(t)
	tap := openTapIn(t, ns, tapName(t))
	r := startRelay(t, tap)
	r.guest.conn.Close()
	err := r.wait(t)
	if !errors.Is(err, ErrGuestDisconnected) || !strings.Contains(err.Error(), "guest disconnected") {
		t.Fatalf("Run = %v, want the guest's disconnect", err)
	}
	// Run closed the tap.
	if _, err := tap.Read(make([]byte, 10)); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("tap after Run: %v, want os.ErrClosed", err)
	}
}

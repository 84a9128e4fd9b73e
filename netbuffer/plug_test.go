package netbuffer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/internal/testguest"
)

// inGuest is set when the test binary runs inside the test guest, whose
// kernel has sch_plug: there the kernel buffer must work, not be reported
// missing.
var inGuest = flag.Bool("netbuffer.in-guest", false, "the tests run inside the test guest, whose kernel has sch_plug")

func TestPlugOptions(t *testing.T) {
	for _, tc := range []struct {
		o    PlugOptions
		want []byte
	}{
		{PlugOptions{Action: PlugBuffer}, []byte{0, 0, 0, 0, 0, 0, 0, 0}},
		{PlugOptions{Action: PlugReleaseOne}, []byte{1, 0, 0, 0, 0, 0, 0, 0}},
		{PlugOptions{Action: PlugReleaseIndefinite}, []byte{2, 0, 0, 0, 0, 0, 0, 0}},
		{PlugOptions{Action: PlugLimit, Limit: 0x01020304}, []byte{3, 0, 0, 0, 4, 3, 2, 1}},
	} {
		got := tc.o.Encode()
		if !bytes.Equal(got, tc.want) {
			t.Errorf("%+v encodes as %x, want %x", tc.o, got, tc.want)
		}
		back, err := DecodePlugOptions(got)
		if err != nil || back != tc.o {
			t.Errorf("decode %x = %+v, %v", got, back, err)
		}
	}
	for _, bad := range [][]byte{nil, {1, 0, 0, 0}, {4, 0, 0, 0, 0, 0, 0, 0}, {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}} {
		if _, err := DecodePlugOptions(bad); err == nil {
			t.Errorf("DecodePlugOptions(%x) accepted", bad)
		}
	}
}

// TestPlugRequest checks the RTM_NEWQDISC message byte by byte: the header,
// struct tcmsg, TCA_KIND "plug" and TCA_OPTIONS.
func TestPlugRequest(t *testing.T) {
	for _, create := range []bool{true, false} {
		b := plugRequest(7, create, PlugOptions{Action: PlugReleaseOne}).Serialize()
		ne := binary.NativeEndian
		if got := ne.Uint32(b[0:]); int(got) != len(b) {
			t.Fatalf("nlmsg_len %d, message %d bytes", got, len(b))
		}
		if typ := ne.Uint16(b[4:]); typ != unix.RTM_NEWQDISC {
			t.Fatalf("type %d, want RTM_NEWQDISC", typ)
		}
		flags := ne.Uint16(b[6:])
		want := uint16(unix.NLM_F_REQUEST | unix.NLM_F_ACK)
		if create {
			want |= unix.NLM_F_CREATE | unix.NLM_F_EXCL
		}
		if flags != want {
			t.Fatalf("create=%v: flags %#x, want %#x", create, flags, want)
		}
		tc := b[16:36] // struct tcmsg
		if tc[0] != unix.AF_UNSPEC || int32(ne.Uint32(tc[4:])) != 7 || ne.Uint32(tc[8:]) != 0x10000 || ne.Uint32(tc[12:]) != 0xffffffff {
			t.Fatalf("tcmsg %x: want ifindex 7, handle 1:0, parent root", tc)
		}
		attrs := b[36:]
		kind := attrs[:12] // len 9 ("plug\0" + header), padded to 12
		if ne.Uint16(kind[0:]) != 9 || ne.Uint16(kind[2:]) != 1 || string(kind[4:9]) != "plug\x00" {
			t.Fatalf("TCA_KIND %x", kind)
		}
		opts := attrs[12:]
		if len(opts) != 12 || ne.Uint16(opts[0:]) != 12 || ne.Uint16(opts[2:]) != 2 {
			t.Fatalf("TCA_OPTIONS %x", opts)
		}
		if o, err := DecodePlugOptions(opts[4:]); err != nil || o.Action != PlugReleaseOne {
			t.Fatalf("TCA_OPTIONS payload %x: %+v, %v", opts[4:], o, err)
		}
	}
}

func FuzzDecodePlugOptions(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{3, 0, 0, 0, 1, 2, 3, 4})
	f.Fuzz(func(t *testing.T, b []byte) {
		o, err := DecodePlugOptions(b)
		if err != nil {
			return
		}
		if got := o.Encode(); !bytes.Equal(got, b[:plugOptionsSize]) {
			t.Fatalf("%x decodes to %+v, which encodes as %x", b, o, got)
		}
	})
}

// inFreshNetns runs f on a thread in a new network namespace of its own.
func inFreshNetns(t *testing.T, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // the thread dies with the goroutine, namespace and all
		if _, err := netns.New(); err != nil {
			t.Errorf("new network namespace: %v", err)
			return
		}
		f()
	}()
	<-done
}

// TestKernelBuffer exercises the plug qdisc on a tap's ingress: frames the
// "guest" writes into the tap reach a UDP socket of the host only as the
// buffer lets them. Where the kernel lacks sch_plug (this project's build
// machines) it checks the clear error and that nothing is left behind; the
// full test runs inside the test guest (TestKernelBufferInGuest).
func TestKernelBuffer(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTun(t)
	inFreshNetns(t, func() { kernelBuffer(t) })
}

func kernelBuffer(t *testing.T) {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		t.Errorf("lo: %v", err)
		return
	}
	tap, err := OpenTap("rkb0")
	if err != nil {
		t.Error(err)
		return
	}
	defer tap.Close()
	link, err := netlink.LinkByName("rkb0")
	if err != nil {
		t.Error(err)
		return
	}
	addr, _ := netlink.ParseAddr("10.9.0.1/24")
	if err := netlink.AddrAdd(link, addr); err != nil {
		t.Error(err)
		return
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Error(err)
		return
	}
	sock, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 9, 0, 1), Port: 9999})
	if err != nil {
		t.Error(err)
		return
	}
	defer sock.Close()

	kb, err := NewKernelBuffer("rkb0", "rkb0-ifb", 0)
	if errors.Is(err, ErrNoPlug) && !*inGuest {
		if !strings.Contains(err.Error(), "sch_plug") {
			t.Errorf("error %q does not name sch_plug", err)
		}
		if _, lerr := netlink.LinkByName("rkb0-ifb"); lerr == nil {
			t.Errorf("the IFB device was left behind after: %v", err)
		}
		t.Logf("this kernel has no sch_plug, reported as: %v", err)
		return
	}
	if err != nil {
		t.Error(err)
		return
	}
	defer func() {
		if err := kb.Close(); err != nil {
			t.Error(err)
		}
		if _, err := netlink.LinkByName("rkb0-ifb"); err == nil {
			t.Error("Close left the IFB device")
		}
	}()

	guestMAC := net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2}
	send := func(payload string) {
		udp := udpDatagram(5555, 9999, []byte(payload))
		ip := ipv4Packet(netip.MustParseAddr("10.9.0.2"), netip.MustParseAddr("10.9.0.1"), unix.IPPROTO_UDP, udp)
		if err := tap.WriteFrame(ethernet(link.Attrs().HardwareAddr, guestMAC, unix.ETH_P_IP, ip)); err != nil {
			t.Errorf("write %q into the tap: %v", payload, err)
		}
	}
	buf := make([]byte, 100)
	recv := func(want string) {
		sock.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, _, err := sock.ReadFromUDP(buf)
		if err != nil || string(buf[:n]) != want {
			t.Errorf("received %q, %v; want %q", buf[:n], err, want)
		}
	}
	nothing := func(when string) {
		sock.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if n, _, err := sock.ReadFromUDP(buf); err == nil {
			t.Errorf("%s: %q got through", when, buf[:n])
		}
	}

	send("a") // not holding yet: straight through
	recv("a")
	if err := kb.Hold(); err != nil {
		t.Error(err)
		return
	}
	send("b")
	nothing("held, epoch 1 open")
	if err := kb.Cut(1); err != nil {
		t.Error(err)
		return
	}
	send("c")
	nothing("epoch 1 cut, not committed")
	if err := kb.Commit(1); err != nil {
		t.Error(err)
	}
	recv("b")
	nothing("epoch 1 released, epoch 2 open")
	if err := kb.Cut(2); err != nil {
		t.Error(err)
	}
	if err := kb.Cut(3); err == nil || !strings.Contains(err.Error(), "one epoch in flight") {
		t.Errorf("a second epoch in flight: %v, want an error", err)
	}
	if err := kb.Commit(2); err != nil {
		t.Error(err)
	}
	recv("c")
	send("d")
	nothing("epoch 3 open")
	if err := kb.PassThrough(); err != nil {
		t.Error(err)
	}
	recv("d")
	send("e")
	recv("e")
}

// TestKernelBufferInGuest runs TestKernelBuffer inside the test guest,
// whose Debian kernel has sch_plug, IFB, the ingress qdisc, matchall and
// mirred as modules.
func TestKernelBufferInGuest(t *testing.T) {
	if *inGuest {
		t.Skip("already inside the test guest")
	}
	testguest.RunInGuest(t, testguest.InGuest{
		Package: "./netbuffer", Run: "^TestKernelBuffer$", Pass: []string{"TestKernelBuffer"},
		Modules: []string{"tun", "ifb", "sch_plug", "sch_ingress", "cls_matchall", "act_mirred"},
		Args:    []string{"-netbuffer.in-guest"},
	})
}

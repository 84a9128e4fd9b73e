package netbuffer_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/internal/testguest"
	"github.com/remus-kvm/remus/internal/testnet"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/testvm/counter"
)

// TestGuestCounterThroughTapAndQMPPause boots the real test guest with its
// NIC on a -netdev stream socket, relays that socket to a tap device inside
// a network namespace made for the test, and talks to the guest's counter
// service over TCP from that namespace. It then pauses and resumes the guest
// over QMP and checks that the counter kept its value and that no reply came
// while the guest was paused.
func TestGuestCounterThroughTapAndQMPPause(t *testing.T) {
	testenv.RequireTun(t)
	c := testguest.Config(t)
	ns := testnet.New(t)

	tapName := fmt.Sprintf("rkt%d", os.Getpid()%100000)
	tap, err := netbuffer.OpenTap(tapName)
	if err != nil {
		t.Fatal(err)
	}
	ns.MoveLink(t, tapName)
	ns.AddAddr(t, tapName, "10.213.7.1/24")
	ns.IP(t, "link", "set", tapName, "up")

	sock := filepath.Join(t.TempDir(), "net.sock")
	ln, err := netbuffer.ListenUnix(sock)
	if err != nil {
		tap.Close()
		t.Fatal(err)
	}
	defer ln.Close()

	c.NIC = testvm.NIC{Mode: testvm.NICStream, Path: sock}
	c.Guest.IP = netip.MustParsePrefix("10.213.7.2/24")
	vm := testguest.Launch(t, c)

	ctx, cancel := context.WithTimeout(context.Background(), testguest.BootTimeout)
	defer cancel()
	guestConn, err := netbuffer.AcceptGuest(ctx, ln)
	if err != nil {
		tap.Close()
		t.Fatalf("QEMU did not connect its NIC: %v", err)
	}
	relay := netbuffer.NewRelay(guestConn, tap, nil)
	relayDone := make(chan error, 1)
	relayCtx, stopRelay := context.WithCancel(context.Background())
	go func() { relayDone <- relay.Run(relayCtx) }()
	defer func() {
		stopRelay()
		if err := <-relayDone; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("relay: %v", err)
		}
	}()

	ready := testguest.WaitReady(t, vm)

	conn, err := ns.DialContext(ctx, "tcp", "10.213.7.2:7000")
	if err != nil {
		t.Fatalf("connect to the guest's counter service from the namespace: %v", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Minute))
	cl := counter.NewClient(conn)

	for want := uint64(1); want <= 5; want++ {
		r, err := cl.Inc()
		if err != nil {
			t.Fatalf("INC %d: %v", want, err)
		}
		if r.Value != want || r.BootID != ready.BootID {
			t.Fatalf("INC gave %d (boot %s), want %d (boot %s)", r.Value, r.BootID, want, ready.BootID)
		}
	}

	mon, err := qmp.Dial(ctx, c.QMP[0])
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	sub := mon.Subscribe("STOP", "RESUME")
	defer sub.Close()

	if err := mon.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.Wait(ctx, func(e qmp.Event) bool { return e.Name == "STOP" }); err != nil {
		t.Fatalf("no STOP event: %v", err)
	}
	if st := status(ctx, t, mon); st != "paused" {
		t.Fatalf("status after stop is %q, want paused", st)
	}

	// A paused guest cannot answer: the request waits in its socket.
	if _, err := conn.Write([]byte(counter.CmdInc + "\n")); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	var one [1]byte
	if n, err := conn.Read(one[:]); !isTimeout(err) {
		t.Fatalf("read from a paused guest returned %d bytes, %v; want a timeout", n, err)
	}

	if err := mon.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.Wait(ctx, func(e qmp.Event) bool { return e.Name == "RESUME" }); err != nil {
		t.Fatalf("no RESUME event: %v", err)
	}
	if st := status(ctx, t, mon); st != "running" {
		t.Fatalf("status after cont is %q, want running", st)
	}

	// The request sent during the pause is answered now, then the counter
	// goes on: its value survived stop/cont.
	conn.SetDeadline(time.Now().Add(time.Minute))
	line, err := readLine(conn)
	if err != nil {
		t.Fatalf("reply to the request sent while paused: %v", err)
	}
	r, err := counter.ParseReply(line)
	if err != nil || r.Value != 6 || r.BootID != ready.BootID {
		t.Fatalf("reply after resume: %+v, %v; want value 6, same boot", r, err)
	}
	cl = counter.NewClient(conn)
	if r, err := cl.Inc(); err != nil || r.Value != 7 {
		t.Fatalf("INC after resume: %+v, %v; want 7", r, err)
	}

	st := relay.Stats()
	if st.Outbound.Frames == 0 || st.Inbound.Frames == 0 {
		t.Fatalf("relay stats %+v: frames must have crossed both ways", st)
	}
	t.Logf("relay: %d frames out (%d bytes), %d in (%d bytes)", st.Outbound.Frames, st.Outbound.Bytes, st.Inbound.Frames, st.Inbound.Bytes)
}

func status(ctx context.Context, t *testing.T, mon *qmp.Client) string {
	t.Helper()
	var st struct {
		Status string `json:"status"`
	}
	if err := mon.Execute(ctx, "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	return st.Status
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// readLine reads one reply line byte by byte, so nothing after it is
// consumed from conn.
func readLine(conn net.Conn) (string, error) {
	var b []byte
	var one [1]byte
	for len(b) < counter.MaxLine {
		if _, err := conn.Read(one[:]); err != nil {
			return string(b), err
		}
		b = append(b, one[0])
		if one[0] == '\n' {
			return string(b), nil
		}
	}
	return string(b), errors.New("reply line too long")
}

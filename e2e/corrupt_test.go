package e2e

import (
	"context"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/testvm/counter"
	"github.com/remus-kvm/remus/transport"
)

// corruptingProxy relays the agents' connections and, on the first one
// only, flips one payload byte of the first RAMPages frame of an epoch at
// or after fromEpoch, re-encoding nothing else: the frame's checksum no
// longer matches, as after a bit flip on the wire.
type corruptingProxy struct {
	ln        net.Listener
	backup    string
	fromEpoch uint64
	conns     atomic.Int32
	flipped   atomic.Uint64 // epoch of the damaged frame
}

func (p *corruptingProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", p.backup)
		if err != nil {
			c.Close()
			continue
		}
		first := p.conns.Add(1) == 1
		// Backup to primary; this side ends the pair, so that a frame the
		// backup sent before closing (its Error) always reaches the primary.
		go func() { io.Copy(c, b); c.Close(); b.Close() }()
		go func() {
			defer b.(*net.TCPConn).CloseWrite()
			if !first {
				io.Copy(b, c)
				return
			}
			r := transport.NewReader(c)
			for {
				f, err := r.Next()
				if err != nil {
					return
				}
				buf := transport.AppendFrame(nil, f)
				if p.flipped.Load() == 0 && (f.Type == transport.TypeRAMPages || f.Type == transport.TypeRAMDelta) && f.Epoch >= p.fromEpoch {
					buf[transport.HeaderSize+len(f.Payload)/2] ^= 0x10
					p.flipped.Store(f.Epoch)
				}
				if _, err := b.Write(buf); err != nil {
					return
				}
			}
		}()
	}
}

// TestCorruptFrameIsRejectedAndProtectionRecovers damages one frame on the
// link between the agents. The backup must detect it, discard that epoch,
// tell the primary, and not fail over; the primary must start a new
// protection session that commits again; and a failover afterwards must
// resume the same boot.
func TestCorruptFrameIsRejectedAndProtectionRecovers(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	g := bootPrimary(t, l, ctx, 4000)
	prim, back, vm, ready := g.prim, g.back, g.vm, g.ready

	proxy := &corruptingProxy{fromEpoch: 30}
	p, err := l.Protect(prim, back, lab.ProtectOptions{HeartbeatTimeout: heartbeatTimeout, Via: func(backup string) (string, error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		t.Cleanup(func() { ln.Close() })
		proxy.ln, proxy.backup = ln, backup
		go proxy.serve()
		return ln.Addr().String(), nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	dump(t, l, p)

	// The backup reports the damaged epoch and keeps its committed image.
	if _, err := p.Backup.WaitLine(ctx, "discarded epoch"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Primary.WaitLine(ctx, "protection lost"); err != nil {
		t.Fatal(err)
	}
	bad := proxy.flipped.Load()
	t.Logf("damaged a frame of epoch %d", bad)
	if !strings.Contains(p.Primary.Output(), "checksum") {
		t.Errorf("the primary was not told that a checksum failed")
	}

	// Protection recovers: a new session (epochs numbered from 1 again)
	// commits on the second connection.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		eps, err := p.Epochs()
		if err != nil {
			t.Fatal(err)
		}
		restarted := 0
		for i := 1; i < len(eps); i++ {
			if eps[i].Epoch < eps[i-1].Epoch {
				restarted = len(eps) - i
			}
		}
		if restarted >= 10 && proxy.conns.Load() >= 2 {
			t.Logf("new session committed %d epochs after the damaged one", restarted)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("protection did not recover: %d epochs logged, %d connections", len(eps), proxy.conns.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r, err := lab.ReadReport(p.Report); err == nil {
		t.Fatalf("the backup failed over (epoch %d) on a corrupt frame", r.Epoch)
	}

	// And a failover now resumes the same boot.
	vm.Kill()
	p.Primary.Kill()
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := l.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Minute))
	cl := counter.NewClient(conn)
	got, err := cl.Get()
	if err != nil {
		t.Fatal(err)
	}
	checkGuestMemory(t, cl)
	if got.BootID != ready.BootID {
		t.Fatalf("resumed guest has boot id %s, want %s", got.BootID, ready.BootID)
	}
	t.Logf("after recovery, failover resumed epoch %d of the new session, same boot", r.Epoch)
}

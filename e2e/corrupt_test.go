package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/testvm/counter"
)

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

	var proxy *lab.LinkProxy
	p, err := l.Protect(prim, back, lab.ProtectOptions{HeartbeatTimeout: heartbeatTimeout, Via: func(backup string) (string, error) {
		var err error
		if proxy, err = lab.NewLinkProxy("127.0.0.1:0", backup, 1); err != nil {
			return "", err
		}
		t.Cleanup(proxy.Close)
		return proxy.Addr(), nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	dump(t, l, p)
	// One byte of the next RAM frame flipped, after 30 commits.
	if _, err := p.WaitCommitted(ctx, 30); err != nil {
		t.Fatal(err)
	}
	proxy.Damage(lab.Corrupt)

	// The backup reports the damaged epoch and keeps its committed image.
	if _, err := p.Backup.WaitLine(ctx, "discarded epoch"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Primary.WaitLine(ctx, "protection lost"); err != nil {
		t.Fatal(err)
	}
	t.Logf("damaged: %v", proxy.Damaged())
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
		if restarted >= 10 && proxy.Connections() >= 2 {
			t.Logf("new session committed %d epochs after the damaged one", restarted)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("protection did not recover: %d epochs logged, %d connections", len(eps), proxy.Connections())
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

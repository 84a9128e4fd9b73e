// Package e2e holds the end-to-end tests: the real test guest under QEMU,
// protected by two remusd processes on loopback, reached over a real network
// (taps on a bridge in a network namespace the test made), with the primary
// killed at chosen points of the epoch cycle.
package e2e

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/testvm/counter"
)

var (
	remusdOnce sync.Once
	remusdDir  string
	remusdErr  error
)

// TestMain removes the remusd built for this test binary when it is done.
func TestMain(m *testing.M) {
	code := m.Run()
	if remusdDir != "" {
		os.RemoveAll(remusdDir)
	}
	os.Exit(code)
}

// newLab skips without root, /dev/net/tun, QEMU or the guest kernel, and
// otherwise sets up a lab that is torn down with the test. remusd is built
// once per test binary.
func newLab(t testing.TB) *lab.Lab {
	t.Helper()
	testenv.RequireTun(t)
	testenv.RequireIP(t)
	qemu := testenv.RequireQEMU(t)
	if _, err := testvm.FindKernel(); errors.Is(err, testvm.ErrNoKernel) {
		t.Skipf("needs the guest kernel: %v", err)
	}
	remusdOnce.Do(func() {
		if remusdDir, remusdErr = os.MkdirTemp("", "remus-e2e-"); remusdErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		remusdErr = lab.BuildRemusd(ctx, filepath.Join(remusdDir, "remusd"))
	})
	if remusdErr != nil {
		t.Fatal(remusdErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l, err := lab.New(ctx, lab.Options{QEMU: qemu, Remusd: filepath.Join(remusdDir, "remusd")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// dump logs the agents' output and the consoles when the test failed.
func dump(t *testing.T, l *lab.Lab, p *lab.Protection) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, pr := range []*lab.Proc{p.Primary, p.Backup} {
			if pr != nil {
				t.Logf("%s output:\n%s", pr.Name, pr.Output())
			}
		}
		for _, role := range []string{"primary", "backup"} {
			b, _ := os.ReadFile(filepath.Join(l.Dir, role+"-console.log"))
			t.Logf("%s console:\n%s", role, b)
		}
	})
}

// lastEpoch returns the newest record of the epoch log.
func lastEpoch(t *testing.T, p *lab.Protection) agent.EpochRecord {
	t.Helper()
	eps, err := p.Epochs()
	if err != nil {
		t.Fatal(err)
	}
	if len(eps) == 0 {
		t.Fatal("no epoch committed")
	}
	return eps[len(eps)-1]
}

// protectedGuest is a booted primary guest and the backup's configuration,
// ready for lab.Protect (whose remusd connects the guest's NIC to the lab's
// network).
type protectedGuest struct {
	prim, back testvm.Config
	vm         *testvm.VM
	ready      testvm.Ready
}

// bootPrimary boots the primary guest with the page dirtier at dirtyPerSec
// and prepares the backup's side.
// checkGuestMemory has a resumed guest check its dirtier's memory: a
// checkpoint that missed a write (a tracker, the live sync, an apply)
// leaves pages out of generation order.
func checkGuestMemory(t testing.TB, c *counter.Client) {
	t.Helper()
	r, err := c.Check()
	if err != nil {
		t.Fatalf("memory check in the resumed guest: %v", err)
	}
	if r.Value != 0 {
		t.Fatalf("resumed guest's memory: %d pages of its dirtier out of order: the checkpoint missed writes", r.Value)
	}
}

func bootPrimary(t testing.TB, l *lab.Lab, ctx context.Context, dirtyPerSec int, opts ...func(*protectedGuest) error) *protectedGuest {
	t.Helper()
	g := &protectedGuest{prim: l.GuestConfig("primary", dirtyPerSec), back: l.GuestConfig("backup", dirtyPerSec)}
	g.back.RAMPath = filepath.Join(l.Dir, "backup-image.ram")
	for _, o := range opts {
		if err := o(g); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if g.vm, err = l.StartVM(ctx, g.prim); err != nil {
		t.Fatal(err)
	}
	if g.ready, err = g.vm.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return g
}

// withDisk gives the guest a disk of sizeMiB, mirrored to the backup's copy.
func withDisk(l *lab.Lab, sizeMiB int) func(*protectedGuest) error {
	return func(g *protectedGuest) error { return l.AddDisk(&g.prim, &g.back, sizeMiB) }
}

// protectWithFault protects g with the primary armed to stop at point of
// the first epoch after the returned trigger file exists, waits for the
// first (full) checkpoint to commit (the guest's output waits for it) and
// connects to the guest's counter service.
func protectWithFault(t *testing.T, ctx context.Context, l *lab.Lab, g *protectedGuest, point string, o lab.ProtectOptions) (p *lab.Protection, conn net.Conn, trigger string) {
	t.Helper()
	trigger = l.Dir + "/kill-now"
	o.HeartbeatTimeout = heartbeatTimeout
	o.PrimaryArgs = append([]string{"--fault", point + ":1", "--fault-trigger", trigger}, o.PrimaryArgs...)
	p, err := l.Protect(g.prim, g.back, o)
	if err != nil {
		t.Fatal(err)
	}
	dump(t, l, p)
	if _, err := p.WaitCommitted(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if conn, err = l.Dial(ctx); err != nil {
		t.Fatalf("connect to the guest: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return p, conn, trigger
}

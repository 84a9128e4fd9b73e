package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/lab"
)

// TestFenceCommandDecidesTheFailover gives the backup a fence command that
// fails until it is allowed to succeed. The primary's host dies: while the
// fence fails the backup does not resume the guest (the primary might still
// run it) and says why; once the fence succeeds it resumes, the same boot,
// and the client's counter on its connection carries on.
func TestFenceCommandDecidesTheFailover(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	allow := filepath.Join(l.Dir, "fence-allowed")
	calls := filepath.Join(l.Dir, "fence-calls")
	script := filepath.Join(l.Dir, "fence.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"$1 $2\" >> "+calls+"\n"+
		"test -e "+allow+" || { echo 'the power switch does not answer'; exit 1; }\necho \"powered off $2\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{BackupArgs: []string{"--fence-command", script}}, 3)
	c.incFor(time.Second)

	// The host dies: its agent first, so that it cannot notice its QEMU
	// gone and hand the guest over (that needs no fence).
	p.Primary.Kill()
	g.vm.Kill()
	if _, err := p.Backup.WaitLine(ctx, "fencing the primary failed"); err != nil {
		t.Fatal(err)
	}
	if _, err := lab.ReadReport(p.Report); err == nil {
		t.Fatal("the backup resumed the guest although the fence failed")
	}
	if !strings.Contains(p.Backup.Output(), "the power switch does not answer") {
		t.Errorf("the backup's log does not give the fence command's reason:\n%s", p.Backup.Output())
	}
	if err := touch(allow); err != nil {
		t.Fatal(err)
	}
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Cause, "fenced") {
		t.Fatalf("failover cause %q, want the fence named", r.Cause)
	}
	b, _ := os.ReadFile(calls)
	if n := strings.Count(string(b), "lab 127.0.0.1\n"); n < 2 {
		t.Fatalf("fence calls %q: want at least two, each with the VM name and the primary's address", b)
	}
	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s after the failover, want %s", c.last.BootID, g.ready.BootID)
	}
	t.Logf("resumed epoch %d after %d fence calls; %d consecutive replies", r.Epoch, strings.Count(string(b), "\n"), c.n)
}

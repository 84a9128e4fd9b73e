package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/qmp"
)

// TestMirrorJobEndEndsTheSession cancels the disk's mirror job behind
// remusd's back (as an operator's block-job-cancel, or a target I/O error,
// would end it). From then on QEMU no longer copies the guest's writes, so
// no further epoch may commit as if the disk were in step: the primary's
// next checkpoint fails, the session ends with a goodbye (no failover), and
// the next session mirrors the disk again and protects the guest.
func TestMirrorJobEndEndsTheSession(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{}, 3, withDisk(l, 64))
	c.incFor(500 * time.Millisecond)

	mon, err := qmp.Dial(ctx, g.prim.QMP[0])
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if err := mon.Execute(ctx, "block-job-cancel", map[string]any{"device": "remus-mirror", "force": true}, nil); err != nil {
		t.Fatalf("cancel the mirror: %v", err)
	}
	if _, err := p.Primary.WaitLine(ctx, "the disk mirror job"); err != nil {
		t.Fatalf("the primary did not notice the mirror's end: %v", err)
	}
	before, _ := p.Epochs()
	// Protected again: a new session, a new mirror, new epochs.
	if _, err := p.WaitCommitted(ctx, len(before)+3); err != nil {
		t.Fatalf("not protected again after the mirror ended: %v", err)
	}
	if n := strings.Count(p.Primary.Output(), "disk in step"); n < 2 {
		t.Fatalf("the disk was brought in step %d times, want again after the mirror ended", n)
	}
	if _, err := lab.ReadReport(p.Report); err == nil {
		t.Fatal("the backup failed over when the primary's mirror ended")
	}
	c.incFor(500 * time.Millisecond)
}

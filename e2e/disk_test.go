package e2e

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/testvm/counter"
)

// TestDiskFailover: the counter service appends and fsyncs a record per
// request to its virtio disk, mirrored to the backup's image with the
// epochs. The client waits for each reply; the primary is killed at each
// point of the epoch cycle. After the failover the backup's disk holds the
// record of every reply the client received, contiguous, and none beyond
// the resumed guest's counter: the writes of the epoch that never
// committed (they reach the backup before its commit, at "shipping" and
// "shipped") are not there.
func TestDiskFailover(t *testing.T) {
	for _, point := range killPoints {
		t.Run(point, func(t *testing.T) { diskFailoverAt(t, point) })
	}
}

func diskFailoverAt(t *testing.T, point string) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootPrimary(t, l, ctx, 40000, withDisk(l, 64))
	p, conn, trigger := protectWithFault(t, ctx, l, g, point, lab.ProtectOptions{})
	if !strings.Contains(p.Primary.Output(), "disk in step") {
		t.Fatal("epoch 1 committed but the primary never reported the disk in step")
	}

	// INC after INC; once the kill is decided no new request starts.
	var (
		mu      sync.Mutex
		stop    bool
		seen    []uint64
		bootID  string
		clientE error
		done    = make(chan struct{})
	)
	go func() {
		defer close(done)
		cl := counter.NewClient(conn)
		for {
			mu.Lock()
			s := stop
			mu.Unlock()
			if s {
				return
			}
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			r, err := cl.Inc()
			mu.Lock()
			if err != nil {
				clientE = err
				mu.Unlock()
				return
			}
			seen, bootID = append(seen, r.Value), r.BootID
			mu.Unlock()
		}
	}()
	time.Sleep(3 * time.Second)
	if err := touch(trigger); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Primary.WaitLine(ctx, agent.FaultReachedPrefix); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	stop = true
	mu.Unlock()
	g.vm.Kill()
	p.Primary.Kill()
	last := lastEpoch(t, p)
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	<-done // a request in flight at the kill is answered by the resumed guest
	if clientE != nil {
		t.Fatalf("client: %v", clientE)
	}
	now, err := counter.NewClient(conn).Get()
	if err != nil {
		t.Fatalf("GET from the resumed guest: %v", err)
	}
	if now.BootID != bootID {
		t.Fatalf("resumed guest boot %s, want %s", now.BootID, bootID)
	}

	// Records 1..counter of this boot, none beyond (the blocks after the
	// last record were never written).
	n, err := checkRecords(g.back.Disk, now.Value, bootID)
	maxSeen := seen[len(seen)-1]
	t.Logf("killed at %s (primary saw epoch %d acknowledged, backup resumed %d); client saw 1..%d, resumed counter %d, %d records on the backup's disk",
		point, last.Epoch, r.Epoch, maxSeen, now.Value, n)
	if err != nil {
		t.Fatalf("the backup's disk: %v", err)
	}
	if maxSeen > now.Value {
		t.Fatalf("the client saw %d, beyond the resumed counter %d", maxSeen, now.Value)
	}
}

// TestDiskMirrorTornDownWhenProtectionEnds: when the backup goes away the
// primary remusd ends the session's mirror job and removes its NBD node
// from the guest's QEMU, and the guest's disk keeps working; a new session
// sets them up again.
func TestDiskMirrorTornDownWhenProtectionEnds(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootPrimary(t, l, ctx, 4000, withDisk(l, 64))
	p, err := l.Protect(g.prim, g.back, lab.ProtectOptions{HeartbeatTimeout: heartbeatTimeout})
	if err != nil {
		t.Fatal(err)
	}
	dump(t, l, p)
	if _, err := p.WaitCommitted(ctx, 1); err != nil {
		t.Fatal(err)
	}
	mon, err := qmp.Dial(ctx, g.prim.QMP[0])
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	type job struct {
		Device string `json:"device"`
	}
	type node struct {
		NodeName string `json:"node-name"`
	}
	mirrored := func() (jobs, nodes int) {
		js, err := qmp.Run[[]job](ctx, mon, "query-block-jobs", nil)
		if err != nil {
			t.Fatal(err)
		}
		ns, err := qmp.Run[[]node](ctx, mon, "query-named-block-nodes", map[string]any{"flat": true})
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range ns {
			if n.NodeName == "remus-mirror-target" {
				nodes++
			}
		}
		return len(js), nodes
	}
	if j, n := mirrored(); j != 1 || n != 1 {
		t.Fatalf("while protected: %d block jobs, %d mirror target nodes; want 1 and 1", j, n)
	}

	p.Backup.Kill()
	if _, err := p.Primary.WaitLine(ctx, "protection lost"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		j, n := mirrored()
		if j == 0 && n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the session ended: %d block jobs, %d mirror target nodes left", j, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The guest's disk still works, unprotected.
	conn, err := l.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Minute))
	if _, err := counter.NewClient(conn).Inc(); err != nil {
		t.Fatalf("INC (an fsync'd disk write) without protection: %v", err)
	}
}

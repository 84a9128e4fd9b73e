package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/testvm/counter"
)

// killPoints are the points of the epoch cycle at which the primary is
// killed: the guest paused, just resumed, the epoch half sent, all sent and
// not yet acknowledged, acknowledged.
var killPoints = []string{"paused", "resumed", "shipping", "shipped", "acked"}

// TestOutputCommitKeepsConnectionThroughFailover: a client holds one TCP
// connection to the guest and sends requests back to back while the primary
// is killed at each point of the epoch cycle. With output commit the same
// connection goes on after the failover, every reply is the previous one
// plus one, with the same boot id: nothing the client saw is lost or
// repeated.
func TestOutputCommitKeepsConnectionThroughFailover(t *testing.T) {
	for _, point := range killPoints {
		t.Run(point, func(t *testing.T) {
			run := connectionThroughFailover(t, point, false)
			if run.anomaly != "" {
				t.Fatalf("with output commit: %s", run.anomaly)
			}
			if run.after < 10 {
				t.Fatalf("only %d replies after the failover", run.after)
			}
			t.Logf("one connection, %d replies before the kill and %d after it, consecutive, boot %s", run.before, run.after, run.bootID)
		})
	}
}

// TestWithoutOutputCommitAFailoverTakesBackReplies is the same run with the
// guest's output let straight through (remusd primary
// --net-output-commit=false). A client then sees replies from guest state
// that the backup never received, and the failover takes them back: a value
// repeats, or the connection stalls because the resumed guest never sent
// bytes the client already acknowledged. This shows that the test above can
// see what output commit prevents. The epoch is 100 ms here: at 25 ms the
// guest, paused for much of each epoch under TCG, sometimes answers nothing
// between the last committed pause and the kill, and then nothing is lost.
func TestWithoutOutputCommitAFailoverTakesBackReplies(t *testing.T) {
	for _, point := range killPoints {
		var run failoverRun
		t.Run(point, func(t *testing.T) { run = connectionThroughFailover(t, point, true, "--epoch", "100ms") })
		if run.anomaly != "" {
			t.Logf("without output commit, killed at %s: %s", point, run.anomaly)
			return
		}
		t.Logf("without output commit, killed at %s: no reply lost this time (%d then %d)", point, run.lastBefore, run.firstAfter)
	}
	t.Fatalf("in %d failovers without output commit the client never lost or saw a repeated reply", len(killPoints))
}

// failoverRun is what the client saw through one failover.
type failoverRun struct {
	before, after int    // replies before the kill and after it
	lastBefore    uint64 // the last value before the kill
	firstAfter    uint64 // the first value after it
	bootID        string // of the first reply
	anomaly       string // the first reply that was not the previous one plus 1, or the error that ended the connection
}

// connectionThroughFailover boots and protects the guest, keeps one client
// connection busy, kills the primary at point and goes on until 20 replies
// came after the failover or the connection failed.
func connectionThroughFailover(t *testing.T, point string, noOutputCommit bool, primaryArgs ...string) failoverRun {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootPrimary(t, l, ctx, 40000)

	p, conn, trigger := protectWithFault(t, ctx, l, g, point, lab.ProtectOptions{NoOutputCommit: noOutputCommit, PrimaryArgs: primaryArgs})

	// The client sends INC after INC on its one connection. A request
	// waits up to replyWait: one sent around the kill is answered once TCP
	// retransmits it to the resumed guest, a few seconds at most; without
	// output commit a connection can stall for good.
	replyWait := 30 * time.Second
	if noOutputCommit {
		replyWait = 15 * time.Second
	}
	var (
		mu       sync.Mutex
		run      failoverRun
		killed   bool
		prev     uint64
		finished = make(chan struct{})
	)
	go func() {
		defer close(finished)
		cl := counter.NewClient(conn)
		for {
			conn.SetDeadline(time.Now().Add(replyWait))
			r, err := cl.Inc()
			mu.Lock()
			switch {
			case err != nil:
				run.anomaly = fmt.Sprintf("after %d replies (%d since the kill): the connection failed: %v", run.before+run.after, run.after, err)
			case run.bootID == "":
				run.bootID = r.BootID
			case r.BootID != run.bootID:
				run.anomaly = fmt.Sprintf("reply %d came from boot %s, not %s", r.Value, r.BootID, run.bootID)
			case r.Value != prev+1:
				run.anomaly = fmt.Sprintf("reply %d after %d (the kill was %d replies ago)", r.Value, prev, run.after)
			}
			if err == nil {
				prev = r.Value
				if killed {
					if run.after == 0 {
						run.firstAfter = r.Value
					}
					run.after++
				} else {
					run.before++
					run.lastBefore = r.Value
				}
			}
			done := run.anomaly != "" || run.after >= 20
			mu.Unlock()
			if done {
				return
			}
		}
	}()

	// Protected for 3 s, then the kill at the chosen point.
	time.Sleep(3 * time.Second)
	if err := touch(trigger); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Primary.WaitLine(ctx, agent.FaultReachedPrefix); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	g.vm.Kill()
	p.Primary.Kill()
	killed = true
	mu.Unlock()

	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	last := lastEpoch(t, p)
	t.Logf("killed at %s; the primary saw epoch %d acknowledged last, the backup resumed epoch %d (detection %.0f ms, restore %.0f ms)",
		point, last.Epoch, r.Epoch, r.DetectionMS, r.RestoreMS)
	select {
	case <-finished:
	case <-ctx.Done():
		t.Fatal("the client did not finish")
	}
	conn.Close()
	mu.Lock()
	defer mu.Unlock()
	return run
}

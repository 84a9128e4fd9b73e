package witness

import (
	"strings"
	"testing"
	"time"
)

func TestGuard(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	ms := time.Millisecond
	g := Guard{StopBudget: 200 * ms, Grace: 250 * ms}
	if ok, why := g.MayRun(t0); ok || !strings.Contains(why, "no witness lease") {
		t.Fatalf("fresh guard: %v %q, want no run without a lease", ok, why)
	}
	// Granted at t0 for 2 s: trusted until 2s - 5% - 200ms = 1.7 s.
	g.Renewed(Lease{Sent: t0, TTL: 2 * time.Second})
	for _, c := range []struct {
		at  time.Duration
		run bool
	}{{0, true}, {1699 * ms, true}, {1700 * ms, false}, {3 * time.Second, false}} {
		if ok, why := g.MayRun(at(c.at)); ok != c.run {
			t.Fatalf("at %v: may run %v (%s), want %v", c.at, ok, why, c.run)
		}
		if g.LeaseTrusted(at(c.at)) != c.run {
			t.Fatalf("at %v: lease trusted %v, want %v", c.at, !c.run, c.run)
		}
	}
	// A renewal answered late but sent early counts from when it was sent;
	// an older renewal never shortens the trust.
	g.Renewed(Lease{Sent: at(time.Second), TTL: 2 * time.Second})
	g.Renewed(Lease{Sent: at(500 * ms), TTL: 2 * time.Second})
	if !g.LeaseTrusted(at(2699*ms)) || g.LeaseTrusted(at(2700*ms)) {
		t.Fatal("trust after the second renewal: want until 2.7 s")
	}
	// Without the lease, the backup's acknowledgements keep the guest
	// running for Grace after each.
	g.Heard(at(2900 * ms))
	if ok, _ := g.MayRun(at(3100 * ms)); !ok {
		t.Fatal("acknowledged 200 ms ago: want run")
	}
	if ok, why := g.MayRun(at(3150 * ms)); ok || !strings.Contains(why, "no acknowledgement from the backup for 250ms") {
		t.Fatalf("acknowledged 250 ms ago, no lease: %v %q, want stop", ok, why)
	}
	if g.LeaseTrusted(at(3100 * ms)) {
		t.Fatal("acknowledgements must not make the lease trusted (output passes only under the lease)")
	}
	g.Renewed(Lease{Sent: at(4 * time.Second), TTL: 2 * time.Second})
	g.Lost()
	if ok, _ := g.MayRun(at(4 * time.Second)); ok {
		t.Fatal("lease lost: want stop")
	}
}

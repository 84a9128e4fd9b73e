package checkpoint

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/remus-kvm/remus/witness"
)

// TestSimWitnessFollowsPackageWitness checks the simulated etcd against the
// rules of witness/witness.go, as its tests against a real etcd play them:
// who may Hold and Claim, when a lease ends, what Release leaves, and what
// a caller sees across a path that holds or loses its messages.
func TestSimWitnessFollowsPackageWitness(t *testing.T) {
	cfg := simDefaults()
	cfg.Witness = true
	w := newSimWorld(1, cfg, true)
	x := w.wit
	p, b, s := x.client("primary", nil), x.client("backup", nil), x.client("second", nil)
	defer func() {
		if t.Failed() {
			t.Logf("trace:\n%s", w.trace)
		}
	}()
	// call runs one request to its end and returns its error.
	call := func(op func(func(witness.Lease, error))) error {
		var got error
		done := false
		op(func(_ witness.Lease, err error) { got, done = err, true })
		for i := 0; !done && i < 1000; i++ {
			w.runFor(time.Millisecond)
		}
		if !done {
			t.Fatal("no answer and no timeout")
		}
		return got
	}
	hold := func(c *simWitnessClient) error {
		return call(func(f func(witness.Lease, error)) { c.Hold(time.Second, f) })
	}
	claim := func(c *simWitnessClient) error {
		return call(func(f func(witness.Lease, error)) { c.Claim(time.Second, f) })
	}
	renew := func(c *simWitnessClient) error {
		return call(func(f func(witness.Lease, error)) { c.Renew(time.Second, f) })
	}
	keys := func(owner, active string) {
		t.Helper()
		x.expire()
		if x.owner != owner || x.liveActive() != active {
			t.Fatalf("at %v: owner %q active %q, want %q and %q", w.elapsed(), x.owner, x.liveActive(), owner, active)
		}
	}

	if err := claim(b); !errors.Is(err, witness.ErrUnguarded) {
		t.Fatalf("claim before any primary held the keys: %v, want ErrUnguarded", err)
	}
	if err := hold(p); err != nil {
		t.Fatalf("first hold: %v", err)
	}
	keys("primary", "primary")
	if err := hold(s); !errors.Is(err, witness.ErrOwnedElsewhere) {
		t.Fatalf("hold by another side: %v, want ErrOwnedElsewhere", err)
	}
	// Renewed for three TTLs: every claim is refused.
	for end := w.now.Add(3 * x.ttl); w.now.Before(end); w.runFor(x.ttl / 4) {
		if err := renew(p); err != nil {
			t.Fatal(err)
		}
		if err := claim(b); !errors.Is(err, witness.ErrHeld) {
			t.Fatalf("claim while the primary renews: %v, want ErrHeld", err)
		}
	}
	// The lease ends a TTL after the last renewal etcd received.
	if err := renew(p); err != nil {
		t.Fatal(err)
	}
	renewedAt := w.now
	w.runFor(x.ttl - 20*time.Millisecond)
	if err := claim(b); !errors.Is(err, witness.ErrHeld) {
		t.Fatalf("claim %v after the last renewal: %v, want ErrHeld", w.now.Sub(renewedAt), err)
	}
	w.runFor(20 * time.Millisecond)
	if err := claim(b); err != nil {
		t.Fatalf("claim %v after the last renewal: %v", w.now.Sub(renewedAt), err)
	}
	keys("backup", "backup")
	if err := renew(p); !errors.Is(err, witness.ErrLeaseGone) || p.lease != 0 {
		t.Fatalf("renew of an expired lease: %v (lease %d), want ErrLeaseGone and no lease", err, p.lease)
	}
	if err := hold(p); !errors.Is(err, witness.ErrOwnedElsewhere) {
		t.Fatalf("hold once the backup claimed: %v, want ErrOwnedElsewhere", err)
	}
	// A claim of one's own active key takes it over.
	old := b.lease
	if err := claim(b); err != nil || b.lease == old {
		t.Fatalf("claim of its own key: %v (lease %d, was %d)", err, b.lease, old)
	}
	keys("backup", "backup")
	// Release drops the active key; the owner stays.
	var rerr error
	released := false
	b.Release(time.Second, func(err error) { rerr, released = err, true })
	w.runFor(100 * time.Millisecond)
	if !released || rerr != nil || b.lease != 0 {
		t.Fatalf("release: done %v, %v, lease %d", released, rerr, b.lease)
	}
	keys("backup", "")
	if err := claim(b); err != nil {
		t.Fatalf("claim after a release: %v", err)
	}

	// Down: nothing expires; back up: every lease has its TTL again.
	x.down(5 * time.Second)
	if err := renew(b); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("renew while etcd is down: %v, want a timeout", err)
	}
	w.runFor(x.downUntil.Sub(w.now))
	keys("backup", "backup")
	w.runFor(x.ttl - 10*time.Millisecond)
	keys("backup", "backup")
	w.runFor(20 * time.Millisecond)
	keys("backup", "")

	// A path that holds: the request times out at the caller and is
	// carried out at etcd when the path heals.
	if err := claim(b); err != nil {
		t.Fatal(err)
	}
	w.runFor(x.ttl + time.Millisecond)
	keys("backup", "")
	x.partition("primary", 3*time.Second, false)
	x.owner = "primary" // as if the primary had held it: its Hold succeeds
	if err := hold(p); !errors.Is(err, context.DeadlineExceeded) || p.lease != 0 {
		t.Fatalf("hold across a held path: %v (lease %d), want a timeout and no lease", err, p.lease)
	}
	keys("primary", "")
	w.runFor(3 * time.Second)
	keys("primary", "primary")
	if p.lease != 0 {
		t.Fatal("the answer to a request that timed out was taken")
	}
	// A path that loses: the request never arrives.
	w.runFor(x.ttl)
	x.partition("backup", time.Second, true)
	if err := claim(b); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("claim across a lossy path: %v, want a timeout", err)
	}
	w.runFor(2 * time.Second)
	keys("primary", "")
}

package witness

import (
	"context"
	"errors"
	"testing"
	"time"
)

// startEtcd runs a single-node etcd for one test (Debian's etcd-server,
// which `make setup` installs).
func startEtcd(t *testing.T) *Local {
	t.Helper()
	l, err := StartLocal(context.Background(), LocalConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Stop)
	return l
}

func open(t *testing.T, l *Local, id string) *Witness {
	t.Helper()
	w, err := Open(Config{Endpoints: []string{l.Endpoint}}, "vm1", id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestClaimOnlyAfterTheLeaseExpires plays a failover: the primary holds the
// guest; the backup's claim is refused while the primary renews, succeeds
// once the primary stopped renewing for the TTL, and from then on the
// primary finds its lease gone and the guest owned elsewhere.
func TestClaimOnlyAfterTheLeaseExpires(t *testing.T) {
	l := startEtcd(t)
	p, b := open(t, l, "a:primary"), open(t, l, "b:backup")
	lease, err := p.Hold(ctxT(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if lease.TTL != DefaultTTL {
		t.Fatalf("lease TTL %v, want %v", lease.TTL, DefaultTTL)
	}
	st, err := b.Status(ctxT(t, 5*time.Second))
	if err != nil || st.Owner != "a:primary" || st.Active != "a:primary" || st.Left <= 0 {
		t.Fatalf("status %+v (%v): want a:primary owner and active with time left", st, err)
	}
	// Renewed for three TTLs: every claim is refused.
	for end := time.Now().Add(3 * DefaultTTL); time.Now().Before(end); time.Sleep(DefaultTTL / 4) {
		if _, err := p.Renew(ctxT(t, time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Claim(ctxT(t, time.Second)); !errors.Is(err, ErrHeld) {
			t.Fatalf("claim while the primary renews: %v, want ErrHeld", err)
		}
	}
	// The primary stops renewing: the claim succeeds within TTL (+ etcd's
	// expiry check period).
	stopped := time.Now()
	for {
		_, err := b.Claim(ctxT(t, time.Second))
		if err == nil {
			break
		}
		if !errors.Is(err, ErrHeld) {
			t.Fatal(err)
		}
		if time.Since(stopped) > 3*DefaultTTL {
			t.Fatalf("claim still refused %v after the primary stopped renewing: %v", time.Since(stopped), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if d := time.Since(stopped); d < DefaultTTL-DefaultTTL/4 {
		t.Fatalf("claimed %v after the last renewal: before the TTL", d)
	}
	if _, err := p.Renew(ctxT(t, time.Second)); !errors.Is(err, ErrLeaseGone) {
		t.Fatalf("primary renews after expiry: %v, want ErrLeaseGone", err)
	}
	if _, err := p.Hold(ctxT(t, time.Second)); !errors.Is(err, ErrOwnedElsewhere) {
		t.Fatalf("primary holds again after the backup claimed: %v, want ErrOwnedElsewhere", err)
	}
	st, _ = b.Status(ctxT(t, time.Second))
	if st.Owner != "b:backup" || st.Active != "b:backup" {
		t.Fatalf("status %+v: want b:backup owner and active", st)
	}
}

// TestRestartedSideTakesItsOwnLease: an agent restarted on the same side
// takes over the lease its predecessor left, at once; the other side still
// cannot claim.
func TestRestartedSideTakesItsOwnLease(t *testing.T) {
	l := startEtcd(t)
	if _, err := open(t, l, "a:primary").Hold(ctxT(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	again := open(t, l, "a:primary")
	if _, err := again.Hold(ctxT(t, time.Second)); err != nil {
		t.Fatalf("restarted primary: %v", err)
	}
	if _, err := again.Renew(ctxT(t, time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := open(t, l, "b:backup").Claim(ctxT(t, time.Second)); !errors.Is(err, ErrHeld) {
		t.Fatalf("claim: %v, want ErrHeld", err)
	}
	// The backup, restarted after failing over, takes its own lease back.
	b := open(t, l, "b:backup")
	time.Sleep(DefaultTTL + time.Second)
	if _, err := b.Claim(ctxT(t, time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := open(t, l, "b:backup").Claim(ctxT(t, time.Second)); err != nil {
		t.Fatalf("backup restarted after failover: %v", err)
	}
}

// TestReleaseLetsTheOtherSideClaimAtOnce: a switchover releases the
// primary's lease; the backup claims without waiting for the TTL.
func TestReleaseLetsTheOtherSideClaimAtOnce(t *testing.T) {
	l := startEtcd(t)
	p, b := open(t, l, "a"), open(t, l, "b")
	if _, err := p.Hold(ctxT(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(ctxT(t, time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Claim(ctxT(t, time.Second)); err != nil {
		t.Fatalf("claim right after the release: %v", err)
	}
	if _, err := p.Hold(ctxT(t, time.Second)); !errors.Is(err, ErrOwnedElsewhere) {
		t.Fatalf("the released side holds again: %v, want ErrOwnedElsewhere", err)
	}
	// A release by a side that no longer holds the key leaves it alone.
	if err := p.Release(ctxT(t, time.Second)); err != nil {
		t.Fatal(err)
	}
	if st, _ := b.Status(ctxT(t, time.Second)); st.Active != "b" {
		t.Fatalf("status %+v: want b active", st)
	}
}

// TestUnreachableWitnessIsNotHeld: a witness that does not answer gives a
// timeout, never ErrHeld or success (the backup must not take it for a
// live primary, nor for a free guest).
func TestUnreachableWitnessIsNotHeld(t *testing.T) {
	l := startEtcd(t)
	p, b := open(t, l, "a:primary"), open(t, l, "b:backup")
	if _, err := p.Hold(ctxT(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := l.Pause(); err != nil {
		t.Fatal(err)
	}
	_, err := b.Claim(ctxT(t, 500*time.Millisecond))
	if err == nil || errors.Is(err, ErrHeld) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("claim against a paused etcd: %v, want a deadline error", err)
	}
	if _, err := p.Renew(ctxT(t, 500*time.Millisecond)); err == nil || errors.Is(err, ErrLeaseGone) {
		t.Fatalf("renew against a paused etcd: %v, want a timeout", err)
	}
	l.Resume()
	if _, err := p.Renew(ctxT(t, 5*time.Second)); err != nil {
		t.Fatalf("renew once etcd is back: %v", err)
	}
}

func TestOpenRefusesIncompleteConfig(t *testing.T) {
	if _, err := Open(Config{}, "vm", "a"); err == nil {
		t.Fatal("no endpoints accepted")
	}
	if _, err := Open(Config{Endpoints: []string{"http://127.0.0.1:1"}}, "", "a"); err == nil {
		t.Fatal("no VM name accepted")
	}
	if _, err := Open(Config{Endpoints: []string{"http://127.0.0.1:1"}, CACert: "/nonexistent/ca.pem"}, "vm", "a"); err == nil {
		t.Fatal("a missing CA file accepted")
	}
}

// TestClaimRefusedForAnUnguardedPrimary: a primary that never held the keys
// (run without the witness) does not stop its guest when cut off: the
// backup's claim must not succeed.
func TestClaimRefusedForAnUnguardedPrimary(t *testing.T) {
	l := startEtcd(t)
	if _, err := open(t, l, "b:backup").Claim(ctxT(t, 5*time.Second)); !errors.Is(err, ErrUnguarded) {
		t.Fatalf("claim with no primary ever: %v, want ErrUnguarded", err)
	}
}

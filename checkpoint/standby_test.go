package checkpoint

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/transport"
)

// standbyRig drives a Standby with a fake clock, and keeps what it did.
type standbyRig struct {
	t    *testing.T
	sb   *Standby
	now  time.Time
	acts []any // every action so far
}

var rigHeartbeat = failover.DetectorConfig{Interval: 100 * time.Millisecond, Timeout: 500 * time.Millisecond}

func newStandbyRig(t *testing.T) *standbyRig {
	t.Helper()
	sb, err := NewStandby(StandbyConfig{VMName: "vm1", Heartbeat: rigHeartbeat})
	if err != nil {
		t.Fatal(err)
	}
	return &standbyRig{t: t, sb: sb, now: time.Unix(1000, 0)}
}

func (r *standbyRig) step(ev any) []any {
	acts := r.sb.Step(ev)
	r.acts = append(r.acts, acts...)
	return acts
}

func (r *standbyRig) hello(c ConnID) []any {
	return r.step(HelloIn{Now: r.now, Conn: c, Hello: transport.Hello{Version: transport.Version, Role: transport.RolePrimary, VMName: "vm1", RAMSize: 1 << 20, PageSize: transport.PageSize}})
}

// commit stages, applies and acks epoch n on c.
func (r *standbyRig) commit(c ConnID, n uint64) {
	r.t.Helper()
	r.step(FrameHeard{Now: r.now, Conn: c})
	if acts := r.step(EpochStaged{Now: r.now, Conn: c, Epoch: n}); !hasAction[Apply](acts) {
		r.t.Fatalf("epoch %d staged: actions %v, want Apply", n, acts)
	}
	if acts := r.step(Applied{Now: r.now, Conn: c, Epoch: n}); !hasAction[SendAck](acts) {
		r.t.Fatalf("epoch %d applied: actions %v, want SendAck", n, acts)
	}
}

// advance ticks the clock forward by d in steps of 10 ms.
func (r *standbyRig) advance(d time.Duration) []any {
	var all []any
	for end := r.now.Add(d); r.now.Before(end); {
		r.now = r.now.Add(10 * time.Millisecond)
		all = append(all, r.step(Tick{Now: r.now})...)
	}
	return all
}

func hasAction[T any](acts []any) bool {
	for _, a := range acts {
		if _, ok := a.(T); ok {
			return true
		}
	}
	return false
}

func failOvers(acts []any) []FailOver {
	var out []FailOver
	for _, a := range acts {
		if f, ok := a.(FailOver); ok {
			out = append(out, f)
		}
	}
	return out
}

func (r *standbyRig) wantNoFailOver() {
	r.t.Helper()
	if f := failOvers(r.acts); len(f) > 0 {
		r.t.Fatalf("failed over: %+v", f)
	}
}

// Defect 1: a primary that ends its session while alive (a local error, a
// restart) says goodbye; the backup must not fail over afterwards, however
// long the silence.
func TestStandbyGoodbyeNeverFailsOver(t *testing.T) {
	r := newStandbyRig(t)
	r.hello(1)
	r.commit(1, 1)
	r.commit(1, 2)
	acts := r.step(GoodbyeIn{Now: r.now, Conn: 1, Reason: "stop: QMP error"})
	if !hasAction[SendGoodbye](acts) {
		t.Fatalf("goodbye not confirmed: %v", acts)
	}
	r.step(ConnClosed{Now: r.now, Conn: 1, Err: errors.New("EOF")})
	r.advance(10 * time.Second)
	r.wantNoFailOver()
	if r.sb.State() != Waiting || r.sb.Committed() != 0 {
		t.Fatalf("after goodbye: state %v, committed %d; want waiting with nothing resumable", r.sb.State(), r.sb.Committed())
	}
}

// Defect 2: after a session ends without a loss, a connection that never
// says hello (a port scan, a health check) must not start a timer that
// fails over onto the old session's state.
func TestStandbyStaleEpochNeverResumed(t *testing.T) {
	r := newStandbyRig(t)
	r.hello(1)
	r.commit(1, 1)
	r.step(EpochRejected{Now: r.now, Conn: 1, Epoch: 2, Err: transport.ErrCorrupt})
	r.step(ConnClosed{Now: r.now, Conn: 1, Err: errors.New("EOF")})
	// A scan: frames heard and closes on connections that are no session.
	r.step(FrameHeard{Now: r.now, Conn: 2})
	r.step(ConnClosed{Now: r.now, Conn: 2, Err: errors.New("garbage")})
	r.advance(5 * time.Second)
	r.wantNoFailOver()
	if hasAction[SendHeartbeat](r.acts[len(r.acts)-1:]) {
		t.Fatal("heartbeats outside a session")
	}
}

// Defect 2, torn state: an epoch whose apply failed leaves nothing to
// resume, not the epoch before it.
func TestStandbyApplyFailureLeavesNothingResumable(t *testing.T) {
	r := newStandbyRig(t)
	r.hello(1)
	r.commit(1, 1)
	r.step(EpochStaged{Now: r.now, Conn: 1, Epoch: 2})
	if r.sb.Committed() != 0 {
		t.Fatalf("while applying, committed %d is resumable", r.sb.Committed())
	}
	acts := r.step(Applied{Now: r.now, Conn: 1, Epoch: 2, Err: errors.New("device state: no space left on device")})
	if !hasAction[Reject](acts) {
		t.Fatalf("failed apply: %v, want the session rejected", acts)
	}
	r.step(ConnClosed{Now: r.now, Conn: 1, Err: errors.New("EOF")})
	r.advance(5 * time.Second)
	r.wantNoFailOver()
}

// Defect 8: no heartbeat before the hello; the hello is the first frame the
// backup sends on a session.
func TestStandbyNoHeartbeatBeforeHello(t *testing.T) {
	r := newStandbyRig(t)
	if acts := r.advance(time.Second); len(acts) != 0 {
		t.Fatalf("before any hello: %v", acts)
	}
	acts := r.hello(1)
	if len(acts) == 0 {
		t.Fatal("hello not answered")
	}
	if _, ok := acts[len(acts)-1].(SendHello); !ok || hasAction[SendHeartbeat](acts) {
		t.Fatalf("hello answered with %v; want SendHello and no heartbeat", acts)
	}
	if !hasAction[SendHeartbeat](r.advance(200 * time.Millisecond)) {
		t.Fatal("no heartbeats in the session")
	}
}

func TestStandbyFailsOverOnSilenceOnce(t *testing.T) {
	r := newStandbyRig(t)
	r.hello(1)
	r.commit(1, 1)
	r.commit(1, 2)
	r.advance(450 * time.Millisecond)
	r.wantNoFailOver()
	r.advance(time.Second)
	f := failOvers(r.acts)
	if len(f) != 1 || f[0].Epoch != 2 {
		t.Fatalf("failovers %+v, want one of epoch 2", f)
	}
	if d := f[0].Declared.Sub(f[0].LastHeard); d < rigHeartbeat.Timeout || d > rigHeartbeat.Timeout+20*time.Millisecond {
		t.Fatalf("declared %v after last heard, want the timeout %v", d, rigHeartbeat.Timeout)
	}
}

// A broken connection without a goodbye is not a death by itself: the
// timeout runs from the last frame heard, and a primary that opens a new
// session in time is alive.
func TestStandbyBrokenLinkThenNewSession(t *testing.T) {
	r := newStandbyRig(t)
	r.hello(1)
	r.commit(1, 1)
	r.step(ConnClosed{Now: r.now, Conn: 1, Err: errors.New("reset")})
	if r.sb.State() != Suspect {
		t.Fatalf("state %v, want suspect", r.sb.State())
	}
	r.advance(300 * time.Millisecond)
	r.hello(2)
	if r.sb.Committed() != 0 {
		t.Fatal("the old session's epoch is still resumable in the new session")
	}
	// The new session dies before committing: nothing to resume.
	r.advance(5 * time.Second)
	r.wantNoFailOver()
}

func TestStandbyTakeOver(t *testing.T) {
	for _, committed := range []uint64{0, 3} {
		t.Run(fmt.Sprintf("committed=%d", committed), func(t *testing.T) {
			r := newStandbyRig(t)
			r.hello(1)
			for n := uint64(1); n <= committed; n++ {
				r.commit(1, n)
			}
			r.step(GoodbyeIn{Now: r.now, Conn: 1, TakeOver: true, Reason: "stop timed out"})
			f := failOvers(r.acts)
			if committed == 0 && len(f) != 0 || committed > 0 && (len(f) != 1 || f[0].Epoch != committed) {
				t.Fatalf("failovers %+v with %d committed", f, committed)
			}
		})
	}
}

// A primary agent that comes back after the failover is told the guest
// runs here, and nothing changes.
func TestStandbyRefusesPrimaryAfterFailOver(t *testing.T) {
	r := newStandbyRig(t)
	r.hello(1)
	r.commit(1, 1)
	r.advance(time.Second)
	if len(failOvers(r.acts)) != 1 {
		t.Fatal("no failover")
	}
	acts := r.hello(2)
	if len(acts) != 1 {
		t.Fatalf("hello after failover: %v", acts)
	}
	if rj, ok := acts[0].(Reject); !ok || rj.Code != transport.CodeFailedOver {
		t.Fatalf("hello after failover: %v, want a failed-over reject", acts)
	}
	if r.sb.State() != FailedOver {
		t.Fatalf("state %v", r.sb.State())
	}
}

func TestStandbyRejectsMismatchedHelloWithoutTouchingTheSession(t *testing.T) {
	r := newStandbyRig(t)
	r.hello(1)
	r.commit(1, 1)
	acts := r.step(HelloIn{Now: r.now, Conn: 2, Hello: transport.Hello{Role: transport.RolePrimary, VMName: "other"}})
	if len(acts) != 1 || !hasAction[Reject](acts) {
		t.Fatalf("mismatched hello: %v", acts)
	}
	if r.sb.Session() != 1 || r.sb.Committed() != 1 {
		t.Fatalf("session %d committed %d after a stranger's hello", r.sb.Session(), r.sb.Committed())
	}
}

// With a fence command the backup resumes the guest only once the
// primary's host was fenced: a failed fence means no failover (the primary
// may still run the guest), tried again after a timeout; a primary that
// says hello meanwhile is alive and protected again.
func TestStandbyFencesBeforeFailOver(t *testing.T) {
	newFencing := func(t *testing.T) *standbyRig {
		r := newStandbyRig(t)
		r.sb.cfg.Fence = true
		r.hello(1)
		r.commit(1, 1)
		r.commit(1, 2)
		acts := r.advance(time.Second)
		if len(failOvers(acts)) != 0 || !hasAction[Fence](acts) || r.sb.State() != Fencing {
			t.Fatalf("silence with a fence command: %v (state %v), want a fence and no failover", acts, r.sb.State())
		}
		return r
	}
	t.Run("fenced", func(t *testing.T) {
		r := newFencing(t)
		acts := r.step(FenceDone{Now: r.now})
		if f := failOvers(acts); len(f) != 1 || f[0].Epoch != 2 {
			t.Fatalf("fenced: %v, want a failover to epoch 2", acts)
		}
	})
	t.Run("fence fails, then works", func(t *testing.T) {
		r := newFencing(t)
		acts := r.step(FenceDone{Now: r.now, Err: errors.New("fence agent: exit status 1")})
		if len(failOvers(acts)) != 0 || r.sb.State() != Fencing {
			t.Fatalf("failed fence: %v, want no failover", acts)
		}
		if acts := r.advance(rigHeartbeat.Timeout / 2); hasAction[Fence](acts) {
			t.Fatalf("fenced again at once: %v", acts)
		}
		if acts := r.advance(rigHeartbeat.Timeout); !hasAction[Fence](acts) {
			t.Fatalf("no second try: %v", acts)
		}
		if f := failOvers(r.step(FenceDone{Now: r.now})); len(f) != 1 || f[0].Epoch != 2 {
			t.Fatalf("second fence worked: failovers %v", f)
		}
	})
	t.Run("the primary comes back", func(t *testing.T) {
		r := newFencing(t)
		r.step(FenceDone{Now: r.now, Err: errors.New("timeout")})
		r.hello(2)
		r.advance(5 * time.Second) // the new session commits nothing
		r.wantNoFailOver()
		if r.sb.State() != Waiting {
			t.Fatalf("state %v", r.sb.State())
		}
	})
	t.Run("a takeover needs no fence", func(t *testing.T) {
		r := newStandbyRig(t)
		r.sb.cfg.Fence = true
		r.hello(1)
		r.commit(1, 1)
		if f := failOvers(r.step(GoodbyeIn{Now: r.now, Conn: 1, TakeOver: true, Reason: "stop hung"})); len(f) != 1 {
			t.Fatalf("takeover with a fence command: failovers %v", f)
		}
	})
}

// TestStandbyClaimsTheWitnessBeforeFailOver: with a witness, a silent
// primary is resumed here only once this backup claimed the witness; a live
// lease or an unreachable witness (without a fence command) resumes
// nothing; with a fence command, an unreachable witness falls back to it.
func TestStandbyClaimsTheWitnessBeforeFailOver(t *testing.T) {
	newClaiming := func(t *testing.T, fence bool) *standbyRig {
		r := newStandbyRig(t)
		r.sb.cfg.Witness, r.sb.cfg.Fence = true, fence
		r.hello(1)
		r.commit(1, 1)
		r.commit(1, 2)
		acts := r.advance(time.Second)
		if len(failOvers(acts)) != 0 || !hasAction[Claim](acts) || hasAction[Fence](acts) || r.sb.State() != Claiming {
			t.Fatalf("silence with a witness: %v (state %v), want a claim and no failover", acts, r.sb.State())
		}
		if r.sb.Committed() != 2 {
			t.Fatalf("committed %d while claiming, want 2", r.sb.Committed())
		}
		return r
	}
	t.Run("claimed", func(t *testing.T) {
		r := newClaiming(t, false)
		if f := failOvers(r.step(ClaimDone{Now: r.now})); len(f) != 1 || f[0].Epoch != 2 {
			t.Fatalf("claimed: failovers %v, want epoch 2", f)
		}
	})
	t.Run("the primary's lease lives", func(t *testing.T) {
		r := newClaiming(t, true)
		acts := r.step(ClaimDone{Now: r.now, Held: true, Err: errors.New("held by a:primary")})
		if len(failOvers(acts)) != 0 || hasAction[Fence](acts) || r.sb.State() != Claiming {
			t.Fatalf("held: %v, want neither failover nor fence (the primary runs)", acts)
		}
		if acts := r.advance(rigHeartbeat.Interval); hasAction[Claim](acts) {
			t.Fatalf("claimed again at once: %v", acts)
		}
		if acts := r.advance(rigHeartbeat.Interval); !hasAction[Claim](acts) {
			t.Fatalf("no second claim after two heartbeat intervals: %v", acts)
		}
		if f := failOvers(r.step(ClaimDone{Now: r.now})); len(f) != 1 {
			t.Fatalf("lease expired, claimed: failovers %v", f)
		}
	})
	t.Run("witness unreachable, no fence", func(t *testing.T) {
		r := newClaiming(t, false)
		acts := r.step(ClaimDone{Now: r.now, Err: errors.New("context deadline exceeded")})
		if len(failOvers(acts)) != 0 || !hasAction[Note](acts) {
			t.Fatalf("unreachable witness: %v, want no failover and a note why", acts)
		}
		r.advance(10 * time.Second) // claims again, which stay unanswered
		r.wantNoFailOver()
	})
	t.Run("witness unreachable, fence", func(t *testing.T) {
		r := newClaiming(t, true)
		acts := r.step(ClaimDone{Now: r.now, Err: errors.New("context deadline exceeded")})
		if !hasAction[Fence](acts) || r.sb.State() != Fencing {
			t.Fatalf("unreachable witness with a fence command: %v, want a fence", acts)
		}
		if f := failOvers(r.step(FenceDone{Now: r.now})); len(f) != 1 || f[0].Epoch != 2 {
			t.Fatalf("fenced: failovers %v", f)
		}
	})
	t.Run("no new session while a claim runs", func(t *testing.T) {
		r := newClaiming(t, false)
		acts := r.hello(2)
		if !hasAction[Reject](acts) || hasAction[SendHello](acts) {
			t.Fatalf("hello during a claim: %v, want a reject", acts)
		}
		if f := failOvers(r.step(ClaimDone{Now: r.now})); len(f) != 1 {
			t.Fatalf("claimed after the refused hello: failovers %v", f)
		}
	})
	t.Run("no new session after an unanswered claim", func(t *testing.T) {
		// A claim that timed out here may have been carried out at the
		// witness: a session opened now would leave the guest nowhere
		// (the primary finds it owned by this backup and kills it).
		r := newClaiming(t, false)
		r.step(ClaimDone{Now: r.now, Err: errors.New("context deadline exceeded")})
		if acts := r.hello(2); !hasAction[Reject](acts) || hasAction[SendHello](acts) {
			t.Fatalf("hello after an unanswered claim: %v, want a reject", acts)
		}
		// The next claim is answered: the primary's lease lives; now a
		// session may open.
		acts := r.advance(rigHeartbeat.Timeout)
		if !hasAction[Claim](acts) {
			t.Fatalf("no claim again: %v", acts)
		}
		r.step(ClaimDone{Now: r.now, Held: true, Err: errors.New("held")})
		if acts := r.hello(3); !hasAction[SendHello](acts) {
			t.Fatalf("hello after an answered claim: %v, want a session", acts)
		}
	})
	t.Run("the primary comes back between claims", func(t *testing.T) {
		r := newClaiming(t, false)
		r.step(ClaimDone{Now: r.now, Held: true, Err: errors.New("held")})
		if acts := r.hello(2); !hasAction[SendHello](acts) {
			t.Fatalf("hello between claims: %v, want a new session", acts)
		}
		r.step(ClaimDone{Now: r.now}) // a stale report changes nothing
		r.advance(rigHeartbeat.Interval)
		r.wantNoFailOver()
		if r.sb.State() != Syncing {
			t.Fatalf("state %v, want syncing", r.sb.State())
		}
	})
}

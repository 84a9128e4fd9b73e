package checkpoint

import (
	"errors"
	"testing"
	"time"

	"github.com/remus-kvm/remus/transport"
)

// sessionRig drives a Session with a fake clock.
type sessionRig struct {
	t    *testing.T
	s    *Session
	now  time.Time
	acts []any
}

func newSessionRig(t *testing.T, prepare bool) *sessionRig {
	t.Helper()
	now := time.Unix(1000, 0)
	s, acts, err := NewSession(SessionConfig{VMName: "vm1", RAMSize: 1 << 20, Pipeline: PipelineConfig{Interval: 25 * time.Millisecond},
		Heartbeat: rigHeartbeat, Prepare: prepare}, now)
	if err != nil {
		t.Fatal(err)
	}
	return &sessionRig{t: t, s: s, now: now, acts: acts}
}

func (r *sessionRig) step(ev any) []any {
	acts := r.s.Step(ev)
	r.acts = append(r.acts, acts...)
	return acts
}

func (r *sessionRig) backupHello() []any {
	return r.step(BackupMessage{Now: r.now, Msg: transport.Hello{Version: transport.Version, Role: transport.RoleBackup, VMName: "vm1", RAMSize: 1 << 20, PageSize: transport.PageSize}})
}

// take carries out a TakeCheckpoint in acts, if any, successfully.
func (r *sessionRig) take(acts []any) []any {
	for _, a := range acts {
		if tc, ok := a.(TakeCheckpoint); ok {
			return r.step(CheckpointTaken{Now: r.now, Epoch: tc.Epoch})
		}
	}
	return nil
}

func (r *sessionRig) ack(n uint64) []any {
	return r.step(BackupMessage{Now: r.now, Epoch: n, Msg: transport.Ack{}})
}

func lastEnd(acts []any) (End, bool) {
	for i := len(acts) - 1; i >= 0; i-- {
		if e, ok := acts[i].(End); ok {
			return e, true
		}
	}
	return End{}, false
}

// Defect 8: a heartbeat before the backup's hello is ignored; the session
// opens on the hello.
func TestSessionIgnoresHeartbeatBeforeHello(t *testing.T) {
	r := newSessionRig(t, false)
	if acts := r.step(BackupMessage{Now: r.now, Msg: transport.Heartbeat{}}); len(acts) != 0 {
		t.Fatalf("heartbeat before hello: %v", acts)
	}
	acts := r.backupHello()
	if !hasAction[TakeCheckpoint](acts) {
		t.Fatalf("hello: %v, want the first checkpoint", acts)
	}
}

// Output of epoch N leaves only after ack N, and acks must come in order.
func TestSessionReleasesOnlyAckedEpochs(t *testing.T) {
	r := newSessionRig(t, false)
	acts := r.take(r.backupHello()) // epoch 1 taken, shipped
	if !hasAction[Ship](acts) || hasAction[Release](acts) {
		t.Fatalf("after epoch 1 taken: %v", acts)
	}
	r.now = r.now.Add(25 * time.Millisecond)
	r.take(r.step(Tick{Now: r.now})) // epoch 2
	for _, a := range r.acts {
		if _, ok := a.(Release); ok {
			t.Fatalf("released before any ack: %v", r.acts)
		}
	}
	acts = r.ack(1)
	if len(acts) == 0 || acts[0] != (Release{Epoch: 1, Started: time.Unix(1000, 0)}) {
		t.Fatalf("ack 1: %v, want Release 1", acts)
	}
	acts = r.ack(3)
	if hasAction[Release](acts) || !hasAction[Goodbye](acts) {
		t.Fatalf("ack out of order: %v, want a goodbye and no release", acts)
	}
}

// Defect 1: a local error says goodbye, and the held output leaves only once
// the backup confirmed it will not resume the guest.
func TestSessionLocalErrorSaysGoodbye(t *testing.T) {
	r := newSessionRig(t, false)
	acts := r.backupHello()
	tc := acts[len(acts)-1].(TakeCheckpoint)
	acts = r.step(CheckpointFailed{Now: r.now, Epoch: tc.Epoch, Err: errors.New("xen-save-devices-state: error")})
	if len(acts) != 1 || !hasAction[Goodbye](acts) {
		t.Fatalf("local error: %v, want just a goodbye", acts)
	}
	if r.s.State() != Leaving {
		t.Fatalf("state %v", r.s.State())
	}
	acts = r.step(BackupMessage{Now: r.now, Msg: transport.Error{Code: transport.CodeGoodbye, Message: "confirmed"}})
	e, ok := lastEnd(acts)
	if !ok || !hasAction[PassThrough](acts) || e.Err == nil || !errors.Is(e.Err, e.Err) {
		t.Fatalf("confirmed goodbye: %v, want PassThrough and End", acts)
	}
}

// A stop that hangs (defect 4's deadlock, or a wedged QEMU) leaves the guest
// in an unknown state: with a committed epoch the guest is killed and the
// backup told to resume at once; never both running.
func TestSessionStuckGuestIsHandedOver(t *testing.T) {
	r := newSessionRig(t, false)
	r.take(r.backupHello())
	r.ack(1)
	r.now = r.now.Add(25 * time.Millisecond)
	acts := r.step(Tick{Now: r.now})
	tc := acts[len(acts)-1].(TakeCheckpoint)
	acts = r.step(CheckpointFailed{Now: r.now, Epoch: tc.Epoch, Err: errors.New("stop: context deadline exceeded"), GuestStuck: true})
	if len(acts) != 3 {
		t.Fatalf("stuck guest: %v", acts)
	}
	if _, ok := acts[0].(KillGuest); !ok {
		t.Fatalf("first action %v, want KillGuest before anything else", acts[0])
	}
	if g, ok := acts[1].(Goodbye); !ok || !g.TakeOver {
		t.Fatalf("second action %v, want a takeover goodbye", acts[1])
	}
	if e, _ := lastEnd(acts); !errors.Is(e.Err, ErrHandedOver) {
		t.Fatalf("end %v", e.Err)
	}
	if hasAction[PassThrough](acts) {
		t.Fatal("a killed guest's held output was released")
	}
}

// With nothing committed there is nothing to hand over: the guest is left
// alone and the backup told goodbye.
func TestSessionStuckGuestBeforeFirstCommit(t *testing.T) {
	r := newSessionRig(t, false)
	acts := r.backupHello()
	tc := acts[len(acts)-1].(TakeCheckpoint)
	acts = r.step(CheckpointFailed{Now: r.now, Epoch: tc.Epoch, Err: errors.New("stop timed out"), GuestStuck: true})
	if hasAction[KillGuest](acts) || !hasAction[Goodbye](acts) {
		t.Fatalf("stuck before a commit: %v", acts)
	}
}

func TestSessionBackupFailedOverKillsGuest(t *testing.T) {
	r := newSessionRig(t, false)
	acts := r.step(BackupMessage{Now: r.now, Msg: transport.Error{Code: transport.CodeFailedOver, Message: "the guest runs here"}})
	if len(acts) != 2 || !hasAction[KillGuest](acts) || hasAction[PassThrough](acts) {
		t.Fatalf("failed-over backup: %v", acts)
	}
	if e, _ := lastEnd(acts); !errors.Is(e.Err, ErrFailedOver) {
		t.Fatalf("end %v", e.Err)
	}
}

// A planned stop says goodbye; without a confirmation the session ends
// after the goodbye timeout all the same.
func TestSessionStopSaysGoodbye(t *testing.T) {
	r := newSessionRig(t, true)
	r.backupHello()
	acts := r.step(StopRequested{Now: r.now, Reason: "SIGTERM"})
	if !hasAction[Goodbye](acts) {
		t.Fatalf("stop: %v", acts)
	}
	r.now = r.now.Add(rigHeartbeat.Timeout)
	acts = r.step(Tick{Now: r.now})
	if e, ok := lastEnd(acts); !ok || !errors.Is(e.Err, ErrStopped) || hasAction[PassThrough](acts) {
		t.Fatalf("after the goodbye timeout: %v, want the end, output still held (the goodbye was not confirmed)", acts)
	}
}

// The ship report and the ack race: an ack of an epoch whose ship report
// has not come is fine (the frames went out), and a ship failure waits
// briefly for the backup's reason.
func TestSessionShipFailureWaitsForTheBackupsReason(t *testing.T) {
	r := newSessionRig(t, false)
	r.take(r.backupHello())
	if acts := r.ack(1); !hasAction[Release](acts) {
		t.Fatalf("ack before the ship report: %v", acts)
	}
	r.now = r.now.Add(25 * time.Millisecond)
	r.take(r.step(Tick{Now: r.now}))
	if acts := r.step(ShipFailed{Now: r.now, Epoch: 2, Err: errors.New("broken pipe")}); len(acts) != 0 {
		t.Fatalf("ship failed: %v", acts)
	}
	acts := r.step(BackupMessage{Now: r.now, Epoch: 2, Msg: transport.Error{Code: transport.CodeEpoch, Message: "digest mismatch"}})
	if e, ok := lastEnd(acts); !ok || !errors.Is(e.Err, ErrPeerRejected) {
		t.Fatalf("the backup's reason: %v", acts)
	}
}

// A silent backup ends the session with the output still held: the backup
// may be alive and about to resume the guest; only a backup that answers a
// new hello, or none answering at all, lets it go (the agent's part).
func TestSessionBackupSilentKeepsOutputHeld(t *testing.T) {
	r := newSessionRig(t, false)
	r.take(r.backupHello())
	var acts []any
	for i := 0; i < 60; i++ {
		r.now = r.now.Add(10 * time.Millisecond)
		acts = append(acts, r.step(Tick{Now: r.now})...)
		if _, ok := lastEnd(acts); ok {
			break
		}
	}
	if e, ok := lastEnd(acts); !ok || !errors.Is(e.Err, ErrPeerLost) || hasAction[PassThrough](acts) {
		t.Fatalf("silent backup: %v, want the end without letting output go", acts)
	}
}

// An ack lost on the way does not stall the session: the backup's next
// heartbeat names its committed epoch, which releases the output up to it.
func TestSessionHeartbeatImpliesLostAck(t *testing.T) {
	r := newSessionRig(t, false)
	r.take(r.backupHello()) // epoch 1 in flight; its ack is lost
	acts := r.step(BackupMessage{Now: r.now, Msg: transport.Heartbeat{LastCommitted: 1}})
	if len(acts) == 0 || acts[0] != (Release{Epoch: 1, Started: time.Unix(1000, 0)}) {
		t.Fatalf("heartbeat naming epoch 1 committed: %v, want Release 1", acts)
	}
	if r.s.Committed() != 1 {
		t.Fatalf("committed %d", r.s.Committed())
	}
	acts = r.step(BackupMessage{Now: r.now, Msg: transport.Heartbeat{LastCommitted: 5}})
	if !hasAction[Goodbye](acts) || hasAction[Release](acts) {
		t.Fatalf("heartbeat naming an epoch never taken: %v, want a goodbye", acts)
	}
}

// A switchover takes a final epoch once the one under way is done, and
// hands the guest over only when the backup acknowledged it: the guest
// killed first, then the takeover.
func TestSessionSwitchover(t *testing.T) {
	r := newSessionRig(t, false)
	acts := r.backupHello()
	tc1 := acts[len(acts)-1].(TakeCheckpoint)
	// Requested while epoch 1 is being taken: nothing new starts yet.
	if acts := r.step(SwitchoverRequested{Now: r.now}); len(acts) != 0 || r.s.State() != Switching {
		t.Fatalf("switchover during a checkpoint: %v (state %v), want to wait", acts, r.s.State())
	}
	acts = r.step(CheckpointTaken{Now: r.now, Epoch: tc1.Epoch})
	var final TakeCheckpoint
	for _, a := range acts {
		if tc, ok := a.(TakeCheckpoint); ok {
			final = tc
		}
	}
	if !final.Final || final.Epoch != 2 || !hasAction[Ship](acts) {
		t.Fatalf("after epoch 1: %v, want epoch 1 shipped and the final epoch 2 begun at once", acts)
	}
	r.step(CheckpointTaken{Now: r.now, Epoch: 2})
	if acts := r.ack(1); hasAction[KillGuest](acts) {
		t.Fatalf("ack 1 of 2: %v, want no handover before the final epoch is acked", acts)
	}
	r.now = r.now.Add(time.Second) // no epoch is due while switching
	if acts := r.step(Tick{Now: r.now, Heard: r.now}); hasAction[TakeCheckpoint](acts) {
		t.Fatalf("tick while switching: %v", acts)
	}
	acts = r.ack(2)
	e, ok := lastEnd(acts)
	if len(acts) < 3 || !ok || !errors.Is(e.Err, ErrSwitchedOver) {
		t.Fatalf("final ack: %v, want KillGuest, takeover, End(switched over)", acts)
	}
	if _, ok := acts[0].(Release); !ok {
		t.Fatalf("final ack: %v, want its output released first", acts)
	}
	if _, ok := acts[1].(KillGuest); !ok || !acts[2].(Goodbye).TakeOver || hasAction[ResumeGuest](acts) {
		t.Fatalf("final ack: %v, want the guest killed, then the takeover", acts)
	}
}

// A switchover that cannot complete leaves the guest running here.
func TestSessionSwitchoverAbandoned(t *testing.T) {
	// requested: epoch 1 acked, the switchover asked for, its final
	// epoch 2 being taken.
	requested := func(t *testing.T) *sessionRig {
		r := newSessionRig(t, false)
		r.take(r.backupHello())
		r.ack(1)
		if acts := r.step(SwitchoverRequested{Now: r.now}); !hasAction[TakeCheckpoint](acts) {
			t.Fatalf("switchover: %v", acts)
		}
		return r
	}
	// setup: the final epoch taken, the guest paused here.
	setup := func(t *testing.T) *sessionRig {
		r := requested(t)
		r.step(CheckpointTaken{Now: r.now, Epoch: 2})
		return r
	}
	t.Run("not acknowledged in time", func(t *testing.T) {
		r := setup(t)
		r.now = r.now.Add(DefaultSwitchoverTimeout)
		acts := r.step(Tick{Now: r.now, Heard: r.now})
		if len(acts) < 2 || acts[0] != (ResumeGuest{}) || !hasAction[Goodbye](acts) || hasAction[KillGuest](acts) {
			t.Fatalf("timeout: %v, want ResumeGuest then a goodbye", acts)
		}
	})
	t.Run("backup lost", func(t *testing.T) {
		r := setup(t)
		acts := r.step(LinkDown{Now: r.now, Err: errors.New("EOF")})
		if len(acts) != 2 || acts[0] != (ResumeGuest{}) || hasAction[KillGuest](acts) {
			t.Fatalf("link down: %v, want ResumeGuest, End", acts)
		}
	})
	t.Run("final epoch fails", func(t *testing.T) {
		r := requested(t)
		acts := r.step(CheckpointFailed{Now: r.now, Epoch: 2, Err: errors.New("save failed")})
		if !hasAction[Goodbye](acts) || hasAction[ResumeGuest](acts) || hasAction[KillGuest](acts) {
			t.Fatalf("final epoch failed (the driver resumed the guest): %v, want a goodbye", acts)
		}
	})
	t.Run("abandoned while the final epoch is taken", func(t *testing.T) {
		r := requested(t)
		r.step(StopRequested{Now: r.now, Reason: "SIGTERM"})
		acts := r.step(CheckpointTaken{Now: r.now, Epoch: 2})
		if len(acts) == 0 || acts[0] != (ResumeGuest{}) {
			t.Fatalf("final epoch taken after the switchover was abandoned: %v, want ResumeGuest", acts)
		}
	})
	t.Run("refused when not protecting", func(t *testing.T) {
		r := newSessionRig(t, false)
		if acts := r.step(SwitchoverRequested{Now: r.now}); len(acts) != 0 || r.s.State() != Greeting {
			t.Fatalf("switchover before the hello: %v (state %v)", acts, r.s.State())
		}
	})
}

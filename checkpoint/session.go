package checkpoint

import (
	"errors"
	"fmt"
	"time"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/transport"
)

// Session is the primary's side of one protection session as a pure state
// machine: no I/O, no goroutines, no clock. The driver (Primary.Run) feeds
// it events with the time and carries out the actions it returns, in order.
//
// It owns the epoch pipeline (which epoch is due, how many are in flight,
// which ack commits which epoch), the failure detector on the backup's
// frames, and how a session ends. Every end says why to the backup:
//
//   - a planned end (SIGTERM, unprotect) or a local error while the guest
//     runs: a goodbye; the guest's held output is released only once the
//     backup confirmed it (it will not resume the guest), or the backup is
//     gone;
//   - a guest that may no longer run properly (stop, save or cont failed or
//     hung) with a committed epoch on the backup: the guest is killed, then
//     a takeover goodbye tells the backup to resume at once;
//   - the backup says it already resumed the guest (a primary agent that
//     restarted too late): the guest here is killed, never relayed again.
//
// A backup that goes silent or whose link breaks may be dead, or alive and
// about to resume the guest: the session ends with the guest's output still
// held, and the next session (the agent redials at once) lets it go once a
// backup answers its hello, or once none can be reached (then the backup is
// taken as dead: hosts fail-stop, and the guest runs on unprotected).
//
//	state       event                               next        actions
//	----------  ----------------------------------  ----------  ----------------------------------
//	Greeting    backup hello (matching)             Preparing   PassThrough (what the guest sent
//	                                                            before the session), StartPrepare
//	                                                            (or Protecting: TakeCheckpoint 1)
//	Greeting    backup hello (mismatch)             Leaving     SendGoodbye
//	Greeting    heartbeat                           Greeting    (ignored: only the hello counts)
//	Greeting    tick past the hello timeout         Ended       End(lost), output still held
//	Preparing   prepared                            Protecting  TakeCheckpoint 1
//	Protecting  tick, epoch due and room in flight  Protecting  TakeCheckpoint N
//	Protecting  checkpoint taken                    Protecting  Ship N
//	Protecting  ack N (oldest in flight)            Protecting  Release N
//	Protecting  ack out of order                    Leaving     SendGoodbye
//	Protecting  heartbeat naming a newer committed  Protecting  Release up to it (an ack lost on
//	            epoch                                           the way is implied)
//	any live    checkpoint failed, guest running    Leaving     SendGoodbye
//	any live    checkpoint failed, guest stuck,     Ended       KillGuest, SendGoodbye(takeover),
//	            an epoch committed                              End
//	any live    stop requested / local error        Leaving     SendGoodbye
//	Leaving     backup confirms the goodbye         Ended       PassThrough, End
//	Leaving     timeout, link down                  Ended       End, output still held
//	any live    backup error "failed over"          Ended       KillGuest, End
//	any live    backup error (other)                Ended       PassThrough, End
//	any live    ship failed                         Draining    (wait briefly for the backup's reason)
//	Draining    backup error                        Ended       PassThrough, End
//	Draining    timeout / link down                 Ended       End(lost), output still held
//	any live    link down, backup silent            Ended       End(lost), output still held
//	Protecting  switchover requested                Switching   TakeCheckpoint N (final: the guest
//	                                                            stays paused) once room in flight
//	Switching   final epoch and all before acked    Ended       KillGuest, SendGoodbye(takeover),
//	                                                            End(switched over)
//	Switching   timeout, failure, stop, link down   as above    ResumeGuest first (the guest runs
//	                                                            on here), then as in Protecting
type Session struct {
	cfg      SessionConfig
	state    SessionState
	pipe     *Pipeline
	det      *failover.Detector
	deadline time.Time // Greeting: hello timeout; Leaving, Draining: give up
	busy     bool      // a TakeCheckpoint is being carried out
	endErr   error     // Leaving, Draining: what End will return
	// Switching: the final epoch (0 until it is begun), and whether it
	// was taken (the guest is paused here since).
	final      uint64
	pausedHere bool
}

// SessionConfig configures a Session.
type SessionConfig struct {
	VMName   string
	RAMSize  uint64
	DiskSize uint64
	Pipeline PipelineConfig
	// Heartbeat timing; its Timeout also bounds the wait for the backup's
	// hello and, by default, for its confirmation of a goodbye.
	Heartbeat failover.DetectorConfig
	// Prepare: the session has a step before the first epoch (the disk's
	// initial copy); the driver reports Prepared.
	Prepare bool
	// GoodbyeTimeout bounds the wait for the backup's confirmation of a
	// goodbye, and for its reason after a failed send. Default: the
	// heartbeat timeout.
	GoodbyeTimeout time.Duration
	// SwitchoverTimeout bounds a planned switchover, from the request to
	// the backup's acknowledgement of the final epoch; past it the guest
	// runs on here. Default DefaultSwitchoverTimeout.
	SwitchoverTimeout time.Duration
}

// DefaultSwitchoverTimeout bounds a switchover by default.
const DefaultSwitchoverTimeout = 10 * time.Second

// SessionState is where a Session is.
type SessionState int

// The Session's states.
const (
	Greeting SessionState = iota
	Preparing
	Running
	Leaving
	Draining
	Ended
	// Switching: a planned switchover takes a final epoch and waits for
	// its acknowledgement.
	Switching
)

func (s SessionState) String() string {
	return [...]string{"greeting", "preparing", "protecting", "leaving", "draining", "ended", "switching"}[s]
}

// Errors a session ends with, besides ErrPeerLost and ErrPeerRejected.
var (
	// ErrStopped: the session ended because the driver asked (a planned
	// end: shutdown, unprotect).
	ErrStopped = errors.New("checkpoint: protection stopped")
	// ErrFailedOver: the backup resumed the guest; this side's copy was
	// killed and must not be protected again.
	ErrFailedOver = errors.New("checkpoint: the backup resumed the guest")
	// ErrHandedOver: the guest could not be checkpointed or resumed here;
	// it was killed and the backup told to resume its last checkpoint.
	ErrHandedOver = errors.New("checkpoint: the guest was handed over to the backup")
	// ErrSwitchedOver: a planned switchover completed: the backup holds
	// the final epoch, taken with the guest paused, and resumes it; the
	// guest here was killed.
	ErrSwitchedOver = errors.New("checkpoint: the guest was switched over to the backup")
)

// NewSession starts a session in Greeting at now; the driver sends the
// hello (SendHelloToBackup is the first action).
func NewSession(cfg SessionConfig, now time.Time) (*Session, []any, error) {
	if err := cfg.Pipeline.Validate(); err != nil {
		return nil, nil, err
	}
	if err := cfg.Heartbeat.Validate(); err != nil {
		return nil, nil, err
	}
	cfg.Pipeline = cfg.Pipeline.WithDefaults()
	cfg.Heartbeat = cfg.Heartbeat.WithDefaults()
	if cfg.GoodbyeTimeout <= 0 {
		cfg.GoodbyeTimeout = cfg.Heartbeat.Timeout
	}
	if cfg.SwitchoverTimeout <= 0 {
		cfg.SwitchoverTimeout = DefaultSwitchoverTimeout
	}
	pipe, _ := NewPipeline(cfg.Pipeline, 0)
	s := &Session{cfg: cfg, pipe: pipe, deadline: now.Add(cfg.Heartbeat.Timeout)}
	return s, []any{SendHelloToBackup{}}, nil
}

// State is the session's state.
func (s *Session) State() SessionState { return s.state }

// Committed is the newest epoch the backup acknowledged.
func (s *Session) Committed() uint64 { return s.pipe.Committed() }

// InFlight lists the epochs taken and not yet acknowledged.
func (s *Session) InFlight() []InFlight { return s.pipe.InFlight() }

// NextWake is when the driver should next Tick (zero: no timer needed
// beyond the heartbeat cadence).
func (s *Session) NextWake() time.Time {
	if s.state == Switching {
		return s.deadline
	}
	if s.state == Running && !s.busy {
		return s.pipe.NextDue()
	}
	return time.Time{}
}

// Events a Session takes.
type (
	// BackupMessage: a decoded frame from the backup (Hello, Ack,
	// Heartbeat or Error), of Epoch.
	BackupMessage struct {
		Now   time.Time
		Epoch uint64
		Msg   transport.Message
	}
	// LinkDown: the connection to the backup failed (read or write).
	LinkDown struct {
		Now time.Time
		Err error
	}
	// Prepared: the step before the first epoch finished (Err: failed).
	Prepared struct {
		Now time.Time
		Err error
	}
	// CheckpointTaken: epoch Epoch was taken and the guest resumed.
	CheckpointTaken struct {
		Now   time.Time
		Epoch uint64
	}
	// CheckpointFailed: taking Epoch failed. GuestStuck: the guest may
	// not be running normally (stop, save or cont failed or timed out).
	CheckpointFailed struct {
		Now        time.Time
		Epoch      uint64
		Err        error
		GuestStuck bool
	}
	// ShipFailed: sending Epoch's frames failed.
	ShipFailed struct {
		Now   time.Time
		Epoch uint64
		Err   error
	}
	// StopRequested: end the session (shutdown, unprotect).
	StopRequested struct {
		Now    time.Time
		Reason string
	}
	// SwitchoverRequested: move the guest to the backup with nothing
	// lost (a planned switchover).
	SwitchoverRequested struct{ Now time.Time }
)

// Actions a Session returns.
type (
	// SendHelloToBackup: send the primary's hello.
	SendHelloToBackup struct{}
	// StartPrepare: start the step before the first epoch; report
	// Prepared.
	StartPrepare struct{}
	// TakeCheckpoint: pause the guest, take Epoch, resume it; report
	// CheckpointTaken or CheckpointFailed. Started is the time the
	// pipeline recorded as its start.
	TakeCheckpoint struct {
		Epoch   uint64
		Started time.Time
		// Final: leave the guest paused afterwards (a switchover's last
		// epoch); ResumeGuest or KillGuest follows.
		Final bool
	}
	// ResumeGuest: continue the guest a final checkpoint left paused (the
	// switchover did not complete).
	ResumeGuest struct{}
	// Ship: send Epoch's frames (in order after earlier epochs); report
	// ShipFailed if that fails.
	Ship struct{ Epoch uint64 }
	// Release: Epoch is committed: release the guest output held up to it.
	Release struct {
		Epoch uint64
		// Started is when the epoch's pause began (for its ack latency).
		Started time.Time
	}
	// Heartbeat: send a heartbeat carrying the committed epoch.
	Heartbeat struct{ Committed uint64 }
	// Goodbye: tell the backup the session ends and why; with TakeOver,
	// that the guest here is gone and the backup is to resume now.
	Goodbye struct {
		TakeOver bool
		Reason   string
	}
	// KillGuest: end the guest's QEMU here.
	KillGuest struct{ Reason string }
	// PassThrough: stop holding the guest's output (release what is held):
	// the backup will not resume the guest.
	PassThrough struct{}
	// End: the session is over; the driver returns Err.
	End struct{ Err error }
)

// Step takes one event and returns what to do.
func (s *Session) Step(ev any) []any {
	if s.state == Ended {
		return nil
	}
	switch e := ev.(type) {
	case BackupMessage:
		return s.message(e)
	case LinkDown:
		return s.lost(fmt.Errorf("%w: %w", ErrPeerLost, e.Err))
	case Prepared:
		if s.state != Preparing {
			return nil
		}
		if e.Err != nil {
			return s.leave(e.Now, fmt.Errorf("checkpoint: before the first epoch: %w", e.Err))
		}
		s.state = Running
		return s.due(e.Now)
	case CheckpointTaken:
		s.busy = false
		s.pipe.Resumed(e.Now)
		var acts []any
		if s.final != 0 && e.Epoch == s.final {
			if s.state == Switching {
				s.pausedHere = true
			} else {
				// The switchover was abandoned while its final
				// epoch was being taken.
				acts = append(acts, ResumeGuest{})
			}
		}
		if s.state != Running && s.state != Switching && s.state != Leaving {
			return acts
		}
		// Taken epochs are shipped even while leaving: the backup may
		// still commit them before it reads the goodbye.
		return append(append(acts, Ship{Epoch: e.Epoch}), s.due(e.Now)...)
	case CheckpointFailed:
		s.busy = false
		err := fmt.Errorf("checkpoint: epoch %d: %w", e.Epoch, e.Err)
		if e.GuestStuck && s.pipe.Committed() > 0 && s.live() {
			s.state = Ended
			reason := fmt.Sprintf("%v; the guest was killed here, resume epoch %d", err, s.pipe.Committed())
			return []any{KillGuest{Reason: err.Error()}, Goodbye{TakeOver: true, Reason: reason},
				End{Err: fmt.Errorf("%w: %w", ErrHandedOver, err)}}
		}
		return s.leave(e.Now, err)
	case ShipFailed:
		if !s.live() {
			return nil
		}
		// A backup that ends the session sends its reason first: wait
		// briefly for it rather than report the broken pipe it leaves.
		s.state, s.deadline = Draining, e.Now.Add(s.cfg.GoodbyeTimeout)
		s.endErr = fmt.Errorf("%w: epoch %d: send to backup: %w", ErrPeerLost, e.Epoch, e.Err)
		return nil
	case StopRequested:
		return s.leave(e.Now, fmt.Errorf("%w: %s", ErrStopped, e.Reason))
	case SwitchoverRequested:
		if s.state != Running {
			return nil
		}
		s.state, s.deadline = Switching, e.Now.Add(s.cfg.SwitchoverTimeout)
		return s.due(e.Now)
	case Tick:
		if !e.Heard.IsZero() && s.det != nil {
			s.det.Heard(e.Heard)
		}
		return s.tick(e.Now)
	}
	return nil
}

// live reports whether the session still runs (not leaving or over).
func (s *Session) live() bool {
	return s.state == Greeting || s.state == Preparing || s.state == Running || s.state == Switching
}

func (s *Session) message(e BackupMessage) []any {
	if s.det != nil {
		s.det.Heard(e.Now)
	}
	switch m := e.Msg.(type) {
	case transport.Hello:
		if s.state != Greeting {
			return s.leave(e.Now, fmt.Errorf("%w: a second hello from the backup", ErrPeerRejected))
		}
		if m.Role != transport.RoleBackup || m.VMName != s.cfg.VMName || m.RAMSize != s.cfg.RAMSize || m.DiskSize != s.cfg.DiskSize {
			return s.leave(e.Now, fmt.Errorf("%w: backup answered as %s for VM %q with %d bytes of RAM and a %d-byte disk; want backup for %q with %d and %d",
				ErrPeerRejected, m.Role, m.VMName, m.RAMSize, m.DiskSize, s.cfg.VMName, s.cfg.RAMSize, s.cfg.DiskSize))
		}
		s.det, _ = failover.NewDetector(s.cfg.Heartbeat, e.Now)
		s.det.Sent(e.Now)
		// The backup answered: it has not resumed the guest, so what the
		// guest sent before this session's first pause may leave (every
		// state the backup can resume from now on includes it).
		acts := []any{PassThrough{}}
		if s.cfg.Prepare {
			s.state = Preparing
			return append(acts, StartPrepare{})
		}
		s.state = Running
		return append(acts, s.due(e.Now)...)
	case transport.Heartbeat:
		// Before the hello it is ignored: only the hello opens the session.
		if (s.state != Running && s.state != Switching && s.state != Leaving) || m.LastCommitted <= s.pipe.Committed() {
			return nil
		}
		// The backup's heartbeat names its committed epoch: an ack lost on
		// the way (not on TCP, which loses nothing, but on any link that
		// might) is implied by it, and the session does not stall.
		var acts []any
		for _, f := range s.pipe.InFlight() {
			if f.Epoch > m.LastCommitted {
				break
			}
			s.pipe.Acked(f.Epoch)
			acts = append(acts, Release{Epoch: f.Epoch, Started: f.Started})
		}
		if s.pipe.Committed() < m.LastCommitted {
			return s.leave(e.Now, fmt.Errorf("%w: the backup reports epoch %d committed; this session took %d", ErrPeerRejected, m.LastCommitted, s.pipe.Committed()))
		}
		return append(acts, s.due(e.Now)...)
	case transport.Ack:
		if s.state != Running && s.state != Switching && s.state != Leaving {
			return s.leave(e.Now, fmt.Errorf("%w: ack of epoch %d before any epoch", ErrPeerRejected, e.Epoch))
		}
		f, err := s.pipe.Acked(e.Epoch)
		if err != nil {
			return s.leave(e.Now, fmt.Errorf("%w: %w", ErrPeerRejected, err))
		}
		return append([]any{Release{Epoch: e.Epoch, Started: f.Started}}, s.due(e.Now)...)
	case transport.Error:
		switch m.Code {
		case transport.CodeFailedOver:
			s.state = Ended
			err := fmt.Errorf("%w: %s", ErrFailedOver, m.Message)
			return []any{KillGuest{Reason: err.Error()}, End{Err: err}}
		case transport.CodeGoodbye:
			if s.state == Leaving {
				return s.end(PassThrough{}, End{Err: s.endErr})
			}
			return s.end(PassThrough{}, End{Err: fmt.Errorf("%w: the backup ended the session: %s", ErrPeerRejected, m.Message)})
		}
		err := fmt.Errorf("%w: epoch %d: %s: %s", ErrPeerRejected, e.Epoch, m.Code, m.Message)
		if s.state == Leaving {
			err = errors.Join(s.endErr, err)
		}
		return s.end(PassThrough{}, End{Err: err})
	}
	return s.leave(e.Now, fmt.Errorf("%w: unexpected %s from the backup", ErrPeerRejected, e.Msg.Type()))
}

// due starts the next checkpoint when it is due; while switching, the
// final one as soon as there is room, and the handover once all is acked.
func (s *Session) due(now time.Time) []any {
	if s.state == Switching {
		return s.switching(now)
	}
	if s.state != Running || s.busy {
		return nil
	}
	if ok, _ := s.pipe.Due(now); !ok {
		return nil
	}
	s.busy = true
	n := s.pipe.Begin(now)
	return []any{TakeCheckpoint{Epoch: n, Started: now}}
}

// switching moves a switchover on: the final checkpoint once nothing is
// being taken and there is room in flight; the handover once the backup
// acknowledged it (and so every epoch before).
func (s *Session) switching(now time.Time) []any {
	switch {
	case s.final == 0 && !s.busy && len(s.pipe.InFlight()) < s.cfg.Pipeline.MaxInFlight:
		s.busy = true
		s.final = s.pipe.Begin(now)
		return []any{TakeCheckpoint{Epoch: s.final, Started: now, Final: true}}
	case s.pausedHere && s.pipe.Committed() >= s.final:
		s.state, s.pausedHere = Ended, false
		reason := fmt.Sprintf("switchover: resume epoch %d, taken with the guest paused; the guest here is killed", s.final)
		return []any{KillGuest{Reason: "switched over to the backup"}, Goodbye{TakeOver: true, Reason: reason},
			End{Err: fmt.Errorf("%w: epoch %d", ErrSwitchedOver, s.final)}}
	}
	return nil
}

// unpause prepends ResumeGuest when a final checkpoint left the guest
// paused here and the switchover will not complete.
func (s *Session) unpause(acts []any) []any {
	if !s.pausedHere {
		return acts
	}
	s.pausedHere = false
	return append([]any{ResumeGuest{}}, acts...)
}

// leave says goodbye and waits for the backup's confirmation.
func (s *Session) leave(now time.Time, err error) []any {
	if !s.live() {
		return nil
	}
	if s.state == Switching {
		err = fmt.Errorf("switchover abandoned, the guest runs on here: %w", err)
	}
	s.state, s.deadline, s.endErr = Leaving, now.Add(s.cfg.GoodbyeTimeout), err
	return s.unpause([]any{Goodbye{Reason: err.Error()}})
}

// lost ends the session when the backup is unreachable or silent. The
// guest's output stays held: the backup may be alive and, if it hears
// nothing more, resume the guest. Whoever runs the session next (the
// agent redials at once) lets it go once a backup answers, or once none
// does (hosts fail-stop).
func (s *Session) lost(err error) []any {
	if (s.state == Leaving || s.state == Draining) && !errors.Is(s.endErr, ErrPeerLost) {
		err = fmt.Errorf("%w; the backup did not confirm the end: %w", s.endErr, ErrPeerLost)
	} else if s.state == Leaving || s.state == Draining {
		err = s.endErr
	}
	return s.end(End{Err: err})
}

func (s *Session) end(acts ...any) []any {
	s.state = Ended
	return s.unpause(acts)
}

func (s *Session) tick(now time.Time) []any {
	switch s.state {
	case Greeting:
		if !now.Before(s.deadline) {
			return s.end(End{Err: fmt.Errorf("%w: no hello from the backup within %v", ErrPeerLost, s.cfg.Heartbeat.Timeout)})
		}
		return nil
	case Leaving, Draining:
		if !now.Before(s.deadline) {
			return s.lost(s.endErr)
		}
		return nil
	case Switching:
		if !now.Before(s.deadline) {
			return s.leave(now, fmt.Errorf("the backup did not acknowledge the final epoch %d within %v", s.final, s.cfg.SwitchoverTimeout))
		}
	}
	v := s.det.Tick(now)
	if v.PeerDead {
		return s.lost(fmt.Errorf("%w: no frame from the backup for %v", ErrPeerLost, v.Silence.Round(time.Millisecond)))
	}
	var acts []any
	if v.SendHeartbeat {
		s.det.Sent(now)
		acts = append(acts, Heartbeat{Committed: s.pipe.Committed()})
	}
	return append(acts, s.due(now)...)
}

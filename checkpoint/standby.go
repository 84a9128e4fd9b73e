package checkpoint

import (
	"errors"
	"fmt"
	"time"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/transport"
)

// Standby is the backup's side of the epoch protocol as a pure state
// machine: it does no I/O, starts no goroutines and never reads the clock.
// The driver (Backup) feeds it events, the time included, and carries out
// the actions it returns, in order, before the next event.
//
// It decides which connection is the primary's session, when an epoch may be
// applied and acknowledged, and the one decision that must never be wrong:
// when to resume the guest here. It resumes only
//
//   - a fully applied epoch of the current session (never one of an earlier
//     session: the primary ran on unprotected in between, and its clients
//     saw what it did),
//   - after the session's primary, having said hello, went silent for the
//     heartbeat timeout without saying goodbye, or said it handed the guest
//     over (its guest is gone).
//
// Connections that never completed a hello (a port scan, a health check)
// are not sessions: they start no timer and are never heard.
//
// States and transitions:
//
//	state        event                              next         actions
//	-----------  ---------------------------------  -----------  -------------------------------
//	Waiting      hello (valid)                      Syncing      SendHello, Discard
//	any session  hello (valid) on a new connection  Syncing      Close old, Discard, SendHello
//	any          hello (invalid)                    unchanged    Reject that connection
//	FailedOver   hello                              FailedOver   Reject: the guest runs here
//	Syncing      epoch staged                       Syncing      Apply (nothing resumable meanwhile)
//	Protecting   epoch staged                       Protecting   Apply (nothing resumable meanwhile)
//	Syncing/Prot applied N                          Protecting   Ack N
//	Syncing/Prot apply failed                       Waiting      Reject (state torn: nothing resumable)
//	Syncing/Prot epoch rejected (corrupt, ...)      Waiting      Discard, Reject
//	Syncing/Prot goodbye                            Waiting      Discard, Goodbye back, Close
//	Syncing/Prot takeover with committed N          FailedOver   Close, FailOver N
//	Syncing/Prot takeover, nothing committed        Waiting      Close
//	Syncing/Prot link closed without goodbye        Suspect      Discard (timer runs on from the
//	                                                             last frame heard)
//	Syncing      link closed without goodbye        Waiting      Discard (nothing to resume)
//	Syncing/Prot tick: no heartbeat sent lately     unchanged    Heartbeat (also while applying)
//	Syncing/Prot tick while applying                unchanged    (no verdict: the silence is judged
//	                                                             once the apply ended)
//	Prot/Suspect tick: silent for the timeout       FailedOver   Close, FailOver N
//	Prot/Suspect same, with a witness                Claiming     Close, Claim
//	Prot/Suspect same, with a fence command only     Fencing      Close, Fence
//	Claiming     claimed                            FailedOver   FailOver N
//	Claiming     held: the primary's lease lives    Claiming     Note; Claim again after 2 heartbeat intervals
//	Claiming     witness unreachable, fence command Fencing      Fence
//	Claiming     witness unreachable, no fence      Claiming     Note; Claim again after an interval
//	Claiming     hello (valid), no claim under way  Syncing      the primary lives: a new session
//	Claiming     hello, a claim under way, or the   Claiming,    Reject (busy: try again): a claim
//	Fencing      last one unanswered                Fencing      that timed out here may have been
//	                                                             carried out at the witness
//	Fencing      fence done                         FailedOver   FailOver N
//	Fencing      fence failed                       Fencing      Note; Fence again after a timeout
//	Fencing      hello (valid)                      Syncing      the primary lives: a new session
//	Syncing      tick: silent for the timeout       Waiting      Close (nothing to resume)
type Standby struct {
	cfg   StandbyConfig
	state StandbyState
	conn  ConnID // the session's connection while in a session
	det   *failover.Detector
	// committed is the newest epoch of the current session applied whole;
	// 0 while the session has committed nothing.
	committed uint64
	// applying is set from Apply until Applied: the image is between two
	// epochs and not a state to resume.
	applying bool
	cause    error // why the session's link went quiet, for the failover

	// Fencing, Claiming: when the primary was declared dead, and when a
	// failed fence or claim is tried again (zero while one runs).
	lastHeard, declared time.Time
	fenceAgain          time.Time
	claimAgain          time.Time
	heldNoted           bool // Claiming: the live lease was logged
	// claimUncertain: the last claim got no answer (a timeout): the
	// witness may have carried it out, making this backup the guest's
	// owner; no new session until a claim is answered.
	claimUncertain bool
}

// ConnID names one connection for the machines; the driver numbers them.
type ConnID uint64

// StandbyConfig configures a Standby.
type StandbyConfig struct {
	VMName string
	// RAMSize, when not zero, is the RAM size a primary must announce
	// (the backup's image is already that size). DiskSize, when not
	// zero, is the backup's disk image size: a primary that mirrors a disk
	// must announce the same.
	RAMSize, DiskSize uint64
	Heartbeat         failover.DetectorConfig
	// Fence: the primary's host is fenced (a fence command, STONITH-style)
	// before the guest is resumed after silence; no failover until a fence
	// succeeds. A takeover needs none: the primary stopped its guest.
	Fence bool
	// Witness: the guest is resumed after silence only once the backup
	// claimed the witness (package witness): possible only when no live
	// lease names the primary, which stops its guest before its lease can
	// expire. When the witness cannot be reached, the fence decides (with
	// Fence), or nothing is resumed until it answers.
	Witness bool
}

// StandbyState is where a Standby is in the protocol.
type StandbyState int

// The Standby's states.
const (
	// Waiting: no session; nothing may be resumed.
	Waiting StandbyState = iota
	// Syncing: a session is open and has committed nothing yet.
	Syncing
	// Protecting: a session is open and holds a committed epoch.
	Protecting
	// Suspect: the session's link closed without a goodbye; the primary
	// is declared dead once it has been silent for the timeout.
	Suspect
	// FailedOver: the guest was resumed here. Final.
	FailedOver
	// Fencing: the primary went silent; its host is being fenced before
	// the guest is resumed here (or the fence failed and is tried again).
	Fencing
	// Claiming: the primary went silent; the backup claims the witness
	// before it resumes the guest (or the claim failed and is tried again).
	Claiming
)

func (s StandbyState) String() string {
	switch s {
	case Waiting:
		return "waiting"
	case Syncing:
		return "syncing"
	case Protecting:
		return "protecting"
	case Suspect:
		return "suspect"
	case FailedOver:
		return "failed-over"
	case Fencing:
		return "fencing"
	case Claiming:
		return "claiming"
	}
	return fmt.Sprintf("StandbyState(%d)", int(s))
}

// NewStandby starts a Standby in Waiting.
func NewStandby(cfg StandbyConfig) (*Standby, error) {
	if cfg.VMName == "" {
		return nil, errors.New("checkpoint: standby needs a VM name")
	}
	if err := cfg.Heartbeat.Validate(); err != nil {
		return nil, err
	}
	cfg.Heartbeat = cfg.Heartbeat.WithDefaults()
	return &Standby{cfg: cfg}, nil
}

// State is the current state.
func (s *Standby) State() StandbyState { return s.state }

// Committed is the newest epoch of the current session that may be resumed
// (0: none).
func (s *Standby) Committed() uint64 {
	if s.applying || (s.state != Protecting && s.state != Suspect && s.state != FailedOver && s.state != Fencing && s.state != Claiming) {
		return 0
	}
	return s.committed
}

// Session is the current session's connection, 0 outside a session.
func (s *Standby) Session() ConnID {
	if s.state == Syncing || s.state == Protecting {
		return s.conn
	}
	return 0
}

// Events a Standby takes. Each carries the time it happened (Now).
type (
	// HelloIn: a connection completed its handshake (authenticated where
	// a key is set) and sent this hello.
	HelloIn struct {
		Now   time.Time
		Conn  ConnID
		Hello transport.Hello
	}
	// FrameHeard: a well-formed frame arrived on Conn (any type).
	FrameHeard struct {
		Now  time.Time
		Conn ConnID
	}
	// EpochStaged: the epoch's Commit verified: all of it is staged.
	EpochStaged struct {
		Now   time.Time
		Conn  ConnID
		Epoch uint64
	}
	// EpochRejected: a frame of Conn's session failed its checks (corrupt,
	// out of order, a staged epoch that did not verify, a disk write the
	// journal refused).
	EpochRejected struct {
		Now   time.Time
		Conn  ConnID
		Epoch uint64
		Err   error
	}
	// Applied: the driver applied the staged epoch whole (disk, RAM,
	// device state), or failed to (Err).
	Applied struct {
		Now   time.Time
		Conn  ConnID
		Epoch uint64
		Err   error
	}
	// GoodbyeIn: the primary ends the session and says why. With TakeOver
	// its guest is gone for good and the backup is to resume at once.
	GoodbyeIn struct {
		Now      time.Time
		Conn     ConnID
		TakeOver bool
		Reason   string
	}
	// ConnClosed: Conn's stream ended or failed without a goodbye.
	ConnClosed struct {
		Now  time.Time
		Conn ConnID
		Err  error
	}
	// FenceDone: the fence the Standby asked for ended (Err: it failed or
	// timed out: the primary's host may be alive).
	FenceDone struct {
		Now time.Time
		Err error
	}
	// ClaimDone: the claim of the witness the Standby asked for ended. Err
	// nil: this backup holds it. Held: a live lease names the primary (it
	// runs). Otherwise the witness could not be reached (Err says how).
	ClaimDone struct {
		Now  time.Time
		Held bool
		Err  error
	}
	// Tick advances the clock. Heard, when set, is when the newest frame
	// came off the session's link (the driver's reader notes it as it
	// arrives): it counts before the failure detector judges, so frames
	// still queued behind slow work never look like silence.
	Tick struct{ Now, Heard time.Time }
)

// Actions a Standby returns, for the driver to carry out in order.
type (
	// SendHello answers Conn's hello: the session is open.
	SendHello struct{ Conn ConnID }
	// Reject tells Conn why it is refused or its session ends (an Error
	// frame), then closes it.
	Reject struct {
		Conn  ConnID
		Epoch uint64
		Code  transport.ErrorCode
		Err   error
	}
	// CloseConn closes Conn (after a goodbye, or when replaced).
	CloseConn struct {
		Conn   ConnID
		Reason string
	}
	// Discard drops whatever is staged of an epoch not committed (pages,
	// device state, disk writes held in the journal).
	Discard struct{}
	// Apply writes the staged epoch into the image (disk, RAM, device
	// state, in that order) and reports Applied.
	Apply struct {
		Conn  ConnID
		Epoch uint64
	}
	// SendAck acknowledges Epoch on Conn.
	SendAck struct {
		Conn  ConnID
		Epoch uint64
	}
	// SendHeartbeat sends a heartbeat carrying the committed epoch.
	SendHeartbeat struct {
		Conn      ConnID
		Committed uint64
	}
	// SendGoodbye confirms the primary's goodbye: this backup will not
	// resume the guest.
	SendGoodbye struct {
		Conn   ConnID
		Reason string
	}
	// Fence runs the fence command against the primary's host before the
	// guest is resumed here; report FenceDone.
	Fence struct {
		Epoch uint64
		Cause error
	}
	// Claim claims the witness for this backup; report ClaimDone. Retry:
	// an earlier claim of the same failover failed.
	Claim struct {
		Epoch uint64
		Retry bool
	}
	// FailOver resumes Epoch here.
	FailOver struct {
		Epoch uint64
		// LastHeard is when the primary was last heard; Declared is when
		// it was declared dead (or handed over); Cleared, when the
		// witness was claimed or the primary fenced (zero: neither
		// needed).
		LastHeard, Declared, Cleared time.Time
		Cause                        error
	}
	// Note is a line for the log: something happened that changes no
	// state an operator would otherwise see.
	Note struct {
		Msg string
		Err error
	}
)

// Step takes one event and returns what to do.
func (s *Standby) Step(ev any) []any {
	switch e := ev.(type) {
	case HelloIn:
		return s.hello(e)
	case FrameHeard:
		if s.inSession(e.Conn) {
			s.det.Heard(e.Now)
		}
	case EpochStaged:
		if !s.inSession(e.Conn) {
			return nil
		}
		if e.Epoch != s.committed+1 {
			return s.endSession(Reject{Conn: e.Conn, Epoch: e.Epoch, Code: transport.CodeEpoch,
				Err: fmt.Errorf("checkpoint: epoch %d staged after committed epoch %d", e.Epoch, s.committed)})
		}
		s.applying = true
		return []any{Apply{Conn: e.Conn, Epoch: e.Epoch}}
	case Applied:
		if !s.inSession(e.Conn) || !s.applying {
			return nil
		}
		s.applying = false
		if e.Err != nil {
			// Part of the epoch may be in the image: neither it nor
			// the one before is a state to resume.
			s.committed = 0
			return s.endSession(Reject{Conn: e.Conn, Epoch: e.Epoch, Code: transport.CodeInternal,
				Err: fmt.Errorf("checkpoint: epoch %d: apply: %w", e.Epoch, e.Err)})
		}
		s.committed, s.state = e.Epoch, Protecting
		s.det.Sent(e.Now)
		return []any{SendAck{Conn: e.Conn, Epoch: e.Epoch}}
	case EpochRejected:
		if !s.inSession(e.Conn) {
			return nil
		}
		return s.endSession(Discard{}, Reject{Conn: e.Conn, Epoch: e.Epoch, Code: transport.CodeEpoch,
			Err: fmt.Errorf("checkpoint: discarded epoch %d: %w", e.Epoch, e.Err)})
	case GoodbyeIn:
		if !s.inSession(e.Conn) {
			return nil
		}
		if e.TakeOver {
			if n := s.Committed(); n > 0 {
				return s.failOver(e.Now, e.Now, fmt.Errorf("the primary handed the guest over: %s", e.Reason),
					CloseConn{Conn: e.Conn, Reason: "the primary handed over"})
			}
			return s.endSession(Discard{}, Note{Msg: "the primary handed over before the first checkpoint committed: nothing to resume"},
				CloseConn{Conn: e.Conn, Reason: "handover without a checkpoint"})
		}
		return s.endSession(Discard{}, SendGoodbye{Conn: e.Conn, Reason: "goodbye: this backup will not resume the guest"},
			CloseConn{Conn: e.Conn, Reason: "the primary said goodbye: " + e.Reason})
	case ConnClosed:
		if !s.inSession(e.Conn) {
			return nil
		}
		s.applying = false
		if s.state == Syncing {
			return s.endSession(Discard{}, Note{Msg: "the primary's connection closed before the first checkpoint committed: nothing to resume", Err: e.Err})
		}
		s.state, s.cause = Suspect, fmt.Errorf("receive from primary: %w", e.Err)
		return []any{Discard{}, Note{Msg: "connection to the primary broken without a goodbye; waiting out the heartbeat timeout", Err: e.Err}}
	case FenceDone:
		if s.state != Fencing {
			return nil
		}
		if e.Err != nil {
			s.fenceAgain = e.Now.Add(s.cfg.Heartbeat.Timeout)
			return []any{Note{Msg: fmt.Sprintf("fencing the primary failed: the guest is not resumed here (the primary may still run it); trying again in %v", s.cfg.Heartbeat.Timeout), Err: e.Err}}
		}
		s.state = FailedOver
		return []any{FailOver{Epoch: s.committed, LastHeard: s.lastHeard, Declared: s.declared, Cleared: e.Now, Cause: fmt.Errorf("%w; the primary's host was fenced", s.cause)}}
	case ClaimDone:
		return s.claimDone(e)
	case Tick:
		return s.tick(e.Now, e.Heard)
	}
	return nil
}

func (s *Standby) claimDone(e ClaimDone) []any {
	if s.state != Claiming || !s.claimAgain.IsZero() {
		return nil
	}
	retry := s.cfg.Heartbeat.Timeout
	switch {
	case e.Err == nil:
		s.state = FailedOver
		return []any{FailOver{Epoch: s.committed, LastHeard: s.lastHeard, Declared: s.declared, Cleared: e.Now,
			Cause: fmt.Errorf("%w; this backup claimed the witness (the primary's lease had expired)", s.cause)}}
	case e.Held:
		s.claimUncertain = false
		// The lease ends within its TTL if the primary is gone:
		// ask often, so that the failover follows its end closely.
		retry = 2 * s.cfg.Heartbeat.Interval
		s.claimAgain = e.Now.Add(retry)
		if s.heldNoted {
			return nil
		}
		s.heldNoted = true
		return []any{Note{Msg: fmt.Sprintf("the primary is silent here but its witness lease is alive: it runs its guest, which is not resumed here; claiming again every %v until the lease ends", retry), Err: e.Err}}
	}
	s.claimUncertain = true
	if s.cfg.Fence {
		s.state = Fencing
		return []any{Note{Msg: "the witness cannot be reached: fencing the primary instead", Err: e.Err},
			Fence{Epoch: s.committed, Cause: s.cause}}
	}
	s.claimAgain = e.Now.Add(retry)
	return []any{Note{Msg: fmt.Sprintf("the primary is silent and the witness cannot be reached, and no fence command is set: the guest is not resumed here (the primary may still run it); claiming again in %v", retry), Err: e.Err}}
}

func (s *Standby) inSession(c ConnID) bool {
	return c == s.conn && (s.state == Syncing || s.state == Protecting)
}

func (s *Standby) hello(e HelloIn) []any {
	h := e.Hello
	switch {
	case s.state == FailedOver:
		return []any{Reject{Conn: e.Conn, Code: transport.CodeFailedOver,
			Err: fmt.Errorf("%w: the guest was resumed on this backup after epoch %d: the primary's copy must not run", ErrPeerRejected, s.committed)}}
	case s.state == Claiming && s.claimAgain.IsZero(), (s.state == Claiming || s.state == Fencing) && s.claimUncertain:
		// The claim may succeed (or have succeeded at the witness
		// unanswered): until it is known, no new session.
		return []any{Reject{Conn: e.Conn, Code: transport.CodeInternal,
			Err: fmt.Errorf("%w: the backup is claiming the witness to resume the guest; try again", ErrPeerRejected)}}
	case h.Role != transport.RolePrimary || h.VMName != s.cfg.VMName:
		return []any{Reject{Conn: e.Conn, Code: transport.CodeMismatch,
			Err: fmt.Errorf("%w: peer is %s for VM %q; this backup protects %q", ErrPeerRejected, h.Role, h.VMName, s.cfg.VMName)}}
	case s.cfg.RAMSize != 0 && h.RAMSize != s.cfg.RAMSize:
		return []any{Reject{Conn: e.Conn, Code: transport.CodeMismatch,
			Err: fmt.Errorf("%w: primary announced %d bytes of RAM; this backup holds %d", ErrPeerRejected, h.RAMSize, s.cfg.RAMSize)}}
	case h.DiskSize != s.cfg.DiskSize && (h.DiskSize != 0 || s.cfg.DiskSize != 0):
		return []any{Reject{Conn: e.Conn, Code: transport.CodeMismatch,
			Err: fmt.Errorf("%w: primary's disk is %d bytes; this backup's disk image is %d", ErrPeerRejected, h.DiskSize, s.cfg.DiskSize)}}
	}
	var acts []any
	if s.state == Syncing || s.state == Protecting {
		acts = append(acts, CloseConn{Conn: s.conn, Reason: "the primary opened a new session"})
	}
	// A new session starts from a full copy, numbered from 1. What an
	// earlier session committed is stale now (the primary ran on without
	// protection in between and the world saw its output): until this
	// session's first epoch commits, the backup holds nothing to resume.
	s.state, s.conn, s.committed, s.applying, s.cause = Syncing, e.Conn, 0, false, nil
	s.det, _ = failover.NewDetector(s.cfg.Heartbeat, e.Now)
	s.det.Sent(e.Now)
	return append(acts, Discard{}, SendHello{Conn: e.Conn})
}

// endSession leaves the session for Waiting with nothing resumable.
func (s *Standby) endSession(acts ...any) []any {
	s.state, s.committed, s.applying = Waiting, 0, false
	return acts
}

// retryDue reports whether a retry set for *at (zero: none; a try is under
// way) is due at now, and clears it if so.
func retryDue(at *time.Time, now time.Time) bool {
	if at.IsZero() || now.Before(*at) {
		return false
	}
	*at = time.Time{}
	return true
}

func (s *Standby) tick(now, heard time.Time) []any {
	switch {
	case s.state == Claiming && retryDue(&s.claimAgain, now):
		return []any{Claim{Epoch: s.committed, Retry: true}}
	case s.state == Fencing && retryDue(&s.fenceAgain, now):
		return []any{Fence{Epoch: s.committed, Cause: s.cause}}
	case s.state == Claiming || s.state == Fencing:
		return nil
	}
	switch s.state {
	case Syncing, Protecting:
		if !heard.IsZero() {
			s.det.Heard(heard)
		}
	case Suspect:
	default:
		return nil
	}
	if s.applying {
		// The image is between two epochs: no verdict until the apply
		// ends (the silence is judged then, from the last frame heard),
		// but the primary keeps hearing from us.
		if s.det.HeartbeatDue(now) {
			s.det.Sent(now)
			return []any{SendHeartbeat{Conn: s.conn, Committed: s.committed}}
		}
		return nil
	}
	v := s.det.Tick(now)
	if v.PeerDead {
		if s.cause == nil {
			s.cause = fmt.Errorf("no frame for %v", v.Silence.Round(time.Millisecond))
		}
		if n := s.Committed(); n > 0 && s.cfg.Witness {
			s.state, s.lastHeard, s.declared, s.claimAgain, s.heldNoted, s.claimUncertain = Claiming, s.det.LastHeard(), now, time.Time{}, false, false
			return []any{CloseConn{Conn: s.conn, Reason: "the primary is silent"}, Claim{Epoch: n}}
		}
		if n := s.Committed(); n > 0 && s.cfg.Fence {
			s.state, s.lastHeard, s.declared = Fencing, s.det.LastHeard(), now
			return []any{CloseConn{Conn: s.conn, Reason: "the primary is silent"}, Fence{Epoch: n, Cause: s.cause}}
		}
		if n := s.Committed(); n > 0 {
			return s.failOver(s.det.LastHeard(), now, s.cause, CloseConn{Conn: s.conn, Reason: "the primary is silent"})
		}
		return s.endSession(Discard{}, Note{Msg: "primary lost before the first checkpoint committed: nothing to fail over to", Err: s.cause},
			CloseConn{Conn: s.conn, Reason: "the primary is silent"})
	}
	if v.SendHeartbeat && s.state != Suspect {
		s.det.Sent(now)
		return []any{SendHeartbeat{Conn: s.conn, Committed: s.committed}}
	}
	return nil
}

func (s *Standby) failOver(lastHeard, now time.Time, cause error, close CloseConn) []any {
	n := s.Committed()
	s.state = FailedOver
	return []any{close, FailOver{Epoch: n, LastHeard: lastHeard, Declared: now, Cause: cause}}
}

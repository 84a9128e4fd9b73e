package checkpoint

import (
	"fmt"
	"strings"
	"time"

	"github.com/remus-kvm/remus/transport"
)

// The simulation's invariants. Each is checked where the action it is
// about is carried out, or (e) after every happening, and named by a
// letter:
//
//	a  the backup resumes only an epoch it applied whole in its current
//	   session, one the primary took in that session
//	b  the backup resumes only a primary that is really gone
//	c  the primary releases epoch N's output only once the backup applied
//	   epoch N in the same session
//	d  never two live guests; with a witness: once the backup resumed the
//	   guest, no primary-side guest runs (not frozen, not killed, host
//	   up, agent up) and none of its output leaves, network faults or not
//	e  no panic, no stuck state, no guest lost to a handover
//	f  the backup sends nothing on a connection before its hello
//	g  the backup applies only its current session's epochs, each onto the
//	   one before it
//
// Hosts fail-stop in this version: a host that is up runs its agent's
// decisions, one that is down does nothing. What the protocol cannot tell
// apart from a dead peer — a partition of about the heartbeat timeout or
// longer, or a connection that the network resets, with both hosts alive —
// is a network fault, outside that model: without a witness, a failover it
// causes, and two live guests after it, are recorded (splitBrains) but not
// violations; see netExcuse. With a witness (sim_witness_test.go) nothing
// excuses two guests: the guard must stop the primary's before the backup
// can claim the witness.
type simChecker struct {
	w           *simWorld
	violations  []simViolation
	reported    map[string]bool // one report per stuck state
	splitBrains []string        // two live guests, excused as network faults
	failover    *simFailover
	failoverAt  time.Time
	expected    []*simExpectedFailover
	maxStall    time.Duration // longest scripted pause or apply, for (e)
}

type simViolation struct {
	inv string
	at  time.Duration
	msg string
}

func (v simViolation) String() string {
	return fmt.Sprintf("invariant %s at %.3fs: %s", v.inv, v.at.Seconds(), v.msg)
}

// simFailover is the backup's failover as the checker judged it.
type simFailover struct {
	epoch   uint64
	lineage *simPrimaryHost // whose guest the backup resumed
	why     string
	excused string // a network fault caused it: (d) does not hold it
}

// simExpectedFailover: the backup must resume the guest soon (the primary
// died, or handed over, with an epoch committed).
type simExpectedFailover struct {
	since time.Time
	host  *simPrimaryHost
	why   string
}

func newSimChecker(w *simWorld) *simChecker {
	return &simChecker{w: w, reported: map[string]bool{}}
}

func (ck *simChecker) violate(inv, format string, args ...any) {
	v := simViolation{inv: inv, at: ck.w.elapsed(), msg: fmt.Sprintf(format, args...)}
	ck.violations = append(ck.violations, v)
	ck.w.logf("VIOLATION", "%s", v)
}

// once reports a violation under key only the first time.
func (ck *simChecker) once(key, inv, format string, args ...any) {
	if ck.reported[key] {
		return
	}
	ck.reported[key] = true
	ck.violate(inv, format, args...)
}

// netExcuse names the network fault that can make the backup take the
// primary of connection c for dead between lastHeard and declared, or ""
// if there was none: the network reset c; or a partition (overlapping
// ones merged) that covered at least half the heartbeat timeout of that
// silence; or one long enough for either side's detector to give up (the
// heartbeat timeout less an interval) that began before declared and
// ended not long before lastHeard (its aftermath: a session one side
// ended without the other hearing). A partition shorter than that, alone,
// must never lead to a failover (partition.txt checks it).
func (ck *simChecker) netExcuse(c *simConn, lastHeard, declared time.Time) string {
	if !c.netResetAt.IsZero() && !c.netResetAt.After(declared) {
		return fmt.Sprintf("the network reset connection %d at %.3fs", c.id, c.netResetAt.Sub(ck.w.start).Seconds())
	}
	hb := ck.w.cfg.Heartbeat
	for _, p := range ck.w.mergedPartitions(c.host) {
		overlap := earlier(p.to, declared).Sub(later(p.from, lastHeard))
		long := p.to.Sub(p.from) >= hb.Timeout-hb.Interval && p.from.Before(declared) && p.to.After(lastHeard.Add(-2*hb.Timeout))
		if overlap >= hb.Timeout/2 || long {
			return fmt.Sprintf("a %v partition from %.3fs", p.to.Sub(p.from), p.from.Sub(ck.w.start).Seconds())
		}
	}
	return ""
}

// failOver judges the backup's FailOver.
func (ck *simChecker) failOver(b *simBackupHost, fo FailOver, byTakeover bool) {
	w := ck.w
	c := b.session

	// (a) The backup fails over only to an epoch it applied whole in its
	// CURRENT session (the image holds that epoch of that session, no
	// apply tore it since), and one the primary took in that session. An
	// epoch of an earlier session is stale: the primary ran on without
	// protection after it and the world saw what it did.
	if c == nil {
		ck.violate("a", "failed over to epoch %d without ever having had a session", fo.Epoch)
		ck.failover, ck.failoverAt = &simFailover{epoch: fo.Epoch, why: "no session"}, w.now
		return
	}
	img := b.image
	switch {
	case fo.Epoch == 0:
		ck.violate("a", "failed over to epoch 0")
	case img.inc != b.inc || img.session != c.backupSession || c.backupSession != b.sessions:
		ck.violate("a", "failed over to epoch %d, but the image holds epoch %d of session %d (incarnation %d); the current session is %d (incarnation %d)",
			fo.Epoch, img.epoch, img.session, img.inc, c.backupSession, b.inc)
	case img.torn:
		ck.violate("a", "failed over to epoch %d onto a torn image (an apply failed midway)", fo.Epoch)
	case img.epoch != fo.Epoch:
		ck.violate("a", "failed over to epoch %d, but the image holds epoch %d", fo.Epoch, img.epoch)
	}
	ps := c.ps
	if ps == nil || ps.taken < fo.Epoch {
		ck.violate("a", "failed over to epoch %d, which the session's primary never took", fo.Epoch)
		ck.failover, ck.failoverAt = &simFailover{epoch: fo.Epoch, lineage: c.host, why: "an epoch never taken"}, w.now
		return
	}

	// (b) The backup fails over only if the primary is really gone: its
	// host died; or its agent is no longer the one that ran the session
	// (killed, or gone without a goodbye that arrived), so that its guest
	// is cut off and any new agent holds the guest's output until the
	// backup answers it; or it handed the guest over with a takeover
	// goodbye, its guest killed first. Never after a goodbye the backup
	// read (a planned stop, a local error), and never while the primary's
	// agent runs and can reach the backup — unless a network fault (see
	// netExcuse) hid it.
	h := c.host
	var why, excused string
	switch {
	case byTakeover:
		why = "the primary handed over"
		if !ps.saidTakeover {
			ck.violate("b", "failed over on a takeover that session %d never sent", ps.id)
		}
	case c.goodbyeIn:
		why = "none: the primary said goodbye"
		ck.violate("b", "failed over after reading session %d's goodbye", ps.id)
	case !h.alive:
		why = "the primary's host died"
	case h.agent == nil || h.agent != ps.agent:
		why = "the primary's agent is gone"
	default:
		if excused = ck.netExcuse(c, fo.LastHeard, fo.Declared); excused != "" {
			why = "network fault: " + excused
			break
		}
		why = "none: the primary was alive and reachable"
		state := "ended: " + fmt.Sprint(ps.endErr)
		if !ps.ended {
			state = "in state " + ps.s.State().String()
		}
		ck.violate("b", "failed over while the primary was alive and reachable: session %d %s, its agent running, no network fault (silent %v)",
			ps.id, state, fo.Declared.Sub(fo.LastHeard))
	}
	ck.failover = &simFailover{epoch: fo.Epoch, lineage: h, why: why, excused: excused}
	ck.failoverAt = w.now
	w.logf("check", "failover to epoch %d: %s", fo.Epoch, why)
	ck.expected = nil
	if w.wit != nil {
		// (b) and (d) with a witness: no network fault excuses a
		// second guest.
		ck.failover.excused = ""
		ck.witnessFailOver(fo, byTakeover)
		return
	}

	// (d) Never two live guests: when the backup resumes the guest, the
	// primary's copy must not be live (host up, guest running, agent up,
	// output passing); see released for what follows.
	if h.live() {
		// The output passes since a session ended: if a network fault
		// ended that one, that is what made two live guests.
		if excused == "" && h.passedBy != nil {
			excused = ck.netExcuse(h.passedBy.conn, h.passedBy.conn.openedAt, w.now)
		}
		ck.twoGuests(excused, "the primary's guest is live (its output passes) as the backup resumes it")
	}
}

// released: the guest's output on host h leaves (a Release, a
// PassThrough, or the relay passing when the backup is unreachable).
//
// (d) Never two live guests: once the backup resumed a guest, the primary's
// copy (of the host whose epoch it resumed; a second host claiming the
// same VM runs another guest) is dead — its host died, or KillGuest — or
// never again has any output released: no PassThrough, no Release. Hosts
// fail-stop, so a primary that is up follows the protocol, and the
// protocol's promise is that a copy whose output reaches nobody is as good
// as dead until it is killed (a returning agent is told "failed over" and
// kills it). A network fault (a partition as long as the heartbeat
// timeout, or a reset, with both hosts up) is excluded: telling it from a
// dead peer needs a witness or fencing. With a witness, witnessReleased
// judges instead, and excuses nothing.
func (ck *simChecker) released(h *simPrimaryHost, ps *simPrimarySession, what string) {
	if ck.w.wit != nil {
		ck.witnessReleased(h, what)
		return
	}
	fo := ck.failover
	if fo == nil || fo.lineage != h || !h.alive || !h.guest {
		return
	}
	excused := fo.excused
	if excused == "" && ps != nil {
		excused = ck.netExcuse(ps.conn, ps.conn.openedAt, ck.w.now)
	}
	who := "the agent"
	if ps != nil {
		who = fmt.Sprintf("session %d", ps.id)
	}
	ck.twoGuests(excused, fmt.Sprintf("%s by %s after the backup resumed the guest", what, who))
}

func (ck *simChecker) twoGuests(excused, what string) {
	if excused != "" {
		ck.splitBrains = append(ck.splitBrains, fmt.Sprintf("%.3fs %s (excused: %s)", ck.w.elapsed().Seconds(), what, excused))
		ck.w.logf("check", "two live guests, excused: %s", excused)
		return
	}
	ck.violate("d", "%s", what)
}

// release judges the primary's Release.
//
// (c) Output commit: the output of epoch N leaves only once the backup
// applied epoch N whole in the same session (the connection the release's
// ack came on), and releases come in order.
func (ck *simChecker) release(ps *simPrimarySession, n uint64) {
	if n != ps.released+1 {
		ck.violate("c", "session %d released epoch %d after epoch %d", ps.id, n, ps.released)
	}
	if ps.conn.appliedOK < n {
		ck.violate("c", "session %d released epoch %d, but the backup applied only up to epoch %d on its connection", ps.id, n, ps.conn.appliedOK)
	}
	ck.released(ps.host, ps, fmt.Sprintf("Release %d", n))
}

// goodbye judges the primary's Goodbye.
func (ck *simChecker) goodbye(ps *simPrimarySession, g Goodbye) {
	if !g.TakeOver {
		return
	}
	// (d) A takeover goodbye tells the backup to resume now: the guest
	// here must be dead already (KillGuest before the goodbye).
	if ps.host.guest {
		ck.violate("d", "session %d sent a takeover goodbye with its guest still running", ps.id)
	}
	// The backup must resume it if it still holds the session: the
	// primary killed its guest on that promise.
	if b := ck.w.backup; b.up && b.session == ps.conn && !ps.conn.backupClosed && ps.conn.backupInc == b.inc {
		ck.expect(ps.host, "the primary killed its guest and handed it over")
	}
}

// killGuest judges the primary's KillGuest.
//
// (e) A guest is killed for a handover only if the backup may resume it:
// never when the backup's end of the session (its error: a rejected or
// torn epoch) already sits in the loop's queue, unread because a stuck
// checkpoint held the loop.
func (ck *simChecker) killGuest(ps *simPrimarySession) {
	for _, ev := range ps.inbox {
		if m, ok := ev.(BackupMessage); ok {
			if e, ok := m.Msg.(transport.Error); ok && e.Code != transport.CodeFailedOver {
				ck.violate("e", "session %d killed its guest to hand it over, but the backup's %s ending the session was already in its queue, unread: nothing resumes the guest", ps.id, e.Code)
				return
			}
		}
	}
}

// sessionOpened: the backup opened a new session on c; what it held is
// no longer resumable, so no failover is expected any more. (A second
// primary claiming the same VM — a misconfiguration the protocol cannot
// tell from a restarted agent — takes the place of one that just died.)
//
// (e) No guest lost to a handover: a failover that was expected because
// the primary's guest was killed (for a handover, or by its guard) is
// never given up for a session that the same primary, its host up, opens
// with its guest dead: nothing could resume the guest then. (A hello
// still on its way when the host died is no such session.)
func (ck *simChecker) sessionOpened(c *simConn) {
	if h := c.host; h != nil && h.alive && !h.guest {
		for _, e := range ck.expected {
			if e.host == h {
				ck.once(fmt.Sprintf("lost-%d", c.id), "e", "the backup opened a session with the %s (connection %d), whose guest is dead, dropping what it could resume (%s %v ago): the guest runs nowhere",
					h.name, c.id, e.why, ck.w.now.Sub(e.since))
				break
			}
		}
	}
	ck.expected = nil
}

// apply judges the backup's Apply.
//
// (g) The backup applies only epochs of its current session, and each
// epoch N > 1 onto an image that holds epoch N-1 of the same session,
// whole (an epoch is a delta; the first of a session is a full copy), and
// only epochs the primary took.
func (ck *simChecker) apply(b *simBackupHost, c *simConn, n uint64) {
	if c != b.session || c.backupSession != b.sessions {
		ck.violate("g", "applying epoch %d of connection %d, which is not the current session", n, c.id)
	}
	img := b.image
	if n > 1 && (img.inc != b.inc || img.session != c.backupSession || img.epoch != n-1 || img.torn) {
		ck.violate("g", "applying epoch %d of session %d onto an image holding epoch %d of session %d (incarnation %d, torn %v)",
			n, c.backupSession, img.epoch, img.session, img.inc, img.torn)
	}
	if c.ps == nil || c.ps.taken < n {
		ck.violate("g", "applying epoch %d, which the primary never took", n)
	}
}

// backupSends judges a frame the backup sends on c.
//
// (f) The backup's first frame on a connection is its hello: a heartbeat,
// an ack or a goodbye before it would open the primary's session on
// something that is not the backup's answer.
func (ck *simChecker) backupSends(c *simConn, what string) {
	if !c.helloSent {
		ck.violate("f", "the backup sent %s on connection %d before its hello", what, c.id)
	}
}

// expect records that the backup must fail over soon.
func (ck *simChecker) expect(h *simPrimaryHost, why string) {
	ck.expected = append(ck.expected, &simExpectedFailover{since: ck.w.now, host: h, why: why})
}

// hostDies: a primary host that dies while the backup holds a committed
// epoch of its session leaves the backup to fail over — unless the
// session said goodbye before it died (the backup may read that first).
func (ck *simChecker) hostDies(h *simPrimaryHost) {
	b := ck.w.backup
	if !b.up || b.session == nil || b.session.host != h || ck.failover != nil {
		return
	}
	if ps := b.session.ps; ps != nil && (ps.saidGoodbye || ps.saidTakeover) {
		return
	}
	if st := b.sb.State(); st == Protecting || st == Suspect {
		ck.expect(h, "the primary's host died with an epoch committed")
	}
}

// backupRejects: the backup ends its session itself (a corrupt epoch, a
// failed apply): what it holds is not resumable, so a primary that died
// or handed over meanwhile is not failed over to. (A handover decided
// after the primary received this is caught by killGuest.)
func (ck *simChecker) backupRejects(b *simBackupHost, c *simConn) {
	if c != b.session {
		return
	}
	kept := ck.expected[:0]
	for _, e := range ck.expected {
		if e.host != c.host {
			kept = append(kept, e)
		}
	}
	ck.expected = kept
}

// backupCrashed: a backup that dies too is a second failure: the guest is
// lost with no protocol at fault.
func (ck *simChecker) backupCrashed() { ck.expected = nil }

// guardKilled: the primary's guard killed its guest (etcd names the
// backup owner, or the guest could not be stopped before the lease could
// run out): a backup holding a committed epoch of its session must resume
// the guest once it can claim the witness.
func (ck *simChecker) guardKilled(h *simPrimaryHost, why string) {
	b := ck.w.backup
	if !b.up || b.failedOver || b.session == nil || b.session.host != h || b.sb.Committed() == 0 {
		return
	}
	ck.expect(h, why)
}

// guestCrashed: the primary's guest crashed (its QEMU died by itself): a
// backup holding a committed epoch of its session must resume it — on the
// session's takeover goodbye, or once the primary is silent (and, with a
// witness, its lease ended) — unless the session already said goodbye (a
// second fault: the backup may read it first).
func (ck *simChecker) guestCrashed(h *simPrimaryHost) {
	b := ck.w.backup
	if !b.up || b.failedOver || b.session == nil || b.session.host != h || b.sb.Committed() == 0 {
		return
	}
	if ps := b.session.ps; ps != nil && (ps.saidGoodbye || ps.saidTakeover) {
		return
	}
	ck.expect(h, "the primary's guest crashed")
}

// afterStep checks, after every happening, that nothing is stuck past its
// timeouts.
//
// (e) Every state ends or progresses within its timeouts: the primary's
// Greeting within the heartbeat timeout, Preparing once the step before
// the first epoch is done, Leaving and Draining within the goodbye
// timeout; a protecting session releases an epoch at least every two
// heartbeat timeouts (plus the longest pause and applies, and the run the
// guest is owed after the longest pause) or ends; the
// backup leaves a session whose primary is silent, and Suspect, within the
// heartbeat timeout; an expected failover (the primary's host died with an
// epoch committed, or it handed over) happens within it. The slack covers
// the ticks' cadence, a busy loop and the link.
func (ck *simChecker) afterStep() {
	w := ck.w
	cfg := w.cfg
	if w.wit != nil {
		ck.witnessAfterStep()
	}
	t := cfg.Heartbeat.Timeout
	// A failed checkpoint is reported once GuestGone's grace is over.
	busyP := max(cfg.CommandTimeout+simGuestGoneGrace+simGuestGonePoll, cfg.SlowPause.Max, cfg.Pause.Max, ck.maxStall)
	busyB := max(cfg.Apply.Max, cfg.SlowApply.Max, ck.maxStall)
	slack := 3*cfg.TickEvery + cfg.Link.Max + cfg.SpikeMax
	for _, h := range [...]*simPrimaryHost{w.primary, w.second} {
		if h == nil {
			continue
		}
		ps := h.current()
		if ps == nil {
			continue
		}
		st := ps.s.State()
		if st != ps.state {
			ps.state, ps.since = st, w.now
		}
		from, limit := ps.since, time.Duration(0)
		switch st {
		case Greeting:
			limit = t + slack
		case Preparing:
			limit = max(cfg.PrepareTime.Max, t) + slack
		case Running:
			from = later(ps.since, ps.progress)
			limit = 2*t + busyP + 2*busyB + slack + w.minRunSlack()
		case Leaving, Draining:
			limit = t + busyP + slack
		}
		if limit > 0 && w.now.Sub(from) > limit {
			ck.once(fmt.Sprintf("s%d-%v", ps.id, st), "e", "session %d stuck in %v for %v (limit %v)", ps.id, st, w.now.Sub(from), limit)
		}
	}
	if b := w.backup; b.up {
		st := b.sb.State()
		if st != b.state {
			b.state, b.since = st, w.now
		}
		limit := t + busyB + slack
		switch st {
		case Syncing, Protecting:
			if c := b.session; c != nil && w.now.Sub(c.heardAt) > limit {
				ck.once(fmt.Sprintf("b%d-%d-%v", b.inc, c.id, st), "e", "the backup stays %v on connection %d, silent for %v (limit %v)", st, c.id, w.now.Sub(c.heardAt), limit)
			}
		case Suspect:
			if w.now.Sub(b.since) > limit {
				ck.once(fmt.Sprintf("b%d-%v-%d", b.inc, st, b.since.UnixNano()), "e", "the backup stays suspect for %v (limit %v)", w.now.Sub(b.since), limit)
			}
		}
		for _, e := range ck.expected {
			if w.wit != nil {
				if ck.witnessOverdue(e, limit) {
					ck.once(fmt.Sprintf("x%d", e.since.UnixNano()), "e", "the guest runs nowhere: %s %v ago, and the backup (%v) did not resume it though it could claim the witness since %.3fs",
						e.why, w.now.Sub(e.since), st, w.wit.claimableSince.Sub(w.start).Seconds())
				}
				continue
			}
			if w.now.Sub(e.since) > limit+cfg.Link.Max+cfg.SpikeMax {
				ck.once(fmt.Sprintf("x%d", e.since.UnixNano()), "e", "the guest runs nowhere: %s %v ago, and the backup (%v) did not resume it", e.why, w.now.Sub(e.since), st)
			}
		}
	}
}

func earlier(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// failed lists the violations, except those of the known bug inv ("": none).
func (ck *simChecker) failed(known string) []simViolation {
	var out []simViolation
	for _, v := range ck.violations {
		if known == "" || !strings.Contains(known, v.inv) {
			out = append(out, v)
		}
	}
	return out
}

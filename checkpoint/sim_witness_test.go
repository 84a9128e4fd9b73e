package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/remus-kvm/remus/witness"
)

// The witness in the simulation (config witness on; every other seed of
// TestSimRandomized): an etcd holding the VM's two keys, the paths between
// each host and it, the primary agent's guard and the backup's claim.
//
//   - The witness (simWitness) keeps the keys of package witness: owner
//     (no lease) and active (under a lease). Hold, Claim, Renew and
//     Release follow witness/witness.go, each request carried out at once
//     when it reaches etcd (its transactions are linearizable). A lease
//     expires when its TTL has passed since the newest grant or renewal
//     etcd received, by etcd's clock (the simulation's); while etcd is
//     down nothing expires, and when it comes back every lease has its TTL
//     again (etcd refreshes leases when a leader takes over).
//   - Each host has a path to the witness (simWitnessPath): a request and
//     its answer each take a random delay, in order; a partition of a path
//     holds what crosses it until it heals (TCP retransmits) or loses it
//     (lose); a request that reaches a witness that is down is lost. A
//     caller whose answer does not come within its timeout gets a timeout
//     error, and the request may still be carried out later.
//   - The primary's agent (simGuard, internal/agent/witness.go): Hold at
//     start, before anything else (a failed attempt is tried again after
//     TTL/2, each bounded by the TTL; ErrOwnedElsewhere stops the guest and
//     the agent exits). From then on the guard runs and the guest's
//     network is relayed (its output held); the rest of the agent's start
//     (AgentSetup; now and then SlowSetup) comes before the first session.
//     The guard renews every TTL/4, bounded by TTL/4 (on ErrLeaseGone,
//     Hold again within the same bound), and checks the real
//     witness.Guard every 50 ms (Grace the heartbeat timeout / 3, a stop
//     budget of 250 ms; it starts out trusting the lease it was given),
//     the backup's acknowledgements fed to it as OnEpoch does (when an
//     epoch is both acked and shipped, at the time of its release). Its
//     gate (simGate): a freeze marks the guest frozen (a checkpoint's cont
//     is then kept back) and sends a QMP stop at once (under a
//     millisecond, now and then up to 150 ms), bounded by 200 ms; a stop
//     that gets no answer in time (QEMU's monitor hangs behind a stuck
//     checkpoint's stop: its commands run in order) kills the guest at
//     once as killGuestNow does (SIGKILL, no QMP quit first), and the guard
//     returns ErrHandedOver once waitGone saw QEMU gone: it renews no more.
//     QEMU killed, its monitor's connection closes at once: the
//     checkpoint's hung stop fails, and so does every later one, and
//     GuestGone, waiting its grace, finds QEMU gone once the process shows
//     as gone (QEMUExit later; a failed checkpoint is GuestStuck), so the
//     session hands the guest over (KillGuest, a takeover goodbye when an
//     epoch is committed). The agent goes on meanwhile as if the guard
//     still ran: RunPrimary waits for its protection loop to end by itself
//     (a session that ends with ErrHandedOver ends it, and so does any
//     session that ends with QEMU gone: ErrGuestGone, no new session), at
//     most 2 × the heartbeat timeout by the host's clock, and only then
//     cancels it (StopRequested to a session under way). A freeze of a
//     guest whose QEMU crashed fails at once (its monitor closed): the
//     guard's kill finds nothing to kill, and it returns ErrHandedOver. A
//     thaw waits while a checkpoint's QMP command holds the gate's lock
//     (the next tick tries again); a PassThrough waits while
//     the lease is not trusted, and the first checkpoint's Hold drops one
//     that waits. ErrOwnedElsewhere from a renewal freezes the guest and
//     ends the agent (ErrFailedOver): its session gets StopRequested at
//     once, and the guest is killed once it ended. The guard
//     reads the primary host's clock, which may run slower than etcd's by
//     up to witness.ClockRate (config clock-rate; negative: faster).
//   - The backup: a Standby with Witness set; its Claim goes to the
//     witness bounded by max(heartbeat timeout, 1 s) and comes back as
//     ClaimDone (Held for ErrHeld) while the driver holds what the readers
//     deliver, as Backup does. After a failover it keeps the lease as
//     keepBackupLease does: renew (or claim, when it is gone or was never
//     taken) every TTL/4, each bounded by TTL/4.
//
// Not modelled: a backup refusing to start on the host the witness names
// as owner (checkBackupSide), the fence command, switchovers (and so
// Release, which only they use; the model's Release is checked on its
// own), etcd's minimum TTL and its expiry's granularity (the simulated
// etcd expires a lease exactly at its end, the earliest the real one may),
// a guard goroutine that the Go scheduler or the host starves, a guest
// whose network does not go through the agent (then a dead agent leaves it
// on the network), QMP quit's and waitGone's time in the session's own
// KillGuest (the takeover follows the kill, QEMU gone by /proc; only the
// guard's kill races the lease), the time a SIGKILLed QEMU takes to stop
// running and close its monitor (both at the kill), and a QEMU that shows
// as gone by /proc only after GuestGone's grace (300 ms): QEMUExit stays
// below it (then a checkpoint that fails on the closed monitor is not
// GuestStuck, and its session ends with a plain goodbye).

// The agents' constants (internal/agent/witness.go).
const (
	simGuardPeriod     = 50 * time.Millisecond
	simGuardStopBudget = 250 * time.Millisecond
)

// simWitness is the simulated etcd.
type simWitness struct {
	w           *simWorld
	ttl         time.Duration
	up          bool
	downUntil   time.Time
	owner       string // "": no owner key
	active      string // "": no active key
	activeLease int64  // the lease the active key is attached to
	leases      []simLease
	nextLease   int64
	paths       map[string]*simWitnessPath
	downs       []simSpan // when it was down, for the liveness checks
	// claimableSince: since when the backup could claim (etcd up, no live
	// active key, its path clear); zero while it cannot.
	claimableSince time.Time
	requests       int
	backupPath     *simWitnessPath
}

// simLease is a lease etcd holds, and when it expires.
type simLease struct {
	id      int64
	expires time.Time
}

// simSpan is a stretch of time.
type simSpan struct{ from, to time.Time }

func newSimWitness(w *simWorld) *simWitness {
	ttl := w.cfg.WitnessTTL
	if ttl <= 0 {
		ttl = witness.DefaultTTL
	}
	// Open rounds the TTL up to whole seconds.
	ttl = (ttl + time.Second - 1).Truncate(time.Second)
	return &simWitness{w: w, ttl: ttl, up: true, paths: map[string]*simWitnessPath{}}
}

// path is the path between the host named name and the witness.
func (x *simWitness) path(name string) *simWitnessPath {
	p := x.paths[name]
	if p == nil {
		p = &simWitnessPath{name: name}
		x.paths[name] = p
	}
	return p
}

// down takes etcd down for d: requests that reach it meanwhile are lost,
// and leases do not expire.
func (x *simWitness) down(d time.Duration) {
	w := x.w
	x.expire()
	until := w.now.Add(d)
	x.downs = append(x.downs, simSpan{w.now, until})
	if until.After(x.downUntil) {
		x.downUntil = until
	}
	if x.up {
		w.logf("witness", "etcd down for %v", d)
	}
	x.up = false
	w.at(until, func() {
		if x.up || w.now.Before(x.downUntil) {
			return
		}
		x.up = true
		for i := range x.leases {
			x.leases[i].expires = w.now.Add(x.ttl)
		}
		w.logf("witness", "etcd up again: its %d leases refreshed to the TTL", len(x.leases))
	})
}

// expire drops the leases whose TTL ran out, and the active key with its
// lease.
func (x *simWitness) expire() {
	if !x.up {
		return
	}
	kept := x.leases[:0]
	for _, l := range x.leases {
		if x.w.now.Before(l.expires) {
			kept = append(kept, l)
			continue
		}
		if l.id == x.activeLease {
			x.w.logf("witness", "lease %d of %s expires: no active key", l.id, x.active)
			x.active, x.activeLease = "", 0
		}
	}
	x.leases = kept
}

func (x *simWitness) lease(id int64) *simLease {
	for i := range x.leases {
		if x.leases[i].id == id {
			return &x.leases[i]
		}
	}
	return nil
}

func (x *simWitness) grant() int64 {
	x.nextLease++
	x.leases = append(x.leases, simLease{id: x.nextLease, expires: x.w.now.Add(x.ttl)})
	return x.nextLease
}

// revoke drops a lease and the keys attached to it.
func (x *simWitness) revoke(id int64) {
	for i, l := range x.leases {
		if l.id == id {
			x.leases = append(x.leases[:i], x.leases[i+1:]...)
			break
		}
	}
	if x.activeLease == id {
		x.active, x.activeLease = "", 0
	}
}

func (x *simWitness) put(id string, lease int64) {
	x.owner, x.active, x.activeLease = id, id, lease
}

// hold is Witness.Hold at etcd: a new lease; the keys are id's when it
// owns the guest or nobody does.
func (x *simWitness) hold(id string) (int64, error) {
	x.expire()
	l := x.grant()
	if x.owner == id || x.owner == "" {
		x.put(id, l)
		return l, nil
	}
	x.revoke(l)
	return 0, fmt.Errorf("%w: %s owns VM vm1 (this side is %s)", witness.ErrOwnedElsewhere, x.owner, id)
}

// claim is Witness.Claim at etcd: both keys, only while no active key
// lives and an owner exists; id's own active key is taken over (Hold).
func (x *simWitness) claim(id string) (int64, error) {
	x.expire()
	l := x.grant()
	if x.active == "" && x.owner != "" {
		x.put(id, l)
		return l, nil
	}
	x.revoke(l)
	switch {
	case x.active == id:
		return x.hold(id)
	case x.active == "":
		return 0, fmt.Errorf("%w: VM vm1", witness.ErrUnguarded)
	}
	return 0, fmt.Errorf("%w: %s is active for VM vm1", witness.ErrHeld, x.active)
}

// renew is KeepAliveOnce at etcd.
func (x *simWitness) renew(id int64) error {
	x.expire()
	l := x.lease(id)
	if l == nil {
		return fmt.Errorf("%w (VM vm1)", witness.ErrLeaseGone)
	}
	l.expires = x.w.now.Add(x.ttl)
	return nil
}

// release is Witness.Release at etcd: the active key goes if it is id's,
// and the lease is revoked.
func (x *simWitness) release(id string, lease int64) {
	x.expire()
	if x.active == id {
		x.active, x.activeLease = "", 0
	}
	x.revoke(lease)
}

// liveActive is who holds a live active key now ("" if none), without
// changing anything.
func (x *simWitness) liveActive() string {
	if x.active == "" {
		return ""
	}
	if l := x.lease(x.activeLease); x.up && (l == nil || !x.w.now.Before(l.expires)) {
		return ""
	}
	return x.active
}

// observe keeps claimableSince up to date (after every happening while a
// failover is expected).
func (x *simWitness) observe() {
	w := x.w
	if x.backupPath == nil {
		x.backupPath = x.path("backup")
	}
	_, cut := x.backupPath.partitioned(w.now)
	ok := x.up && !cut && (x.liveActive() == "" || x.liveActive() == "backup")
	switch {
	case !ok:
		x.claimableSince = time.Time{}
	case x.claimableSince.IsZero():
		x.claimableSince = w.now
	}
}

// simWitnessPath is the path between one host and the witness.
type simWitnessPath struct {
	name           string
	parts          []simWitnessPartition
	lastUp, lastDn time.Time // when the newest message each way arrives
}

// simWitnessPartition cuts a path from from to to: what crosses it then
// is held until to, or lost.
type simWitnessPartition struct {
	from, to time.Time
	lose     bool
}

// partitioned reports whether the path is cut at t: until when (the
// latest end of the partitions then), and whether one of them loses what
// crosses.
func (p *simWitnessPath) partitioned(t time.Time) (simWitnessPartition, bool) {
	var found simWitnessPartition
	ok := false
	for _, q := range p.parts {
		if t.Before(q.from) || !t.Before(q.to) {
			continue
		}
		if !ok {
			found, ok = q, true
			continue
		}
		found.to = later(found.to, q.to)
		found.lose = found.lose || q.lose
	}
	return found, ok
}

// partition cuts the path between host name and the witness for d.
func (x *simWitness) partition(name string, d time.Duration, lose bool) {
	w := x.w
	how := "held"
	if lose {
		how = "lost"
	}
	w.logf("net", "partition between %s and the witness for %v (messages %s)", name, d, how)
	p := x.path(name)
	p.parts = append(p.parts, simWitnessPartition{from: w.now, to: w.now.Add(d), lose: lose})
}

// cross sends a message over p (toWitness: a request), to arrive after a
// random delay and after the messages sent before it; a partition holds
// or loses it. A held message from a host that died meanwhile is lost (no
// one retransmits it).
func (x *simWitness) cross(p *simWitnessPath, toWitness bool, from *simPrimaryHost, fn func()) {
	w := x.w
	at := w.now.Add(w.dur(w.cfg.WitnessLink))
	if w.chance(w.cfg.LinkSpike) {
		at = at.Add(time.Duration(w.rng.Int64N(int64(w.cfg.SpikeMax) + 1)))
	}
	last := &p.lastDn
	if toWitness {
		last = &p.lastUp
	}
	if at.Before(*last) {
		at = *last
	}
	*last = at
	held := false
	var deliver func()
	deliver = func() {
		if part, cut := p.partitioned(w.now); cut {
			if part.lose {
				w.logf("net", "a message between %s and the witness is lost", p.name)
				return
			}
			held = true
			w.at(part.to, deliver)
			return
		}
		if held && from != nil && !from.alive {
			return
		}
		fn()
	}
	w.at(at, deliver)
}

// simWitnessClient is one side's witness.Witness: its name and the lease
// it holds (0: none).
type simWitnessClient struct {
	x     *simWitness
	id    string
	host  *simPrimaryHost // nil: the backup
	path  *simWitnessPath
	lease int64
}

func (x *simWitness) client(id string, host *simPrimaryHost) *simWitnessClient {
	return &simWitnessClient{x: x, id: id, host: host, path: x.path(id)}
}

// clock is the side's clock (the primary host's may run at another rate).
func (c *simWitnessClient) clock() time.Time {
	if c.host != nil {
		return c.host.local(c.x.w.now)
	}
	return c.x.w.now
}

// call sends a request; exec runs at etcd when it arrives (if etcd is up);
// done gets its answer, or a timeout error once timeout has passed.
func (c *simWitnessClient) call(op string, timeout time.Duration, exec func() (int64, error), done func(int64, error)) {
	x, w := c.x, c.x.w
	x.requests++
	n := x.requests
	finished := false
	w.after(timeout, func() {
		if !finished {
			finished = true
			done(0, fmt.Errorf("witness: %s for %s (request %d): %w", op, c.id, n, context.DeadlineExceeded))
		}
	})
	x.cross(c.path, true, c.host, func() {
		if !x.up {
			w.logf("witness", "request %d (%s for %s) lost: etcd is down", n, op, c.id)
			return
		}
		id, err := exec()
		w.logf("witness", "request %d: %s for %s: %s", n, op, c.id, simWitnessOutcome(id, err))
		x.cross(c.path, false, nil, func() {
			if !finished {
				finished = true
				done(id, err)
			}
		})
	})
}

func simWitnessOutcome(id int64, err error) string {
	if err != nil {
		return err.Error()
	}
	if id != 0 {
		return fmt.Sprintf("ok (lease %d)", id)
	}
	return "ok"
}

// Hold is Witness.Hold.
func (c *simWitnessClient) Hold(timeout time.Duration, done func(witness.Lease, error)) {
	c.take("hold", timeout, func() (int64, error) { return c.x.hold(c.id) }, done)
}

// Claim is Witness.Claim.
func (c *simWitnessClient) Claim(timeout time.Duration, done func(witness.Lease, error)) {
	c.take("claim", timeout, func() (int64, error) { return c.x.claim(c.id) }, done)
}

// take makes a request that grants a lease (Hold, Claim) and keeps the
// lease it grants.
func (c *simWitnessClient) take(op string, timeout time.Duration, req func() (int64, error), done func(witness.Lease, error)) {
	sent := c.clock()
	c.call(op, timeout, req, func(id int64, err error) {
		if err != nil {
			done(witness.Lease{}, err)
			return
		}
		c.lease = id
		done(witness.Lease{Sent: sent, TTL: c.x.ttl}, nil)
	})
}

// Renew is Witness.Renew: ErrLeaseGone at once when no lease is held.
func (c *simWitnessClient) Renew(timeout time.Duration, done func(witness.Lease, error)) {
	if c.lease == 0 {
		done(witness.Lease{}, witness.ErrLeaseGone)
		return
	}
	sent, id := c.clock(), c.lease
	c.call("renew", timeout, func() (int64, error) { return 0, c.x.renew(id) }, func(_ int64, err error) {
		if errors.Is(err, witness.ErrLeaseGone) {
			if c.lease == id {
				c.lease = 0
			}
			done(witness.Lease{}, err)
			return
		}
		if err != nil {
			done(witness.Lease{}, err)
			return
		}
		done(witness.Lease{Sent: sent, TTL: c.x.ttl}, nil)
	})
}

// Release is Witness.Release.
func (c *simWitnessClient) Release(timeout time.Duration, done func(error)) {
	if c.lease == 0 {
		done(nil)
		return
	}
	id := c.lease
	c.call("release", timeout, func() (int64, error) { c.x.release(c.id, id); return 0, nil }, func(_ int64, err error) {
		if err == nil {
			c.lease = 0
		}
		done(err)
	})
}

// ---- the primary's side ----

// local is the host's clock at t: it runs slower than etcd's by its rate
// (faster when negative).
func (h *simPrimaryHost) local(t time.Time) time.Time {
	if h.rate == 0 {
		return t
	}
	start := h.w.start
	return start.Add(time.Duration(float64(t.Sub(start)) * (1 - h.rate)))
}

// real is how long d on the host's clock takes.
func (h *simPrimaryHost) real(d time.Duration) time.Duration {
	if h.rate == 0 {
		return d
	}
	return time.Duration(float64(d) / (1 - h.rate))
}

// running: the guest runs (not stopped, not killed, its host up) and an
// agent relays its network (without one it is cut off from the world;
// with a witness the agent starts its relay only once it holds the
// lease).
func (h *simPrimaryHost) running() bool {
	a := h.agent
	return h.alive && h.guest && h.vmRunning && a != nil && (h.w.wit == nil || a.held)
}

// simGate is the agent's gate (internal/agent/witness.go): stop and cont
// of the checkpoint loop go through it, serialized with thaw by its lock;
// a freeze goes to QEMU at once; PassThrough waits for a trusted lease.
type simGate struct {
	frozen      bool // the guard stopped the guest
	loopPaused  bool // a checkpoint stopped it
	mayPass     bool // the lease is trusted
	passPending bool // a PassThrough waits for the lease
	pendingBy   *simPrimarySession
	pendingWhat string
	// lockedUntil: a checkpoint's stop hangs, holding the gate's lock
	// until its command timeout (a thaw then waits for the next tick).
	lockedUntil time.Time
}

// stop is the checkpoint loop's stop. A stuck one hangs for d (the
// command timeout) holding the gate's lock, and leaves the guest as it was
// (its state unknown: counted as running); QEMU's monitor answers nothing
// meanwhile (its commands run in order, behind the stop).
func (a *simAgent) stop(stuck bool, d time.Duration) {
	h := a.host
	if stuck {
		a.gate.lockedUntil = later(a.gate.lockedUntil, h.w.now.Add(d))
		h.qmpHungUntil = later(h.qmpHungUntil, h.w.now.Add(d))
		return
	}
	a.gate.loopPaused = true
	h.vmRunning = false
}

// cont is the checkpoint loop's cont: kept back while the guard has the
// guest frozen.
func (a *simAgent) cont() {
	a.gate.loopPaused = false
	if !a.gate.frozen && !a.dead {
		a.host.vmRunning = true
	}
}

// pass is an Output.PassThrough (the agent's or a session's): with a
// witness it waits while the lease is not trusted.
func (h *simPrimaryHost) pass(ps *simPrimarySession, what string) {
	if a := h.agent; h.w.wit != nil && a != nil && !a.gate.mayPass {
		h.w.logf(h.name, "%s waits for a trusted lease", what)
		a.gate.passPending, a.gate.pendingBy, a.gate.pendingWhat = true, ps, what
		return
	}
	h.passing, h.passedBy = true, ps
	h.w.check.released(h, ps, what)
}

// hold is the first checkpoint's Output.Hold.
func (h *simPrimaryHost) hold() {
	h.passing = false
	if a := h.agent; a != nil {
		a.gate.passPending = false
	}
}

// acked is OnEpoch's call of the guard (acked): an epoch both
// acknowledged and shipped, with the time of its release.
func (ps *simPrimarySession) acked(n uint64, shippedNow bool) {
	if ps.w.wit == nil {
		return
	}
	if ps.relAt == nil {
		ps.relAt, ps.reported = map[uint64]time.Time{}, map[uint64]bool{}
	}
	if shippedNow {
		ps.reported[n] = true
	} else {
		ps.relAt[n] = ps.host.local(ps.w.now)
	}
	at, ok := ps.relAt[n]
	if !ok || !ps.reported[n] {
		return
	}
	delete(ps.relAt, n)
	delete(ps.reported, n)
	if at.After(ps.agent.lastAck) {
		ps.agent.lastAck = at
	}
}

// holdLease is holdPrimaryLease: Hold, bounded by the TTL, again TTL/2
// after a failure, until it is held; then the guard starts, and the first
// session once the rest of the agent's start is done. ErrOwnedElsewhere:
// the guest is stopped and the agent exits.
func (a *simAgent) holdLease() {
	h, w := a.host, a.host.w
	if a.dead || a.stopping || h.agent != a {
		return
	}
	ttl := w.wit.ttl
	a.wit.Hold(h.real(ttl), func(l witness.Lease, err error) {
		if a.dead || h.agent != a {
			return
		}
		switch {
		case err == nil:
			// The guard runs from now on; the rest of the start
			// (RAM, device state, the guest's network relay, the disk
			// mirror) comes before the first session.
			setup := w.dur(w.cfg.AgentSetup)
			if w.chance(w.cfg.PSlowSetup) {
				setup = w.dur(w.cfg.SlowSetup)
			}
			w.logf(h.name, "agent %d holds the witness lease; its guard runs; protection starts in %v", a.gen, setup)
			a.held = true
			a.guard = newSimGuard(a, l)
			w.after(setup, func() {
				if a.dead || a.stopping || h.agent != a {
					return
				}
				a.started = true
				a.dial(true)
			})
		case errors.Is(err, witness.ErrOwnedElsewhere):
			w.logf(h.name, "agent %d: %v: the guest is stopped, the agent exits", a.gen, err)
			h.vmRunning = false
			h.ownedElsewhere++
			a.exit()
		default:
			w.logf(h.name, "agent %d waits for the witness: %v", a.gen, err)
			w.after(h.real(ttl/2), a.holdLease)
		}
	})
}

// simGuard is the primary agent's guard (primaryGuard.run).
type simGuard struct {
	a         *simAgent
	g         witness.Guard
	ttl       time.Duration
	renewing  bool
	nextRenew time.Time // on the host's clock
	frozen    bool
	trusted   bool
	lastErr   error
	// The loop is busy (in a QMP command, a kill) until busyUntil; what
	// comes meanwhile waits in queue (one tick at most: a ticker's
	// channel holds one).
	busyUntil  time.Time
	queue      []func()
	tickQueued bool
	done       bool // run returned
}

func newSimGuard(a *simAgent, first witness.Lease) *simGuard {
	h, w := a.host, a.host.w
	g := &simGuard{a: a, g: witness.Guard{StopBudget: simGuardStopBudget, Grace: w.cfg.Heartbeat.WithDefaults().Timeout / 3},
		ttl: first.TTL, trusted: true}
	g.g.Renewed(first)
	g.nextRenew = h.local(w.now).Add(g.ttl / 4)
	a.gate.mayPass = true
	w.after(h.real(simGuardPeriod), g.tick)
	return g
}

func (g *simGuard) over() bool { return g.done || g.a.dead || !g.a.host.alive }

// deliver runs fn in the guard's loop: now, or once it is no longer
// busy.
func (g *simGuard) deliver(fn func()) {
	if g.a.host.w.now.Before(g.busyUntil) {
		g.queue = append(g.queue, fn)
		return
	}
	fn()
}

// busy keeps the loop busy until t, then takes what waited.
func (g *simGuard) busy(t time.Time) {
	w := g.a.host.w
	if !t.After(g.busyUntil) {
		return
	}
	g.busyUntil = t
	w.at(t, func() {
		if !w.now.Equal(g.busyUntil) {
			return
		}
		for len(g.queue) > 0 && !w.now.Before(g.busyUntil) && !g.over() {
			fn := g.queue[0]
			g.queue = g.queue[1:]
			fn()
		}
	})
}

// tick is the guard's ticker: every 50 ms by the host's clock; a tick
// carries the time it fired, also when the loop takes it late.
func (g *simGuard) tick() {
	if g.over() {
		return
	}
	h, w := g.a.host, g.a.host.w
	w.after(h.real(simGuardPeriod), g.tick)
	fired := h.local(w.now)
	if w.now.Before(g.busyUntil) {
		if !g.tickQueued {
			g.tickQueued = true
			g.queue = append(g.queue, func() { g.tickQueued = false; g.check(fired) })
		}
		return
	}
	g.check(fired)
}

// check is the loop's tick case.
func (g *simGuard) check(now time.Time) {
	if g.over() {
		return
	}
	a, h, w := g.a, g.a.host, g.a.host.w
	if !g.renewing && !now.Before(g.nextRenew) {
		g.renewing, g.nextRenew = true, now.Add(g.ttl/4)
		g.renew()
	}
	if !a.lastAck.IsZero() {
		g.g.Heard(a.lastAck)
	}
	if t := g.g.LeaseTrusted(now); t != g.trusted {
		g.trusted = t
		if !t {
			w.logf(h.name, "guard: the witness lease is no longer trusted")
		}
		g.allowPass(t)
	}
	ok, why := g.g.MayRun(now)
	switch {
	case !ok && !g.frozen:
		g.frozen = true
		g.freeze(why, nil)
	case ok && g.frozen:
		g.thaw()
	}
}

// freeze is freezeGuest: the guest is marked frozen (the checkpoint
// loop's next cont is kept back) and a QMP stop goes to QEMU at once,
// bounded by the stop budget less the check's period. A stop that gets no
// answer in time (QEMU's monitor hangs behind a checkpoint's stop) kills
// the guest at once (kill); the loop is busy until QEMU shows as gone.
// then, if set, runs once the guest is stopped.
func (g *simGuard) freeze(why string, then func()) {
	a, h, w := g.a, g.a.host, g.a.host.w
	w.logf(h.name, "guard: stopping the guest: %s", why)
	a.gate.frozen = true
	if !h.guest {
		// QEMU crashed: the stop fails at once on its closed monitor;
		// the kill finds nothing left to kill, and waitGone waits
		// until QEMU shows as gone. The guard returns ErrHandedOver.
		left := max(h.qemuGoneAt.Sub(w.now), 0)
		gone := (left + simGuestGonePoll - 1) / simGuestGonePoll * simGuestGonePoll
		g.busy(w.now.Add(gone))
		w.logf(h.name, "guard: the stop fails: QEMU's monitor is closed (the guest's QEMU is gone)")
		w.after(gone, func() { g.end(ErrHandedOver) })
		return
	}
	hung := max(h.qmpHungUntil.Sub(w.now), 0)
	if bound := simGuardStopBudget - simGuardPeriod; hung > bound {
		// The stop's bound, then SIGKILL, and waitGone until QEMU shows
		// as gone: its exit (QEMUExit) rounded up to waitGone's polls.
		exit := w.dur(w.cfg.QEMUExit)
		gone := bound + (exit+simGuestGonePoll-1)/simGuestGonePoll*simGuestGonePoll
		g.busy(w.now.Add(gone))
		w.logf(h.name, "guard: QEMU's monitor hangs behind a checkpoint's stop for %v: the stop will get no answer within %v", hung.Round(time.Millisecond), bound)
		killed := false
		w.after(bound, func() {
			if a.dead || !h.alive || !h.guest {
				return
			}
			killed = true
			g.kill(exit)
		})
		w.after(gone, func() {
			if killed {
				g.end(ErrHandedOver)
			}
		})
		return
	}
	took := hung + w.dur(simRange{100 * time.Microsecond, time.Millisecond})
	if w.chance(w.cfg.PSlowPause) {
		// A slow stop (the guest's I/O drained), within the budget.
		took = hung + w.dur(simRange{20 * time.Millisecond, 150 * time.Millisecond})
	}
	g.busy(w.now.Add(took))
	w.after(took, func() {
		if !h.alive || !h.guest {
			return
		}
		if a.gate.frozen {
			h.freezes++
			h.frozeAt = w.now
			h.vmRunning = false
		}
		if then != nil {
			then()
		}
	})
}

// thaw continues a frozen guest, unless a checkpoint's QMP command holds
// the gate's lock (then the next tick tries again) or a checkpoint has it
// stopped (its cont resumes it).
func (g *simGuard) thaw() {
	a, h, w := g.a, g.a.host, g.a.host.w
	if w.now.Before(a.gate.lockedUntil) {
		return
	}
	g.frozen = false
	a.gate.frozen = false
	if !a.gate.loopPaused {
		h.vmRunning = true
	}
	w.logf(h.name, "guard: the guest runs again (the lease or the backup is back)")
}

// allowPass: a PassThrough that waited for the lease is done now.
func (g *simGuard) allowPass(ok bool) {
	a, h := g.a, g.a.host
	if a.dead {
		return
	}
	a.gate.mayPass = ok
	if ok && a.gate.passPending {
		a.gate.passPending = false
		h.passing, h.passedBy = true, a.gate.pendingBy
		h.w.logf(h.name, "guard: the lease is trusted: %s done", a.gate.pendingWhat)
		h.w.check.released(h, a.gate.pendingBy, a.gate.pendingWhat+" (once the lease was trusted)")
	}
}

// renew is the renewal goroutine: Renew, and on ErrLeaseGone Hold, both
// within TTL/4; the outcome goes to the loop.
func (g *simGuard) renew() {
	a, h, w := g.a, g.a.host, g.a.host.w
	bound := h.real(g.ttl / 4)
	deadline := w.now.Add(bound)
	outcome := func(l witness.Lease, err error) {
		if g.over() {
			return
		}
		g.deliver(func() { g.renewed(l, err) })
	}
	a.wit.Renew(bound, func(l witness.Lease, err error) {
		if g.over() {
			return
		}
		if !errors.Is(err, witness.ErrLeaseGone) {
			outcome(l, err)
			return
		}
		if left := deadline.Sub(w.now); left > 0 {
			a.wit.Hold(left, outcome)
			return
		}
		outcome(witness.Lease{}, context.DeadlineExceeded)
	})
}

// renewed is the loop's renewal case.
func (g *simGuard) renewed(l witness.Lease, err error) {
	if g.over() {
		return
	}
	h, w := g.a.host, g.a.host.w
	g.renewing = false
	switch {
	case errors.Is(err, witness.ErrOwnedElsewhere):
		w.logf(h.name, "guard: %v", err)
		g.freeze("the backup owns the guest now", func() { g.end(ErrFailedOver) })
	case err != nil:
		if g.lastErr == nil {
			w.logf(h.name, "guard: cannot renew the witness lease: %v (trusted for %v)", err, g.g.TrustedFor(h.local(w.now)).Round(time.Millisecond))
		}
		g.lastErr = err
	default:
		if g.lastErr != nil {
			w.logf(h.name, "guard: witness lease renewed again")
		}
		g.lastErr = nil
		g.g.Renewed(l)
	}
}

// kill is killGuestNow for the guard: QEMU gets SIGKILL, the guest runs
// no more, and its monitor's connection closes: a checkpoint's hung stop
// fails at once, and its GuestGone finds QEMU gone once the process shows
// as gone, exit later (within its grace: the checkpoint failed
// GuestStuck). The guard returns ErrHandedOver once its waitGone saw QEMU
// gone (freeze).
func (g *simGuard) kill(exit time.Duration) {
	a, h, w := g.a, g.a.host, g.a.host.w
	h.guest, h.vmRunning, h.guestGoneAt, h.qemuGoneAt = false, false, w.now, w.now.Add(exit)
	h.qmpHungUntil, a.gate.lockedUntil = time.Time{}, time.Time{}
	w.logf(h.name, "guard: guest killed (SIGKILL): it could not be stopped before the lease could run out; QEMU shows as gone in %v", exit)
	w.check.guardKilled(h, "the primary's guard killed its guest, which it could not stop")
	if ps := a.sess; ps != nil {
		ps.monitorClosed()
	}
}

// end is run returning err: the guard renews and checks no more. With
// ErrFailedOver RunPrimary cancels the rest of the agent at once (a
// session under way gets StopRequested) and kills the guest once it
// returned. With ErrHandedOver (the guard killed the guest) it waits for
// the protection loop to end by itself (the session's next checkpoint
// finds QEMU gone and hands the guest over), at most 2 × the heartbeat
// timeout by the host's clock, and only then cancels it. The agent exits
// once the loop ended.
func (g *simGuard) end(err error) {
	a, h, w := g.a, g.a.host, g.a.host.w
	if g.done || a.dead {
		return
	}
	g.done = true
	a.guardErr = err
	if errors.Is(err, ErrHandedOver) {
		wait := 2 * w.cfg.Heartbeat.WithDefaults().Timeout
		w.logf(h.name, "guard: %v: the agent waits up to %v for its protection loop to end", err, wait)
		w.after(h.real(wait), func() {
			if a.dead || a.stopping {
				return
			}
			w.logf(h.name, "guard: the protection loop did not end within %v of the kill", wait)
			a.cancel("the agent stops: " + err.Error())
		})
		return
	}
	w.logf(h.name, "guard: %v: the agent stops", err)
	a.cancel("the agent stops: " + err.Error())
}

// cancel is RunPrimary cancelling its protection loop: a session under way
// gets StopRequested (the agent exits once it ended); between sessions
// the agent exits now.
func (a *simAgent) cancel(reason string) {
	a.stopping = true
	if ps := a.sess; ps != nil {
		ps.post(StopRequested{Now: a.host.w.now, Reason: reason})
		return
	}
	a.exit()
}

// ---- the backup's side ----

// claim carries out the Standby's Claim: bounded by max(heartbeat
// timeout, 1 s); Held is ErrHeld.
func (b *simBackupHost) claim(a Claim) {
	w := b.w
	b.claiming = true
	inc := b.inc
	bound := max(w.cfg.Heartbeat.Timeout, time.Second)
	b.wit.Claim(bound, func(_ witness.Lease, err error) {
		if !b.up || b.inc != inc {
			return
		}
		b.claimDone = &ClaimDone{Held: errors.Is(err, witness.ErrHeld), Err: err}
		b.run()
	})
}

// keepLease is keepBackupLease: after a failover the backup renews its
// lease, or claims it when it is gone or was never taken (a takeover),
// every TTL/4, each attempt bounded by TTL/4.
func (b *simBackupHost) keepLease() {
	w := b.w
	inc := b.inc
	ttl := w.wit.ttl
	held := true
	var lastErr error
	var round func()
	round = func() {
		if !b.up || b.inc != inc {
			return
		}
		deadline := w.now.Add(ttl / 4)
		after := func(err error) {
			if !b.up || b.inc != inc {
				return
			}
			held = err == nil
			switch {
			case err != nil && (lastErr == nil || lastErr.Error() != err.Error()):
				w.logf("backup", "the guest runs here; cannot hold the witness lease: %v", err)
			case err == nil && lastErr != nil:
				w.logf("backup", "holding the witness lease: the guest runs here")
			}
			lastErr = err
			w.after(ttl/4, round)
		}
		claim := func() {
			left := deadline.Sub(w.now)
			if left <= 0 {
				after(context.DeadlineExceeded)
				return
			}
			b.wit.Claim(left, func(_ witness.Lease, err error) { after(err) })
		}
		if !held {
			claim()
			return
		}
		b.wit.Renew(ttl/4, func(_ witness.Lease, err error) {
			if errors.Is(err, witness.ErrLeaseGone) {
				claim()
				return
			}
			after(err)
		})
	}
	round()
}

// ---- the invariants with a witness ----

// witnessAfterStep checks (d) with a witness after every happening: once
// the backup resumed the guest, no primary-side guest runs and none emits
// output (no network fault excuses it: that is what the witness is for).
func (ck *simChecker) witnessAfterStep() {
	w := ck.w
	if len(ck.expected) > 0 {
		w.wit.observe()
	} else {
		w.wit.claimableSince = time.Time{}
	}
	if !w.backup.failedOver {
		return
	}
	for _, h := range [...]*simPrimaryHost{w.primary, w.second} {
		if h == nil || !h.running() {
			continue
		}
		what := "runs"
		if h.passing {
			what = "runs and its output passes"
		}
		ck.once(fmt.Sprintf("wd-%s-%d", h.name, h.agents), "d", "the %s's guest %s (not frozen, %s) while the backup runs the guest (resumed at %.3fs, %s)",
			h.name, what, h.agentState(), ck.failoverAt.Sub(w.start).Seconds(), ck.failover.why)
	}
}

// witnessFailOver judges the backup's failover with a witness.
//
// (b) After the primary's silence the backup resumes only holding the
// witness: at that moment etcd names it owner and active. (A takeover
// needs no claim: the primary killed its guest first.)
//
// (d) As it resumes, no primary-side guest runs.
func (ck *simChecker) witnessFailOver(fo FailOver, byTakeover bool) {
	w := ck.w
	x := w.wit
	x.expire()
	if !byTakeover {
		if fo.Cleared.IsZero() {
			ck.violate("b", "failed over to epoch %d after silence without claiming the witness", fo.Epoch)
		} else if x.owner != "backup" || x.liveActive() != "backup" {
			ck.violate("b", "failed over to epoch %d after a claim, but etcd names %q owner and %q active", fo.Epoch, x.owner, x.liveActive())
		}
	}
	for _, h := range [...]*simPrimaryHost{w.primary, w.second} {
		if h != nil && h.running() {
			ck.violate("d", "the %s's guest runs (not frozen, %s) as the backup resumes the guest", h.name, h.agentState())
		}
	}
}

// witnessReleased judges output leaving host h with a witness: after the
// backup resumed the guest none may (a Release, or a PassThrough while
// the guest runs).
func (ck *simChecker) witnessReleased(h *simPrimaryHost, what string) {
	if !ck.w.backup.failedOver {
		return
	}
	if strings.HasPrefix(what, "Release") || h.running() {
		ck.violate("d", "%s on the %s after the backup resumed the guest (at %.3fs)", what, h.name, ck.failoverAt.Sub(ck.w.start).Seconds())
	}
}

// witnessOverdue: with a witness an expected failover waits for the
// backup to be able to claim (etcd up and reachable, the primary's lease
// ended); from then it may take a claim that was lost (its bound), the
// wait before the next (the heartbeat timeout) and one more.
func (ck *simChecker) witnessOverdue(e *simExpectedFailover, limit time.Duration) bool {
	w := ck.w
	x := w.wit
	if x.claimableSince.IsZero() {
		return false
	}
	cfg := w.cfg
	from := later(e.since, x.claimableSince)
	bound := max(cfg.Heartbeat.Timeout, time.Second)
	return w.now.Sub(from) > limit+bound+cfg.Heartbeat.Timeout+2*cfg.Heartbeat.Interval+2*(cfg.WitnessLink.Max+cfg.SpikeMax)
}

// isolate cuts host h off from the backup and from the witness for d.
func (w *simWorld) isolate(h *simPrimaryHost, d time.Duration, lose bool) {
	w.partition(h, d)
	w.wit.partition(h.name, d, lose)
}

// doWitness carries out a script's witness command.
func (w *simWorld) doWitness(words []string) error {
	if w.wit == nil {
		return errors.New("no witness in this run (config witness on)")
	}
	arg := func(i int) string {
		if i < len(words) {
			return words[i]
		}
		return ""
	}
	line := strings.Join(words, " ")
	switch {
	case words[0] == "partition" && len(words) >= 3:
		d, err := time.ParseDuration(arg(2))
		if err != nil {
			return err
		}
		host := strings.TrimSuffix(arg(1), "-witness")
		if host != "primary" && host != "backup" && host != "second" {
			return fmt.Errorf("no path %q", arg(1))
		}
		w.wit.partition(host, d, arg(3) == "lose")
	case words[0] == "witness" && arg(1) == "down":
		d, err := time.ParseDuration(arg(2))
		if err != nil {
			return err
		}
		w.wit.down(d)
	case words[0] == "isolate" && arg(1) == "primary":
		d, err := time.ParseDuration(arg(2))
		if err != nil {
			return err
		}
		w.isolate(w.primary, d, arg(3) == "lose")
	default:
		return fmt.Errorf("unknown command %q", line)
	}
	return nil
}

// expectWitness checks a script's expectation about the witness or the
// guard.
func (w *simWorld) expectWitness(words []string) error {
	line := strings.Join(words, " ")
	h, b := w.primary, w.backup
	at := func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return fmt.Sprintf("%.3fs", t.Sub(w.start).Seconds())
	}
	switch {
	case line == "primary frozen":
		if !h.alive || !h.guest || h.vmRunning {
			return fmt.Errorf("the primary's guest: host up %v, guest alive %v, running %v", h.alive, h.guest, h.vmRunning)
		}
	case line == "primary running":
		if !h.alive || !h.guest || !h.vmRunning {
			return fmt.Errorf("the primary's guest: host up %v, guest alive %v, running %v (last frozen %s)", h.alive, h.guest, h.vmRunning, at(h.frozeAt))
		}
	case line == "primary never frozen":
		if h.freezes > 0 {
			return fmt.Errorf("the guard froze the guest %d times, the last at %s", h.freezes, at(h.frozeAt))
		}
	case line == "primary froze before failover":
		switch {
		case !b.failedOver:
			return errors.New("no failover")
		case h.freezes == 0:
			return fmt.Errorf("the guard never froze the guest (failover at %s)", at(w.check.failoverAt))
		case !h.frozeAt.Before(w.check.failoverAt):
			return fmt.Errorf("the guard froze the guest at %s, the backup resumed it at %s", at(h.frozeAt), at(w.check.failoverAt))
		}
	case len(words) == 3 && words[0] == "witness" && (words[1] == "owner" || words[1] == "active"):
		if w.wit == nil {
			return errors.New("no witness in this run")
		}
		w.wit.expire()
		got := w.wit.owner
		if words[1] == "active" {
			got = w.wit.liveActive()
		}
		if got == "" {
			got = "none"
		}
		if got != words[2] {
			return fmt.Errorf("witness %s %s", words[1], got)
		}
	default:
		return fmt.Errorf("unknown expectation %q", line)
	}
	return nil
}

// agentState says what the host's agent is doing, for a violation.
func (h *simPrimaryHost) agentState() string {
	a := h.agent
	switch {
	case a == nil:
		return "no agent"
	case a.guard == nil:
		return fmt.Sprintf("agent %d up, its guard not started yet", a.gen)
	case h.w.now.Before(h.qmpHungUntil):
		return fmt.Sprintf("agent %d up, QEMU's monitor hung behind a checkpoint's stop until %.3fs", a.gen, h.qmpHungUntil.Sub(h.w.start).Seconds())
	}
	return fmt.Sprintf("agent %d up", a.gen)
}

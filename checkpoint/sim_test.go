package checkpoint

// A deterministic simulation of the epoch protocol, in the manner of etcd
// raft's tests: one Session (the primary's agent) and one Standby (the
// backup's agent) run against a fake clock, a simulated network and a
// simulated QEMU, all driven by one seeded random source. Nothing here does
// I/O or reads the real clock, so a seed replays exactly.
//
// What is simulated (sim_test.go):
//
//   - The clock and a queue of happenings (simWorld): time jumps from one
//     happening to the next; both agents tick every TickEvery (the drivers'
//     Interval/4) with a little jitter, the Session also at its NextWake.
//   - Connections (simConn): each direction a FIFO (TCP never reorders) whose
//     frames take a random delay; a partition holds them until it heals (TCP
//     retransmits); a reset (simPipe.cut) loses a random tail of the frames
//     in flight and the far end sees the end (ConnClosed, LinkDown) after a
//     random delay; a dead host's connection goes silent.
//   - The primary host (simPrimaryHost): its guest, the agent's network relay
//     (holding or passing the guest's output), the agent process (SIGTERM,
//     SIGKILL, restarts; a new agent holds output until the backup answers;
//     a session that ends is followed by another at once, the output as
//     the Session left it, and if that one too ends without committing
//     anything the output passes and the agent waits Retry; the first dial
//     of each gives up after the heartbeat timeout, letting the output
//     pass; once a session ended with the guest's QEMU gone, the agent's
//     protection loop ends instead, ErrGuestGone), the guest's QEMU (a
//     SIGKILLed or crashed one closes its monitor QEMUExit before it shows
//     as gone by /proc), and one simPrimarySession per
//     connection carrying out the Session's actions as Primary.Run does:
//     TakeCheckpoint runs beside the loop (one at a time: the Session's
//     busy flag), which meanwhile hears the backup, ticks, heartbeats and
//     releases; its outcome is posted to the loop like any event, a failed
//     one after GuestGone, which waits up to 300 ms for QEMU to show as
//     gone (GuestStuck if it does); a KillGuest, or QEMU's death, cuts its
//     QMP commands short (the monitor closed); End waits for a checkpoint
//     under way, the loop reading nothing meanwhile, and its outcome is
//     never read. Ship is asynchronous (a sender writes the epoch's frames,
//     the last one the commit). Events wait in the loop's inbox, stamped
//     with their arrival time; the loop picks among ready events and ticks
//     at random, as Go's select does, and a tick carries the receipt time
//     of the newest frame (Tick.Heard).
//   - The backup host (simBackupHost): the Standby and its driver (Backup):
//     frames become FrameHeard, EpochStaged (the commit frame), EpochRejected
//     (a corrupt frame; the reader stops), GoodbyeIn (TakeOver for a
//     takeover), ConnClosed, all stamped with the frame's arrival. Apply
//     runs beside the loop, its outcome (Applied) one more case of the
//     loop's select; while it runs, what the readers deliver is held (a
//     session's frame counted as heard, FrameHeard, when it came) and
//     replayed in order once Applied was taken; ticks go on, with
//     Tick.Heard, and the Standby heartbeats but judges no silence. The
//     backup's RAM image (simImage) records which session's epoch it holds,
//     and whether an apply tore it. A backup restart is a fresh Standby;
//     port scans and strangers' hellos arrive on connections that are not
//     sessions.
//   - With a witness (config witness on; every other seed of
//     TestSimRandomized; sim_witness_test.go): an etcd with the VM's keys
//     and leases, the paths between each host and it, the primary agent's
//     Hold and guard (the real witness.Guard) freezing and thawing the
//     guest through the agent's gate, the backup's claim (a Standby with
//     Witness) and its lease after a failover.
//
// The invariants (sim_check_test.go) are checked as the actions happen and
// after every happening; TestSimRandomized (sim_random_test.go) runs
// thousands of seeds with random faults, TestSimScenarios
// (sim_script_test.go) runs the scripts in testdata/sim.
//
// # Scenario scripts
//
// One command a line; '#' starts a comment; "---" on a line of its own
// starts a new, independent run in the same file. Durations are Go
// durations (300ms, 1.5s). Every run starts with the backup up and the
// primary's agent starting its first session at time 0 (simDefaults: seed
// 1, no random faults), and ends with the invariants checked; a violation
// fails the run unless it is declared with known-bug.
//
//	config KEY VALUE            before the first command of a run:
//	                            seed N, retry D, pause D, apply D, link D
//	                            (the largest one-way delay), interval D,
//	                            max-in-flight N, command-timeout D,
//	                            prepare on|off, qemu-exit D (from a killed
//	                            or crashed QEMU's monitor closing until it
//	                            shows as gone by /proc); with a witness:
//	                            witness on|off, ttl D (rounded up to seconds),
//	                            witness-link D (the largest one-way delay
//	                            to etcd), clock-rate F (how much slower
//	                            the primary host's clock runs than etcd's,
//	                            within ±witness.ClockRate), agent-setup D
//	                            (the primary agent's start between its
//	                            Hold and its first session)
//	run D                       let D of simulated time pass
//	repeat N ... end            the commands between, N times
//	kill primary-host [rst]     the primary host dies (guest included); its
//	                            connection goes silent (rst: then resets)
//	kill primary-host at POINT [epoch N]
//	                            the host dies when a session next reaches
//	                            POINT (of epoch N): paused (in a checkpoint),
//	                            taken (taken, not shipped), shipping (half of
//	                            the epoch's frames sent), shipped (all sent,
//	                            not acked), acked (released)
//	sigterm primary             the agent is asked to stop (StopRequested);
//	                            it exits when the session ends
//	sigkill primary-agent       the agent dies: its connection closes, the
//	                            guest's output is cut, the guest runs on
//	restart primary after D     start the agent D after it exits (or now,
//	                            if it is down)
//	guest crashes               the guest's QEMU dies by itself: its
//	                            monitor closes at once, the process shows as
//	                            gone qemu-exit later; the agent goes on
//	break link                  the network resets the session's connection
//	partition D                 no frame passes between the hosts for D
//	partition HOST-witness D [lose]
//	                            HOST (primary, backup, second) and etcd
//	                            cannot reach each other for D: what crosses
//	                            is held until it heals (lose: lost)
//	witness down D              etcd is down for D: requests are lost,
//	                            leases do not expire; back up, every lease
//	                            has its TTL again
//	isolate primary D [lose]    the primary is cut off from the backup and
//	                            from etcd for D
//	scan backup                 a port scan: a connection that is heard,
//	                            says nothing valid and closes
//	hello backup from NAME      a connection says hello for VM NAME
//	checkpoint fails [stuck]    the next checkpoint fails, the guest running
//	                            (stuck: it hangs for the command timeout and
//	                            leaves the guest in an unknown state)
//	checkpoint slow D           the next checkpoint takes D and succeeds
//	apply fails                 the backup's next apply fails midway (torn)
//	apply slow D                every apply from now on takes D
//	corrupt next epoch          the next epoch's commit frame arrives corrupt
//	lose next ack               the next ack is dropped (TCP would not: a
//	                            transport bug the protocol must survive)
//	delay acks D                every ack takes D more (FIFO: what follows
//	                            waits behind it)
//	delay backup hello D        the backup's next hello takes D more
//	stray heartbeat to primary  a heartbeat reaches the primary's session
//	                            that the Standby never sent (the old
//	                            driver's race ahead of the hello)
//	delay ship-reports D        the sender's report of a shipped epoch
//	                            reaches the loop D late (after the ack)
//	restart backup after D      the backup's agent dies and comes back
//	                            fresh after D
//	second primary [for D]      another host claiming the same VM connects;
//	                            its agent stops after D (default 300ms)
//	expect failover [epoch>=N|epoch<=N|epoch=N]
//	expect failover by takeover the backup resumed the guest on the
//	                            primary's takeover goodbye
//	expect no-failover
//	expect backup state STATE   waiting, syncing, protecting, suspect,
//	                            failed-over
//	expect primary state STATE  the current session's state (greeting,
//	                            preparing, protecting, leaving, draining,
//	                            ended: End waits for a checkpoint), or none
//	expect primary ended ERR    the newest ended session's error matches
//	                            ErrStopped, ErrPeerLost, ErrPeerRejected,
//	                            ErrFailedOver or ErrHandedOver (other
//	                            words: its text contains them)
//	expect primary exited ERR   no agent runs on the primary host, and the
//	                            newest one's protection loop ended with ERR:
//	                            ErrGuestGone (its QEMU gone, no new
//	                            session), ErrHandedOver, ErrFailedOver, or
//	                            stopped (no error: asked to stop, killed,
//	                            or before it protected)
//	expect guest alive|dead     the primary's guest
//	expect guest dead before failover
//	                            the primary's guest died (its host, or a
//	                            kill) before the backup resumed the guest
//	expect committed>=N         the current session's committed epoch
//	expect primary frozen|running
//	                            the primary's guest is up and stopped (by
//	                            the guard, a checkpoint, or an agent that
//	                            found it owned elsewhere), or runs
//	expect primary never frozen the guard never stopped the guest
//	expect primary froze before failover
//	                            the guard stopped the guest before the
//	                            backup resumed it
//	expect witness owner|active NAME
//	                            etcd's owner key, or its live active key,
//	                            names NAME (primary, backup, none)
//	expect split-brain          two live guests were seen, excused as a
//	                            network fault (see invariant d)
//	expect no-split-brain
//	known-bug INVS TEXT         this run reproduces a known bug: a violation
//	                            of one of the invariants INVS (letters a..g,
//	                            e.g. bd) must occur, and violations of those
//	                            are logged, not failed; the run fails once
//	                            the bug is gone (then make it a regression
//	                            test)

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sort"
	"strings"
	"time"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/transport"
	"github.com/remus-kvm/remus/witness"
)

// The hellos the two sides send.
var (
	simPrimaryHello = transport.Hello{Version: transport.Version, Role: transport.RolePrimary, VMName: "vm1", RAMSize: 1 << 20, PageSize: transport.PageSize}
	simBackupHello  = transport.Hello{Version: transport.Version, Role: transport.RoleBackup, VMName: "vm1", RAMSize: 1 << 20, PageSize: transport.PageSize}
)

// simRange is a range of durations a random one is drawn from.
type simRange struct{ Min, Max time.Duration }

// simConfig sets the simulated timings and the faults' odds.
type simConfig struct {
	Heartbeat      failover.DetectorConfig
	Pipeline       PipelineConfig
	Prepare        bool     // sessions have a step before the first epoch
	PrepareTime    simRange // how long it takes
	TickEvery      time.Duration
	Link           simRange      // one-way delay of a frame
	LinkSpike      float64       // odds that a frame takes up to SpikeMax more
	SpikeMax       time.Duration // the largest such spike
	Pause          simRange      // a checkpoint: stop, save, cont
	CommandTimeout time.Duration // how long a stuck checkpoint hangs
	ShipGap        simRange      // between the frames of an epoch
	Apply          simRange      // the backup's apply
	Retry          simRange      // the primary agent's wait before a new session (after two that protected nothing)
	Redial         time.Duration // between dial attempts to a backup that is down
	BreakNotice    simRange      // from a reset until the far end notices
	// QEMUExit: from the moment a killed (or crashed) QEMU's monitor
	// closes until the process shows as gone by /proc (GuestGone): the
	// kernel tears the process down meanwhile.
	QEMUExit simRange

	// The witness (sim_witness_test.go), with Witness: the lease's TTL,
	// the one-way delay between a host and etcd, and how much slower the
	// primary host's clock runs than etcd's (negative: faster).
	Witness     bool
	WitnessTTL  time.Duration
	WitnessLink simRange
	ClockRate   float64
	// The primary agent's start between its Hold and its first session:
	// usually AgentSetup, with odds PSlowSetup SlowSetup (randomized
	// runs).
	AgentSetup, SlowSetup simRange
	PSlowSetup            float64

	// Odds of faults per checkpoint, apply, epoch, ack (randomized runs).
	PFailRunning, PFailStuck, PSlowPause float64
	SlowPause                            simRange
	PApplyFail, PSlowApply               float64
	SlowApply                            simRange
	PCorrupt, PLoseAck, PPrepareFail     float64
}

// simDefaults are the timings of a run: the agents' defaults (heartbeat
// every 100 ms, dead after 500 ms, an epoch every 25 ms, two in flight), a
// LAN, and pauses, applies and a command timeout that stay below the
// heartbeat timeout, to keep runs short. The protocol no longer needs that
// (checkpoints and applies run beside the loops, which keep heartbeating:
// testdata/sim/slow-checkpoint.txt and slow-backup.txt); -sim.wide draws
// longer ones and the agents' real command timeout, 10 s. The agent waits
// Retry only after two sessions in a row that protected nothing (the
// first redial is at once): 100 ms in scripts, drawn up to the agents'
// default of 1 s in randomized runs. Scripts checkpoint every interval
// whatever the pauses (no minimum run fraction: their epochs are counted);
// randomized runs draw the agents' default, 90%, or none.
func simDefaults() simConfig {
	return simConfig{
		Heartbeat:      failover.DetectorConfig{Interval: 100 * time.Millisecond, Timeout: 500 * time.Millisecond},
		Pipeline:       PipelineConfig{Interval: 25 * time.Millisecond, MaxInFlight: 2, MinRun: -1},
		PrepareTime:    simRange{10 * time.Millisecond, 80 * time.Millisecond},
		TickEvery:      25 * time.Millisecond,
		Link:           simRange{500 * time.Microsecond, 3 * time.Millisecond},
		SpikeMax:       20 * time.Millisecond,
		Pause:          simRange{time.Millisecond, 5 * time.Millisecond},
		CommandTimeout: 250 * time.Millisecond,
		ShipGap:        simRange{200 * time.Microsecond, 3 * time.Millisecond},
		Apply:          simRange{time.Millisecond, 4 * time.Millisecond},
		Retry:          simRange{100 * time.Millisecond, 100 * time.Millisecond},
		Redial:         100 * time.Millisecond,
		BreakNotice:    simRange{0, 20 * time.Millisecond},
		QEMUExit:       simRange{time.Millisecond, 20 * time.Millisecond},
		SlowPause:      simRange{20 * time.Millisecond, 150 * time.Millisecond},
		SlowApply:      simRange{20 * time.Millisecond, 200 * time.Millisecond},
		WitnessTTL:     witness.DefaultTTL,
		WitnessLink:    simRange{500 * time.Microsecond, 5 * time.Millisecond},
		AgentSetup:     simRange{time.Millisecond, 20 * time.Millisecond},
		SlowSetup:      simRange{0, 3 * time.Second},
	}
}

// simScripted holds what a script asked for: one-shot faults and settings
// that last.
type simScripted struct {
	checkpoints []simCheckpoint // the next checkpoints' outcomes, in order
	applyFails  int             // the next applies that fail
	applySlow   time.Duration   // every apply takes this long (0: random)
	loseAcks    int
	corrupt     int
	ackDelay    time.Duration
	helloDelay  time.Duration // the backup's next hello
	reportDelay time.Duration
}

// simCheckpoint is what a TakeCheckpoint does in the simulated QEMU.
type simCheckpoint struct {
	kind simCheckpointKind
	took time.Duration
}

type simCheckpointKind int

const (
	simTaken       simCheckpointKind = iota
	simFailRunning                   // save failed, cont worked: the guest runs
	simFailStuck                     // stop hung: the guest's state is unknown
	simFailClosed                    // QEMU's monitor closed under it (QEMU killed or crashed): its QMP command failed at once
)

// simGuestGoneGrace is how long the GuestGone check of a failed checkpoint
// waits for QEMU to show as gone (internal/agent/primary.go): its monitor
// closes a moment before. It polls every simGuestGonePoll (waitGone).
const (
	simGuestGoneGrace = 300 * time.Millisecond
	simGuestGonePoll  = 20 * time.Millisecond
)

// simPartition holds every frame between host and the backup from from to to.
type simPartition struct {
	host     *simPrimaryHost
	from, to time.Time
}

// simWorld is one simulated run.
type simWorld struct {
	cfg      simConfig
	seed     uint64
	rng      *rand.Rand
	start    time.Time
	now      time.Time
	seq      uint64
	queue    simQueue
	trace    *simTrace
	check    *simChecker
	primary  *simPrimaryHost // the protected guest's host
	second   *simPrimaryHost // another host claiming the same VM, if any
	backup   *simBackupHost
	wit      *simWitness // the witness (nil: none)
	conns    map[ConnID]*simConn
	nextConn ConnID
	sessions int // primary sessions so far, for their numbers
	parts    []simPartition
	script   simScripted
	lostAcks int  // acks dropped (lose next ack, PLoseAck)
	quiet    bool // no random faults from now on
	halted   bool // a panic: the world is inconsistent, stop
}

func newSimWorld(seed uint64, cfg simConfig, keepTrace bool) *simWorld {
	start := time.Unix(1_000_000, 0)
	w := &simWorld{cfg: cfg, seed: seed, rng: rand.New(rand.NewPCG(seed, 0x5eed)), start: start, now: start,
		conns: map[ConnID]*simConn{}, trace: &simTrace{keepAll: keepTrace}}
	w.check = newSimChecker(w)
	if cfg.Witness {
		w.wit = newSimWitness(w)
	}
	w.backup = newSimBackupHost(w)
	w.primary = newSimPrimaryHost(w, "primary")
	return w
}

// begin boots the backup and starts the primary's agent.
func (w *simWorld) begin() {
	w.backup.boot()
	w.primary.startAgent()
	w.watchdog()
}

// runFor lets d of simulated time pass, a happening at a time. A panic in
// a machine is a violation (invariant e) and halts the world.
func (w *simWorld) runFor(d time.Duration) {
	end := w.now.Add(d)
	defer func() {
		if r := recover(); r != nil {
			w.halted = true
			w.check.violate("e", "panic: %v", r)
		}
	}()
	for len(w.queue) > 0 && w.queue[0].at <= int64(end.Sub(w.start)) && !w.halted {
		h := w.queue.pop()
		w.now = w.start.Add(time.Duration(h.at))
		h.fn()
		w.check.afterStep()
	}
	if !w.halted && w.now.Before(end) {
		w.now = end
	}
}

// at schedules fn at t (not before now); after, d from now.
func (w *simWorld) at(t time.Time, fn func()) {
	if t.Before(w.now) {
		t = w.now
	}
	w.seq++
	w.queue.push(simHappening{at: int64(t.Sub(w.start)), seq: w.seq, fn: fn})
}

func (w *simWorld) after(d time.Duration, fn func()) { w.at(w.now.Add(d), fn) }

// watchdog wakes the checker now and then, so that a world where nothing
// happens any more is still checked for stuck states.
func (w *simWorld) watchdog() {
	w.after(50*time.Millisecond, w.watchdog)
}

func (w *simWorld) dur(r simRange) time.Duration {
	if r.Max <= r.Min {
		return r.Min
	}
	return r.Min + time.Duration(w.rng.Int64N(int64(r.Max-r.Min)+1))
}

func (w *simWorld) chance(p float64) bool { return p > 0 && !w.quiet && w.rng.Float64() < p }

func (w *simWorld) jitter() time.Duration {
	return time.Duration(w.rng.Int64N(int64(2 * time.Millisecond)))
}

func (w *simWorld) linkDelay() time.Duration {
	d := w.dur(w.cfg.Link)
	if w.chance(w.cfg.LinkSpike) {
		d += time.Duration(w.rng.Int64N(int64(w.cfg.SpikeMax) + 1))
	}
	return d
}

// partitioned reports whether frames between h and the backup are held now,
// and until when.
func (w *simWorld) partitioned(h *simPrimaryHost) (time.Time, bool) {
	if h == nil {
		return time.Time{}, false
	}
	for _, p := range w.parts {
		if p.host == h && !w.now.Before(p.from) && w.now.Before(p.to) {
			return p.to, true
		}
	}
	return time.Time{}, false
}

// mergedPartitions are h's partitions, overlapping ones merged, in order.
func (w *simWorld) mergedPartitions(h *simPrimaryHost) []simPartition {
	var ps []simPartition
	for _, p := range w.parts {
		if p.host == h {
			ps = append(ps, p)
		}
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].from.Before(ps[j].from) })
	var out []simPartition
	for _, p := range ps {
		if n := len(out); n > 0 && !p.from.After(out[n-1].to) {
			out[n-1].to = later(out[n-1].to, p.to)
			continue
		}
		out = append(out, p)
	}
	return out
}

func (w *simWorld) partition(h *simPrimaryHost, d time.Duration) {
	w.logf("net", "partition between %s and the backup for %v", h.name, d)
	w.parts = append(w.parts, simPartition{host: h, from: w.now, to: w.now.Add(d)})
}

func (w *simWorld) elapsed() time.Duration { return w.now.Sub(w.start) }

func (w *simWorld) logf(who, format string, args ...any) {
	if w.trace.off {
		return
	}
	w.trace.add(simTraceLine{at: w.elapsed(), who: who, format: format, args: args})
}

// simHappening is something due at a time; seq keeps ties in the order
// they were scheduled.
type simHappening struct {
	at  int64 // nanoseconds since the start
	seq uint64
	fn  func()
}

// simQueue is a binary min-heap of happenings (typed, to spare the
// boxing of container/heap).
type simQueue []simHappening

func (q simQueue) less(i, j int) bool {
	if q[i].at != q[j].at {
		return q[i].at < q[j].at
	}
	return q[i].seq < q[j].seq
}

func (q *simQueue) push(h simHappening) {
	*q = append(*q, h)
	s := *q
	for i := len(s) - 1; i > 0; {
		p := (i - 1) / 2
		if !s.less(i, p) {
			break
		}
		s[i], s[p] = s[p], s[i]
		i = p
	}
}

func (q *simQueue) pop() simHappening {
	s := *q
	h := s[0]
	n := len(s) - 1
	s[0] = s[n]
	s[n] = simHappening{}
	s = s[:n]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < n && s.less(l, m) {
			m = l
		}
		if r < n && s.less(r, m) {
			m = r
		}
		if m == i {
			break
		}
		s[i], s[m] = s[m], s[i]
		i = m
	}
	*q = s
	return h
}

// simTrace keeps the newest lines of what happened (all of them with
// keepAll), formatted only when shown.
type simTrace struct {
	ring    [200]simTraceLine
	n       int
	keepAll bool
	off     bool // a first pass over many seeds: a failing one is run again
	all     []simTraceLine
}

type simTraceLine struct {
	at     time.Duration
	who    string
	format string
	args   []any
}

func (t *simTrace) add(l simTraceLine) {
	if t.off {
		return
	}
	t.ring[t.n%len(t.ring)] = l
	t.n++
	if t.keepAll {
		t.all = append(t.all, l)
	}
}

// String is the trace: everything with keepAll, else the newest lines.
func (t *simTrace) String() string {
	var lines []simTraceLine
	switch {
	case t.keepAll:
		lines = t.all
	case t.n <= len(t.ring):
		lines = t.ring[:t.n]
	default:
		lines = append(append(lines, t.ring[t.n%len(t.ring):]...), t.ring[:t.n%len(t.ring)]...)
	}
	var b strings.Builder
	if !t.keepAll && t.n > len(t.ring) {
		fmt.Fprintf(&b, "  (the last %d of %d lines)\n", len(t.ring), t.n)
	}
	for _, l := range lines {
		fmt.Fprintf(&b, "  %9.3fs %-9s %s\n", l.at.Seconds(), l.who, fmt.Sprintf(l.format, l.args...))
	}
	return b.String()
}

// ---- connections ----

// simFrameKind is what a frame is, as far as the protocol cares.
type simFrameKind int

const (
	simHelloFrame     simFrameKind = iota
	simHeartbeatFrame              //
	simEpochFrame                  // part of an epoch: pages, device state
	simCommitFrame                 // an epoch's last frame: it completes the epoch
	simAckFrame                    //
	simErrorFrame                  // goodbye, takeover, or the backup's error
	simEOF                         // the stream ends (FIN, RST)
)

type simFrame struct {
	kind    simFrameKind
	epoch   uint64
	code    transport.ErrorCode
	corrupt bool
	readyAt time.Time
}

func (f simFrame) String() string {
	switch f.kind {
	case simHelloFrame:
		return "hello"
	case simHeartbeatFrame:
		return "heartbeat"
	case simEpochFrame, simCommitFrame:
		s := fmt.Sprintf("epoch %d frame", f.epoch)
		if f.kind == simCommitFrame {
			s = fmt.Sprintf("epoch %d commit", f.epoch)
		}
		if f.corrupt {
			s += " (corrupt)"
		}
		return s
	case simAckFrame:
		return fmt.Sprintf("ack %d", f.epoch)
	case simErrorFrame:
		return fmt.Sprintf("error %s", f.code)
	}
	return "EOF"
}

// simConn is one TCP connection to the backup, from a primary session or
// from a stranger (a port scan).
type simConn struct {
	w                   *simWorld
	id                  ConnID
	host                *simPrimaryHost    // the far end's host (nil: a stranger)
	ps                  *simPrimarySession // the primary end (nil: a stranger)
	backupInc           int                // the backup incarnation that accepted it
	toBackup, toPrimary *simPipe           //
	primaryClosed       bool               // the primary end closed it: reads nothing more
	backupClosed        bool               // the backup end closed it
	readerStopped       bool               // the backup's reader quit (corrupt frame)
	helloSeen           bool               // the backup read the primary's hello
	helloSent           bool               // the backup answered it (SendHello)
	backupSession       int                // the backup's session number for it
	openedAt            time.Time          //
	netResetAt          time.Time          // the network reset it (zero: never)
	heardAt             time.Time          // the backup last heard a frame of it (its arrival)
	framesRead          int                // frames the backup's reader read
	lastRecv            time.Time          // when the newest one came (not the first, nor an error)
	goodbyeIn           bool               // a plain goodbye reached the Standby
	appliedOK           uint64             // newest epoch of it the backup applied whole
}

func (w *simWorld) newConn(h *simPrimaryHost, ps *simPrimarySession) *simConn {
	w.nextConn++
	c := &simConn{w: w, id: w.nextConn, host: h, ps: ps, backupInc: w.backup.inc, openedAt: w.now}
	c.toBackup = &simPipe{c: c, toBackup: true}
	c.toPrimary = &simPipe{c: c}
	w.conns[c.id] = c
	w.backup.conns = append(w.backup.conns, c)
	return c
}

// reset is a network fault: the connection breaks with both ends alive.
func (c *simConn) reset() {
	c.w.logf("net", "connection %d reset", c.id)
	c.netResetAt = c.w.now
	c.toBackup.cut(true, true)
	c.toPrimary.cut(true, true)
}

// simPipe is one direction of a connection: a FIFO of frames in flight.
type simPipe struct {
	c        *simConn
	toBackup bool
	q        []simFrame
	last     time.Time // when the newest frame arrives: none arrives before it
	dead     bool      // nothing more goes in
	gen      int       // bumped when the queue is cut: stale deliveries see it
	armed    bool
}

// push sends f: it arrives after the link's delay plus extra, never before
// the frames sent earlier.
func (p *simPipe) push(f simFrame, extra time.Duration) {
	if p.dead {
		return
	}
	w := p.c.w
	at := w.now.Add(w.linkDelay() + extra)
	if at.Before(p.last) {
		at = p.last
	}
	f.readyAt, p.last = at, at
	p.q = append(p.q, f)
	p.arm()
}

// close ends the stream cleanly: what was sent arrives, then the end.
func (p *simPipe) close() {
	p.push(simFrame{kind: simEOF}, 0)
	p.dead = true
}

// cut breaks the stream: a random part of what is in flight still arrives
// (keepSome), the rest is lost; with eof the far end then sees the end,
// BreakNotice later.
func (p *simPipe) cut(keepSome, eof bool) {
	if p.dead {
		return
	}
	w := p.c.w
	keep := 0
	if _, held := w.partitioned(p.c.host); held {
		keepSome = false // nothing got through; no one retransmits now
	}
	if keepSome && len(p.q) > 0 {
		keep = w.rng.IntN(len(p.q) + 1)
	}
	p.q = p.q[:keep]
	p.last = time.Time{}
	if keep > 0 {
		p.last = p.q[keep-1].readyAt
	}
	p.gen++
	p.armed = false
	if eof {
		p.eof(w.dur(w.cfg.BreakNotice))
	}
	p.dead = true
	p.arm()
}

// eof queues the end of the stream d from now, dead or not (a reset that
// comes later).
func (p *simPipe) eof(d time.Duration) {
	w := p.c.w
	at := w.now.Add(d)
	if at.Before(p.last) {
		at = p.last
	}
	p.last = at
	p.q = append(p.q, simFrame{kind: simEOF, readyAt: at})
	p.arm()
}

func (p *simPipe) arm() {
	if p.armed || len(p.q) == 0 {
		return
	}
	p.armed = true
	gen := p.gen
	w := p.c.w
	w.at(p.q[0].readyAt, func() {
		if p.gen != gen {
			return
		}
		p.armed = false
		if len(p.q) == 0 {
			return
		}
		if end, held := w.partitioned(p.c.host); held {
			p.armed = true
			w.at(end, func() {
				if p.gen == gen {
					p.armed = false
					p.arm()
				}
			})
			return
		}
		f := p.q[0]
		p.q = p.q[1:]
		if p.toBackup {
			w.backup.receive(p.c, f)
		} else if p.c.ps != nil {
			p.c.ps.receive(f)
		}
		if p.gen == gen {
			p.arm()
		}
	})
}

// ---- the primary ----

// simPrimaryHost is a primary host: its guest, the agent's relay of the
// guest's output, and the agent.
type simPrimaryHost struct {
	w       *simWorld
	name    string
	alive   bool // the host
	guest   bool // the guest's QEMU runs
	passing bool // the relay lets the guest's output out (while an agent runs)
	// passedBy is the session whose PassThrough let it out (nil: the
	// agent, finding no backup).
	passedBy *simPrimarySession
	agent    *simAgent
	agents   int
	// restartIn: when the agent exits (or now, if it is down), start a
	// new one this long after.
	restartIn  time.Duration
	restartSet bool
	oneSession bool // the agent exits after one session (the second primary)
	dieAt      simDieAt
	sessions   []*simPrimarySession
	ends       []error // how the sessions ended, in order
	// exitErr is how the newest agent's protection loop ended (nil:
	// cleanly, or it is still running, or it was killed).
	exitErr error
	// qemuGoneAt: when the guest's QEMU shows as gone by /proc
	// (GuestGone); a SIGKILLed or crashed QEMU's monitor closes a
	// moment before (QEMUExit).
	qemuGoneAt time.Time
	// The guest's QEMU runs (not stopped by a checkpoint, a freeze or an
	// agent that found it owned elsewhere); with a witness, the host's
	// clock rate, the guard's freezes (the last one at frozeAt) and the
	// times it found the guest owned elsewhere.
	vmRunning      bool
	qmpHungUntil   time.Time // a stuck stop: QEMU's monitor answers nothing before
	guestGoneAt    time.Time // when the guest died (its host, a kill, a crash)
	rate           float64
	freezes        int
	frozeAt        time.Time
	ownedElsewhere int
}

// simDieAt is a point of the epoch cycle at which the host dies.
type simDieAt struct {
	point FaultPoint // "": none
	epoch uint64     // 0: the next one
}

func newSimPrimaryHost(w *simWorld, name string) *simPrimaryHost {
	h := &simPrimaryHost{w: w, name: name, alive: true, guest: true, vmRunning: true}
	if name == "primary" {
		h.rate = w.cfg.ClockRate
	}
	return h
}

// qemuGone is the agent's guestGone: the guest's QEMU shows as gone by
// /proc (the host's agent reads it; a dead host runs no agent).
func (h *simPrimaryHost) qemuGone() bool {
	return !h.guest && !h.w.now.Before(h.qemuGoneAt)
}

// guestDies: the guest's QEMU is gone now, as far as its agent can tell
// (a kill that waited for it: KillGuest, the kill after a failover).
func (h *simPrimaryHost) guestDies() {
	h.guest, h.vmRunning, h.guestGoneAt, h.qemuGoneAt = false, false, h.w.now, h.w.now
}

// live is whether the guest's output reaches the world now.
func (h *simPrimaryHost) live() bool {
	return h.alive && h.guest && h.agent != nil && h.passing
}

// current is the agent's session, nil between sessions.
func (h *simPrimaryHost) current() *simPrimarySession {
	if h.agent == nil {
		return nil
	}
	return h.agent.sess
}

// reached is called at each FaultPoint; the host dies there if asked to.
func (h *simPrimaryHost) reached(at FaultPoint, epoch uint64) bool {
	if h.dieAt.point != at || (h.dieAt.epoch != 0 && h.dieAt.epoch != epoch) {
		return false
	}
	h.w.logf(h.name, "reached %s of epoch %d", at, epoch)
	h.dieAt = simDieAt{}
	h.die(false)
	return true
}

func (h *simPrimaryHost) startAgent() {
	if !h.alive || !h.guest || h.agent != nil {
		return
	}
	h.agents++
	a := &simAgent{host: h, gen: h.agents}
	h.agent, h.exitErr = a, nil
	// A new agent holds the guest's output until a backup answers.
	h.passing = false
	h.w.logf(h.name, "agent %d starts (output held)", a.gen)
	if w := h.w; w.wit != nil {
		// The agent holds the witness lease before anything else.
		a.wit = w.wit.client(h.name, h)
		a.holdLease()
		return
	}
	a.dial(true)
}

// die: the host is gone, its guest with it; its connection goes silent,
// and with rst resets a little later.
func (h *simPrimaryHost) die(rst bool) {
	if !h.alive {
		return
	}
	w := h.w
	w.logf(h.name, "host dies")
	w.check.hostDies(h)
	h.alive = false
	h.guestDies()
	if a := h.agent; a != nil {
		a.dead = true
		h.agent = nil
		if ps := a.sess; ps != nil {
			ps.killed = true
			ps.conn.toBackup.cut(true, false)
			if rst {
				ps.conn.toBackup.eof(w.dur(simRange{50 * time.Millisecond, time.Second}))
			}
		}
	}
}

// crash: the guest's QEMU dies by itself (a crash): the guest runs no
// more, QEMU's monitor closes (a checkpoint's QMP command fails at once),
// and the process shows as gone QEMUExit later. The agent goes on.
func (h *simPrimaryHost) crash() {
	w := h.w
	if !h.alive || !h.guest {
		return
	}
	exit := w.dur(w.cfg.QEMUExit)
	h.guest, h.vmRunning, h.guestGoneAt, h.qemuGoneAt = false, false, w.now, w.now.Add(exit)
	h.qmpHungUntil = time.Time{}
	w.logf(h.name, "the guest's QEMU crashes: its monitor closes; it shows as gone in %v", exit)
	w.check.guestCrashed(h)
	if a := h.agent; a != nil {
		a.gate.lockedUntil = time.Time{}
		if a.sess != nil {
			a.sess.monitorClosed()
		}
	}
}

// sigkill: the agent dies; the kernel closes its connection; the guest
// runs on, its output cut with the relay.
func (h *simPrimaryHost) sigkill() {
	a := h.agent
	if a == nil {
		return
	}
	h.w.logf(h.name, "agent %d killed (SIGKILL)", a.gen)
	a.dead = true
	h.agent = nil
	if ps := a.sess; ps != nil {
		ps.killed, ps.agentKilled = true, true
		ps.conn.toBackup.cut(true, true)
	}
	h.agentExited()
}

// sigterm asks the agent to stop: its session says goodbye.
func (h *simPrimaryHost) sigterm() {
	a := h.agent
	if a == nil {
		return
	}
	h.w.logf(h.name, "agent %d asked to stop (SIGTERM)", a.gen)
	a.stopping = true
	if a.sess != nil {
		a.sess.post(StopRequested{Now: h.w.now, Reason: "SIGTERM"})
		return
	}
	a.exit()
}

func (h *simPrimaryHost) restartAfter(d time.Duration) {
	h.restartIn, h.restartSet = d, true
	if h.agent == nil {
		h.agentExited()
	}
}

func (h *simPrimaryHost) agentExited() {
	if !h.restartSet {
		return
	}
	h.restartSet = false
	h.w.after(h.restartIn, h.startAgent)
}

// simAgent is one run of the primary's agent process (RunPrimary).
type simAgent struct {
	host     *simPrimaryHost
	gen      int
	sess     *simPrimarySession
	stopping bool // SIGTERM: exit once the session ended
	dead     bool
	// redialed: the last session ended and the agent dialed again at
	// once, the output held; if the new one too ends without protecting
	// anything, the output passes and the agent waits Retry.
	redialed bool
	// exitErr: how its protection loop ended (nil: cleanly).
	exitErr error
	// With a witness: its handle, the guard (once the lease is held), the
	// gate, the backup's last acknowledgement (the host's clock) as
	// OnEpoch tells the guard, and why the guard ended the agent
	// (ErrFailedOver: the guest is killed as the agent exits).
	wit      *simWitnessClient
	held     bool // the first Hold succeeded: the relay runs
	started  bool // its start is over: it protects
	guard    *simGuard
	gate     simGate
	lastAck  time.Time
	guardErr error
}

// dial connects to the backup and starts a session. The first attempt
// gives up after the heartbeat timeout (a partition) or at once (a backup
// that is down refuses): then the guest's output passes (no backup
// answers, so none resumes it) and the agent dials again, every Redial,
// until one connects (a dial into a partition connects when it heals).
func (a *simAgent) dial(first bool) {
	h, w := a.host, a.host.w
	if a.dead || a.stopping || h.agent != a || a.sess != nil {
		return
	}
	if end, held := w.partitioned(h); held {
		if first && end.After(w.now.Add(w.cfg.Heartbeat.Timeout)) {
			from := w.now
			w.after(w.cfg.Heartbeat.Timeout, func() {
				if a.dead || a.stopping || h.agent != a || a.sess != nil {
					return
				}
				a.unreachable(fmt.Sprintf("a partition held the agent's first dial from %.3fs for the heartbeat timeout", from.Sub(w.start).Seconds()))
				a.dial(false)
			})
			return
		}
		w.at(end, func() { a.dial(first) })
		return
	}
	if !w.backup.up {
		if first {
			a.unreachable("")
		}
		w.after(w.cfg.Redial, func() { a.dial(false) })
		return
	}
	if h.qemuGone() {
		// The agent's run: QEMU died while it dialed; no session (the
		// backup would drop the epochs it may resume).
		a.exitErr = fmt.Errorf("%w: its QEMU died while the agent dialed the backup", simErrGuestGone)
		w.logf(h.name, "the guest's QEMU is gone: no new session (%v)", a.exitErr)
		a.exit()
		return
	}
	a.sess = newSimPrimarySession(a)
}

// unreachable: the first dial failed; the output passes. netFault names a
// partition that failed it (both hosts up): if the backup resumed the
// guest meanwhile, the two live guests are a network fault, as invariant d
// has it (released), not a violation.
func (a *simAgent) unreachable(netFault string) {
	h, w := a.host, a.host.w
	w.logf(h.name, "backup unreachable: output passes")
	const what = "relay pass-through (backup unreachable)"
	if w.wit != nil {
		h.pass(nil, what)
		return
	}
	h.passing, h.passedBy = true, nil
	if fo := w.check.failover; netFault != "" && fo != nil && fo.lineage == h && fo.excused == "" && h.alive && h.guest {
		w.check.twoGuests(netFault, what+" by the agent after the backup resumed the guest")
		return
	}
	w.check.released(h, nil, what)
}

// simErrGuestGone is the agent's ErrGuestGone (internal/agent): its
// protection loop ends, the guest's QEMU gone.
var simErrGuestGone = errors.New("no guest to protect")

// ended: the session is over; the agent's protection loop ends (the guest
// failed or was handed over, its QEMU is gone, or it was asked to stop)
// and the agent exits, or it dials again at once with the output held (a
// session that ended without the backup's word leaves it held: the backup
// may be alive and about to resume the guest), or, when the session
// before also ended without protecting anything, lets the output pass and
// dials again after Retry.
//
// A guest whose QEMU is gone (killed by the guard, or by a session, or
// crashed) gets no new session, whatever ended this one: the backup would
// drop the epochs it may resume (the loop's guestGone, no grace: a
// checkpoint that failed on QEMU's closed monitor gave it its grace).
func (a *simAgent) ended(err error) {
	h, w := a.host, a.host.w
	ps := a.sess
	protected := ps != nil && ps.released > 0 // OnEpoch was called
	a.sess = nil
	h.ends = append(h.ends, err)
	switch {
	case errors.Is(err, ErrFailedOver), errors.Is(err, ErrHandedOver):
		a.exitErr = err
		a.exit()
		return
	case h.qemuGone():
		a.exitErr = fmt.Errorf("%w: the guest's QEMU is gone (%v)", simErrGuestGone, err)
		w.logf(h.name, "the guest's QEMU is gone: protection ends, no new session (%v)", a.exitErr)
		a.exit()
		return
	case a.stopping:
		a.exitErr = nil
		a.exit()
		return
	case h.oneSession:
		a.exitErr = err
		a.exit()
		return
	}
	if protected {
		a.redialed = false
	}
	if !a.redialed {
		a.redialed = true
		w.logf(h.name, "session ended; dialing again at once (output as it was)")
		w.after(0, func() { a.dial(true) })
		return
	}
	a.redialed = false
	w.logf(h.name, "protection lost: output passes; dialing again after the retry wait")
	h.pass(ps, "relay pass-through (protection lost)")
	w.after(w.dur(w.cfg.Retry), func() { a.dial(true) })
}

func (a *simAgent) exit() {
	h := a.host
	h.w.logf(h.name, "agent %d exits", a.gen)
	a.dead = true
	h.exitErr = a.exitErr
	if h.agent == a {
		h.agent = nil
	}
	if errors.Is(a.guardErr, ErrFailedOver) && h.alive && h.guest {
		// The guard found the backup owning the guest: killGuest.
		h.guestDies()
		h.w.logf(h.name, "guest killed: the backup owns it")
		h.w.check.guardKilled(h, "the primary's guard killed its guest (etcd names the backup owner)")
	}
	h.agentExited()
}

// simPrimarySession is one Session and the driver around it (Primary.Run).
type simPrimarySession struct {
	w     *simWorld
	id    int
	who   string // for the trace
	agent *simAgent
	host  *simPrimaryHost
	s     *Session
	conn  *simConn
	// The loop: actions left to carry out, events waiting, a tick due.
	pending, inbox []any
	tickDue        bool
	timerAt        time.Time
	// The checkpoint under way beside the loop (0: none); ckptGen tells
	// its outcome from that of one cut short (KillGuest).
	checkpointing uint64
	ckptGen       int
	// ending: End came while a checkpoint was under way; the loop waits
	// for it (checkpointing.Wait), then the session ends.
	ending *End
	// lastRecv: when the newest frame came off the link (the reader
	// notes it as it arrives; Tick.Heard).
	lastRecv time.Time
	// The sender: epochs to ship, one at a time.
	sendq               []uint64
	sending, senderDead bool
	killed              bool // its agent or host died under it
	agentKilled         bool // by SIGKILL
	ended               bool // End carried out
	endErr              error
	taken, released     uint64
	saidGoodbye         bool // a plain goodbye was sent
	saidTakeover        bool
	passedAtEnd         bool // its end let the output pass (PassThrough, End)
	// With a witness: epochs released and not yet reported shipped (the
	// release's time on the host's clock), and reported and not yet
	// released: OnEpoch comes once both happened.
	relAt    map[uint64]time.Time
	reported map[uint64]bool
	// For the liveness checks.
	state           SessionState
	since, progress time.Time
}

func newSimPrimarySession(a *simAgent) *simPrimarySession {
	h, w := a.host, a.host.w
	w.sessions++
	ps := &simPrimarySession{w: w, id: w.sessions, agent: a, host: h, since: w.now, progress: w.now}
	ps.who = fmt.Sprintf("%s/s%d", h.name, ps.id)
	ps.conn = w.newConn(h, ps)
	s, acts, err := NewSession(SessionConfig{VMName: "vm1", RAMSize: 1 << 20, Pipeline: w.cfg.Pipeline,
		Heartbeat: w.cfg.Heartbeat, Prepare: w.cfg.Prepare}, w.now)
	if err != nil {
		panic(err)
	}
	ps.s = s
	h.sessions = append(h.sessions, ps)
	w.logf(ps.who, "session on connection %d", ps.conn.id)
	ps.pending = acts
	ps.tickLoop()
	ps.run()
	return ps
}

func (ps *simPrimarySession) gone() bool { return ps.ended || ps.killed }

func (ps *simPrimarySession) tickLoop() {
	ps.w.after(ps.w.cfg.TickEvery+ps.w.jitter(), func() {
		if ps.gone() {
			return
		}
		ps.tickDue = true
		ps.run()
		ps.tickLoop()
	})
}

// post hands the loop an event (stamped by the caller: the driver's
// goroutines stamp what they receive when they receive it).
func (ps *simPrimarySession) post(ev any) {
	if ps.gone() {
		return
	}
	ps.inbox = append(ps.inbox, ev)
	ps.run()
}

// simShipReport is the sender's note that an epoch went out whole:
// statistics, not a Session event (shippedReport).
type simShipReport struct{ epoch uint64 }

// simEventsCap is the capacity of Primary.Run's events channel.
const simEventsCap = 64

// simCheckpointDone is a checkpoint's outcome, posted by its goroutine
// (checkpointDone): the driver's own report, turned into the Session's
// event when the loop takes it.
type simCheckpointDone struct {
	epoch uint64
	kind  simCheckpointKind
	gone  bool // it failed, and GuestGone found QEMU gone
}

// run is the driver's loop: carry out the actions, then take the next
// event, until it has nothing to do or waits in End for a checkpoint.
func (ps *simPrimarySession) run() {
	for !ps.gone() && ps.ending == nil {
		if len(ps.pending) > 0 {
			a := ps.pending[0]
			ps.pending = ps.pending[1:]
			ps.carry(a)
			continue
		}
		ev := ps.next()
		if ev == nil {
			break
		}
		switch r := ev.(type) {
		case simShipReport:
			ps.w.logf(ps.who, "sender reports epoch %d shipped", r.epoch)
			ps.acked(r.epoch, true)
			continue
		case simCheckpointDone:
			ps.checkpointDone(r)
			continue
		}
		ps.step(ev)
	}
	if !ps.gone() && ps.ending == nil {
		ps.armTimer()
	}
}

// next picks what the loop's select would: an event or a tick, at random
// when both are ready. A tick carries the receipt time of the newest frame
// (Tick.Heard), queued or not.
func (ps *simPrimarySession) next() any {
	if ps.tickDue && (len(ps.inbox) == 0 || ps.w.rng.IntN(2) == 0) {
		ps.tickDue = false
		return Tick{Now: ps.w.now, Heard: ps.lastRecv}
	}
	if len(ps.inbox) > 0 {
		ev := ps.inbox[0]
		ps.inbox = ps.inbox[1:]
		return ev
	}
	return nil
}

func (ps *simPrimarySession) armTimer() {
	wake := ps.s.NextWake()
	if wake.IsZero() || wake.Equal(ps.timerAt) {
		return
	}
	ps.timerAt = wake
	ps.w.at(wake, func() {
		if ps.gone() || !ps.timerAt.Equal(wake) {
			return
		}
		ps.tickDue = true
		ps.run()
	})
}

func (ps *simPrimarySession) step(ev any) {
	if _, tick := ev.(Tick); !tick {
		ps.w.logf(ps.who, "← %v", simDesc{ev})
	}
	acts := ps.s.Step(ev)
	ps.pending = append(ps.pending, acts...)
}

// carry carries out one action as Primary.Run's driver does.
func (ps *simPrimarySession) carry(a any) {
	w, h := ps.w, ps.host
	if _, hb := a.(Heartbeat); !hb {
		w.logf(ps.who, "→ %v", simDesc{a})
	}
	switch a := a.(type) {
	case SendHelloToBackup:
		ps.conn.toBackup.push(simFrame{kind: simHelloFrame}, 0)
	case StartPrepare:
		fail := w.chance(w.cfg.PPrepareFail)
		w.after(w.dur(w.cfg.PrepareTime), func() {
			var err error
			if fail {
				err = errors.New("initial disk copy: write failed")
			}
			ps.post(Prepared{Now: w.now, Err: err})
		})
	case TakeCheckpoint:
		ps.takeCheckpoint(a.Epoch)
	case Ship:
		if !ps.senderDead {
			ps.sendq = append(ps.sendq, a.Epoch)
			ps.ship()
		}
	case Release:
		w.check.release(ps, a.Epoch)
		ps.released = a.Epoch
		ps.progress = w.now
		ps.acked(a.Epoch, false)
		h.reached(FaultAcked, a.Epoch)
	case Heartbeat:
		ps.conn.toBackup.push(simFrame{kind: simHeartbeatFrame}, 0)
	case Goodbye:
		code := transport.CodeGoodbye
		if a.TakeOver {
			code = transport.CodeTakeOver
			ps.saidTakeover = true
		} else {
			ps.saidGoodbye = true
		}
		w.check.goodbye(ps, a)
		ps.conn.toBackup.push(simFrame{kind: simErrorFrame, code: code}, 0)
	case KillGuest:
		w.check.killGuest(ps)
		// killGuest returns once QEMU is gone by /proc (waitGone).
		if h.guest {
			h.guestDies()
			w.logf(h.name, "guest killed")
		} else {
			h.qemuGoneAt = earlier(h.qemuGoneAt, w.now)
			w.logf(h.name, "the guest's QEMU is gone already")
		}
		ps.monitorClosed()
	case PassThrough:
		ps.passedAtEnd = ps.s.State() == Ended
		h.pass(ps, "PassThrough")
	case End:
		if n := ps.checkpointing; n != 0 {
			// A checkpoint under way ends first (it resumes the guest):
			// the loop waits, hearing nothing; the sender and the reader
			// go on.
			w.logf(ps.who, "End waits for checkpoint %d", n)
			ps.ending = &a
			return
		}
		ps.end(a)
	}
}

// end ends the session: the link is shut down and the agent told.
func (ps *simPrimarySession) end(a End) {
	ps.ended, ps.endErr, ps.ending = true, a.Err, nil
	ps.conn.primaryClosed = true
	ps.conn.toBackup.close()
	ps.agent.ended(a.Err)
}

// takeCheckpoint pauses the guest and takes the epoch beside the loop,
// which goes on hearing the backup, ticking and heartbeating (the Session
// starts no other checkpoint meanwhile); the outcome is posted to the loop
// like any event.
//
// A guest whose QEMU was killed or crashed cannot be stopped: the QMP stop
// fails at once (the monitor's connection closed), and GuestGone finds
// QEMU gone, at once or once the process shows as gone (its grace).
func (ps *simPrimarySession) takeCheckpoint(n uint64) {
	w, h := ps.w, ps.host
	ps.checkpointing = n
	ps.ckptGen++
	gen := ps.ckptGen
	if !h.guest {
		o := simCheckpoint{kind: simFailClosed, took: time.Millisecond}
		w.after(o.took, func() { ps.checkpointEnds(gen, n, o) })
		return
	}
	o := w.nextCheckpoint()
	ps.agent.stop(o.kind == simFailStuck, o.took)
	if h.dieAt.point == FaultPaused {
		w.after(o.took/2, func() {
			if !ps.gone() && ps.ckptGen == gen {
				h.reached(FaultPaused, n)
			}
		})
	}
	w.after(o.took, func() { ps.checkpointEnds(gen, n, o) })
}

// monitorClosed: the guest's QEMU is gone (killed, or crashed), its
// monitor's connection closed: the QMP command of a checkpoint under way
// fails at once.
func (ps *simPrimarySession) monitorClosed() {
	n := ps.checkpointing
	if n == 0 || ps.gone() {
		return
	}
	ps.ckptGen++
	gen := ps.ckptGen
	ps.w.after(time.Millisecond, func() {
		ps.checkpointEnds(gen, n, simCheckpoint{kind: simFailClosed})
	})
}

// checkpointEnds: checkpoint n's QMP commands are done. A failed one then
// asks GuestGone, which waits up to its grace for QEMU to show as gone
// (guestGoneWait), before the goroutine posts its outcome.
func (ps *simPrimarySession) checkpointEnds(gen int, n uint64, o simCheckpoint) {
	w, h := ps.w, ps.host
	if ps.gone() || gen != ps.ckptGen {
		return
	}
	if o.kind != simFailStuck && o.kind != simFailClosed {
		ps.agent.cont()
	}
	if o.kind != simTaken {
		ps.guestGoneWait(gen, n, o)
		return
	}
	ps.taken = n
	if n == 1 {
		// Output.Hold, in the first pause: also when the session
		// ended meanwhile and let the output pass.
		if h.passing && h.passedBy == ps && ps.passedAtEnd {
			w.logf(h.name, "checkpoint 1 holds the output again after its session's end let it pass")
		}
		h.hold()
	}
	if h.reached(FaultResumed, n) {
		return
	}
	ps.checkpointReport(n, o, false)
}

// guestGoneWait is GuestGone after a failed checkpoint (waitGone with its
// grace): it polls until QEMU shows as gone, or the grace is over (a live
// QEMU: its failure is reported the grace late); the checkpoint is under
// way meanwhile (End waits for it). A KillGuest meanwhile starts the wait
// again (monitorClosed), which finds QEMU gone at once.
func (ps *simPrimarySession) guestGoneWait(gen int, n uint64, o simCheckpoint) {
	w, h := ps.w, ps.host
	deadline := w.now.Add(simGuestGoneGrace)
	var poll func()
	poll = func() {
		if ps.gone() || gen != ps.ckptGen {
			return
		}
		switch {
		case h.qemuGone():
			ps.checkpointReport(n, o, true)
		case w.now.After(deadline):
			ps.checkpointReport(n, o, false)
		default:
			w.after(simGuestGonePoll, poll)
		}
	}
	poll()
}

// checkpointReport: checkpoint n's goroutine posts its outcome (gone:
// GuestGone found QEMU gone) and is done.
func (ps *simPrimarySession) checkpointReport(n uint64, o simCheckpoint, gone bool) {
	w := ps.w
	ps.checkpointing = 0
	if a := ps.ending; a != nil {
		// End waited for it; its outcome is never read. The goroutine
		// posts it first, into the loop's events channel: full of what
		// the reader and the sender posted since the loop stopped
		// reading, the post blocks, and so End (until Run returns).
		if len(ps.inbox) >= simEventsCap {
			w.check.violate("e", "session %d: End waits for checkpoint %d, whose outcome cannot be posted: %d events wait in the loop's channel (capacity %d), unread since End", ps.id, n, len(ps.inbox), simEventsCap)
		}
		w.logf(ps.who, "checkpoint %d done (unread); the session ends", n)
		ps.end(*a)
		return
	}
	ps.post(simCheckpointDone{epoch: n, kind: o.kind, gone: gone})
}

// checkpointDone: the loop takes a checkpoint's outcome. A failed one is
// GuestStuck when its stop got no answer in time, or when GuestGone found
// QEMU gone.
func (ps *simPrimarySession) checkpointDone(r simCheckpointDone) {
	w := ps.w
	if r.kind == simTaken {
		ps.step(CheckpointTaken{Now: w.now, Epoch: r.epoch})
		return
	}
	var err error
	stuck := r.gone
	switch r.kind {
	case simFailRunning:
		err = errors.New("xen-save-devices-state: error")
	case simFailStuck:
		err, stuck = errors.New("stop: context deadline exceeded"), true
	case simFailClosed:
		err = errors.New("stop: qmp: stop: connection closed: EOF")
	}
	if r.gone {
		err = fmt.Errorf("%w (the guest's QEMU is gone)", err)
	}
	ps.step(CheckpointFailed{Now: w.now, Epoch: r.epoch, Err: err, GuestStuck: stuck})
}

// ship runs the sender: it writes the epochs' frames in order, the last
// one of each its commit, and reports a failed write as ShipFailed.
func (ps *simPrimarySession) ship() {
	if ps.sending || len(ps.sendq) == 0 || ps.gone() {
		return
	}
	n := ps.sendq[0]
	ps.sendq = ps.sendq[1:]
	ps.sending = true
	ps.shipFrame(n, 0, 2+ps.w.rng.IntN(2))
}

func (ps *simPrimarySession) shipFrame(n uint64, i, frames int) {
	w, h := ps.w, ps.host
	w.after(w.dur(w.cfg.ShipGap), func() {
		if ps.gone() {
			return
		}
		if ps.conn.toBackup.dead {
			ps.sending, ps.senderDead, ps.sendq = false, true, nil
			ps.post(ShipFailed{Now: w.now, Epoch: n, Err: errors.New("write: connection reset by peer")})
			return
		}
		last := i == frames-1
		f := simFrame{kind: simEpochFrame, epoch: n}
		if last {
			f.kind = simCommitFrame
			if w.script.corrupt > 0 {
				w.script.corrupt--
				f.corrupt = true
			} else {
				f.corrupt = w.chance(w.cfg.PCorrupt)
			}
		}
		ps.conn.toBackup.push(f, 0)
		if i == (frames-1)/2 && !last && h.reached(FaultShipping, n) {
			return
		}
		if !last {
			ps.shipFrame(n, i+1, frames)
			return
		}
		if h.reached(FaultShipped, n) {
			return
		}
		w.after(w.script.reportDelay, func() { ps.post(simShipReport{epoch: n}) })
		ps.sending = false
		ps.ship()
	})
}

// receive is the driver's reader: the backup's frames become events.
func (ps *simPrimarySession) receive(f simFrame) {
	if ps.gone() || ps.conn.primaryClosed {
		return
	}
	now := ps.w.now
	if f.kind != simEOF {
		ps.lastRecv = now
	}
	switch f.kind {
	case simHelloFrame:
		ps.post(BackupMessage{Now: now, Msg: simBackupHello})
	case simAckFrame:
		ps.post(BackupMessage{Now: now, Epoch: f.epoch, Msg: transport.Ack{}})
	case simHeartbeatFrame:
		// The backup's heartbeat carries its committed epoch (in epoch).
		ps.post(BackupMessage{Now: now, Msg: transport.Heartbeat{LastCommitted: f.epoch}})
	case simErrorFrame:
		ps.post(BackupMessage{Now: now, Epoch: f.epoch, Msg: transport.Error{Code: f.code, Message: "from the backup"}})
	case simEOF:
		ps.conn.primaryClosed = true // the reader stops
		ps.post(LinkDown{Now: now, Err: io.EOF})
	}
}

// nextCheckpoint is the simulated QEMU's next checkpoint: scripted, or
// drawn.
func (w *simWorld) nextCheckpoint() simCheckpoint {
	if len(w.script.checkpoints) > 0 {
		o := w.script.checkpoints[0]
		w.script.checkpoints = w.script.checkpoints[1:]
		return o
	}
	switch {
	case w.chance(w.cfg.PFailStuck):
		return simCheckpoint{kind: simFailStuck, took: w.cfg.CommandTimeout}
	case w.chance(w.cfg.PFailRunning):
		return simCheckpoint{kind: simFailRunning, took: w.dur(w.cfg.Pause)}
	case w.chance(w.cfg.PSlowPause):
		return simCheckpoint{kind: simTaken, took: w.dur(w.cfg.SlowPause)}
	}
	return simCheckpoint{kind: simTaken, took: w.dur(w.cfg.Pause)}
}

// ---- the backup ----

// simImage is what the backup's RAM image (and state file) holds: the
// epoch of which session of which incarnation, and whether an apply tore
// it.
type simImage struct {
	inc, session int
	epoch        uint64
	torn         bool
}

// simBackupHost is the backup's agent: the Standby and its driver.
type simBackupHost struct {
	w          *simWorld
	up         bool
	inc        int // incarnation: bumped at each boot
	sb         *Standby
	pending    []any         // the Standby's actions, to carry out in order
	inbox      []simBackupIn // what the readers handed the loop, not taken yet
	deferred   []simBackupIn // taken while an epoch was applied: held until it ends
	tickDue    bool
	applying   *Apply     // the apply under way, beside the loop
	applyDone  *Applied   // its outcome, ready for the loop (applyDone)
	conns      []*simConn // accepted by this incarnation
	session    *simConn   // the newest SendHello's connection
	sessions   int        // SendHellos so far: session numbers
	image      simImage
	failedOver bool
	failover   FailOver
	// With a witness: its handle, a claim under way beside the loop, and
	// its outcome, ready for the loop.
	wit       *simWitnessClient
	claiming  bool
	claimDone *ClaimDone
	// For the liveness checks.
	state StandbyState
	since time.Time
}

// simBackupIn is what a connection's reader hands the backup's loop (a
// backupEvent): a frame of c, or a stranger's event (ev: HelloIn,
// FrameHeard, ConnClosed), stamped with its arrival.
type simBackupIn struct {
	at time.Time
	c  *simConn
	f  simFrame
	ev any
}

// simTakeoverFailOver marks a FailOver that a takeover goodbye caused.
type simTakeoverFailOver struct{ FailOver }

func newSimBackupHost(w *simWorld) *simBackupHost { return &simBackupHost{w: w} }

func (b *simBackupHost) boot() {
	w := b.w
	sb, err := NewStandby(StandbyConfig{VMName: "vm1", Heartbeat: w.cfg.Heartbeat, Witness: w.wit != nil})
	if err != nil {
		panic(err)
	}
	if w.wit != nil {
		b.wit = w.wit.client("backup", nil)
	}
	b.claiming, b.claimDone = false, nil
	b.up, b.sb, b.session, b.conns = true, sb, nil, nil
	b.pending, b.inbox, b.deferred, b.tickDue = nil, nil, nil, false
	b.applying, b.applyDone = nil, nil
	b.inc++
	b.state, b.since = Waiting, w.now
	w.logf("backup", "agent starts (incarnation %d)", b.inc)
	b.tickLoop(b.inc)
}

// crash: the backup's agent dies; the kernel resets its connections.
func (b *simBackupHost) crash() {
	if !b.up {
		return
	}
	w := b.w
	w.logf("backup", "agent dies")
	b.up = false
	w.check.backupCrashed()
	for _, c := range b.conns {
		c.backupClosed = true
		c.toPrimary.cut(true, true)
		c.toBackup.dead = true
	}
	b.conns = nil
}

func (b *simBackupHost) tickLoop(inc int) {
	b.w.after(b.w.cfg.TickEvery+b.w.jitter(), func() {
		if !b.up || b.inc != inc {
			return
		}
		b.tickDue = true
		b.run()
		b.tickLoop(inc)
	})
}

// receive: a frame arrived on c; the reader notes when (lastRecv, for
// Tick.Heard: not the first frame, nor an error) and hands it to the loop.
func (b *simBackupHost) receive(c *simConn, f simFrame) {
	if !b.up || c.backupInc != b.inc || c.backupClosed || c.readerStopped {
		return
	}
	c.framesRead++
	if f.kind == simEOF || (f.corrupt && c.helloSeen) {
		c.readerStopped = true
	} else if c.framesRead > 1 {
		c.lastRecv = b.w.now
	}
	b.inbox = append(b.inbox, simBackupIn{at: b.w.now, c: c, f: f})
	b.run()
}

// stranger: a connection that is no session does something (a scan).
func (b *simBackupHost) stranger(ev any) {
	if !b.up {
		return
	}
	b.inbox = append(b.inbox, simBackupIn{at: b.w.now, ev: ev})
	b.run()
}

// run is Backup.loop: carry out the actions, replay what was held once
// no apply runs, then take what its select would (a tick, a reader's
// event, the apply's end), at random among those ready.
func (b *simBackupHost) run() {
	w := b.w
	for b.up {
		if len(b.pending) > 0 {
			a := b.pending[0]
			b.pending = b.pending[1:]
			b.carry(a)
			continue
		}
		if b.applying == nil && !b.claiming && len(b.deferred) > 0 {
			in := b.deferred[0]
			b.deferred = b.deferred[1:]
			b.take(in)
			continue
		}
		var ready [4]int
		n := 0
		if b.tickDue {
			ready[n], n = 0, n+1
		}
		if len(b.inbox) > 0 {
			ready[n], n = 1, n+1
		}
		if b.applyDone != nil {
			ready[n], n = 2, n+1
		}
		if b.claimDone != nil {
			ready[n], n = 3, n+1
		}
		if n == 0 {
			break
		}
		pick := ready[0]
		if n > 1 {
			pick = ready[w.rng.IntN(n)]
		}
		switch pick {
		case 0:
			b.tickDue = false
			// Frames still queued count as heard when they came.
			var heard time.Time
			if id := b.sb.Session(); id != 0 {
				if c := w.conns[id]; c != nil && !c.backupClosed {
					heard = c.lastRecv
				}
			}
			b.step(Tick{Now: w.now, Heard: heard})
		case 1:
			in := b.inbox[0]
			b.inbox = b.inbox[1:]
			b.handle(in)
		case 2:
			a := *b.applyDone
			b.applyDone, b.applying = nil, nil
			a.Now = w.now
			b.step(a)
		case 3:
			c := *b.claimDone
			b.claimDone, b.claiming = nil, false
			c.Now = w.now
			b.step(c)
		}
	}
}

// handle takes what a reader delivered, as Backup.handle does: held while
// an epoch is applied or the witness claimed (a session's frame counted as
// heard when it came), else taken at once.
func (b *simBackupHost) handle(in simBackupIn) {
	if b.applying != nil || b.claiming || len(b.deferred) > 0 {
		if c := in.c; c != nil && c.helloSent && !c.backupClosed && in.f.kind != simEOF && !in.f.corrupt {
			c.heardAt = in.at
			b.step(FrameHeard{Now: in.at, Conn: c.id})
		}
		b.deferred = append(b.deferred, in)
		return
	}
	b.take(in)
}

// take turns what the reader delivered into the Standby's events, stamped
// with its arrival, as Backup.event does.
func (b *simBackupHost) take(in simBackupIn) {
	now := in.at
	if in.c == nil {
		switch e := in.ev.(type) {
		case HelloIn:
			e.Now = now
			b.step(e)
		case FrameHeard:
			e.Now = now
			b.step(e)
		case ConnClosed:
			e.Now = now
			b.step(e)
		}
		return
	}
	c, f := in.c, in.f
	if c.backupClosed {
		return
	}
	if !c.helloSeen {
		if f.kind != simHelloFrame {
			// Closed (or reset) before its hello: no session, no event.
			b.closeConn(c)
			return
		}
		c.helloSeen = true
		b.step(HelloIn{Now: now, Conn: c.id, Hello: simPrimaryHello})
		return
	}
	c.heardAt = later(c.heardAt, now)
	switch f.kind {
	case simEOF:
		b.step(ConnClosed{Now: now, Conn: c.id, Err: io.EOF})
	case simHeartbeatFrame:
		b.step(FrameHeard{Now: now, Conn: c.id})
	case simEpochFrame, simCommitFrame:
		if f.corrupt {
			b.step(EpochRejected{Now: now, Conn: c.id, Epoch: f.epoch, Err: transport.ErrCorrupt})
			return
		}
		b.step(FrameHeard{Now: now, Conn: c.id})
		if f.kind == simCommitFrame {
			b.step(EpochStaged{Now: now, Conn: c.id, Epoch: f.epoch})
		}
	case simErrorFrame:
		b.step(FrameHeard{Now: now, Conn: c.id})
		b.step(GoodbyeIn{Now: now, Conn: c.id, TakeOver: f.code == transport.CodeTakeOver, Reason: f.code.String()})
	}
}

func (b *simBackupHost) step(ev any) {
	w := b.w
	if _, tick := ev.(Tick); !tick {
		w.logf("backup", "← %v", simDesc{ev})
	}
	if g, ok := ev.(GoodbyeIn); ok && !g.TakeOver && b.sb.Session() == g.Conn && g.Conn != 0 {
		w.conns[g.Conn].goodbyeIn = true
	}
	acts := b.sb.Step(ev)
	if g, ok := ev.(GoodbyeIn); ok && g.TakeOver {
		for i, a := range acts {
			if f, ok := a.(FailOver); ok {
				acts[i] = simTakeoverFailOver{f}
			}
		}
	}
	b.pending = append(b.pending, acts...)
}

// carry carries out one of the Standby's actions as Backup.do does.
func (b *simBackupHost) carry(a any) {
	w := b.w
	if _, hb := a.(SendHeartbeat); !hb {
		w.logf("backup", "→ %v", simDesc{a})
	}
	switch a := a.(type) {
	case SendHello:
		c := w.conns[a.Conn]
		b.sessions++
		c.helloSent, c.backupSession, c.heardAt = true, b.sessions, w.now
		b.session = c
		w.check.sessionOpened(c)
		extra := w.script.helloDelay
		w.script.helloDelay = 0
		c.toPrimary.push(simFrame{kind: simHelloFrame}, extra)
	case Reject:
		c := w.conns[a.Conn]
		if c == nil {
			return // a stranger: nothing to tell
		}
		w.check.backupRejects(b, c)
		if !c.backupClosed {
			c.toPrimary.push(simFrame{kind: simErrorFrame, epoch: a.Epoch, code: a.Code}, 0)
			b.closeConn(c)
		}
	case CloseConn:
		if c := w.conns[a.Conn]; c != nil {
			b.closeConn(c)
		}
	case Apply:
		b.apply(a)
	case SendAck:
		c := w.conns[a.Conn]
		w.check.backupSends(c, "an ack")
		if w.script.loseAcks > 0 || w.chance(w.cfg.PLoseAck) {
			if w.script.loseAcks > 0 {
				w.script.loseAcks--
			}
			w.lostAcks++
			w.logf("net", "ack %d lost", a.Epoch)
			return
		}
		c.toPrimary.push(simFrame{kind: simAckFrame, epoch: a.Epoch}, w.script.ackDelay)
	case SendHeartbeat:
		c := w.conns[a.Conn]
		w.check.backupSends(c, "a heartbeat")
		c.toPrimary.push(simFrame{kind: simHeartbeatFrame, epoch: a.Committed}, 0)
	case SendGoodbye:
		c := w.conns[a.Conn]
		w.check.backupSends(c, "a goodbye")
		c.toPrimary.push(simFrame{kind: simErrorFrame, code: transport.CodeGoodbye}, 0)
	case Claim:
		b.claim(a)
	case FailOver:
		w.check.failOver(b, a, false)
		b.failedOver, b.failover = true, a
		if w.wit != nil {
			b.keepLease()
		}
	case simTakeoverFailOver:
		w.check.failOver(b, a.FailOver, true)
		b.failedOver, b.failover = true, a.FailOver
		if w.wit != nil {
			b.keepLease()
		}
	}
}

func (b *simBackupHost) closeConn(c *simConn) {
	if c.backupClosed {
		return
	}
	c.backupClosed = true
	if c.ps != nil {
		c.toPrimary.close()
	}
}

// apply writes the staged epoch into the image beside the loop, which
// goes on ticking (the Standby heartbeats but judges no silence) and holds
// what arrives; its outcome reaches the loop as Applied.
func (b *simBackupHost) apply(a Apply) {
	w := b.w
	c := w.conns[a.Conn]
	w.check.apply(b, c, a.Epoch)
	took := w.dur(w.cfg.Apply)
	switch {
	case w.script.applySlow > 0:
		took = w.script.applySlow
	case w.chance(w.cfg.PSlowApply):
		took = w.dur(w.cfg.SlowApply)
	}
	fail := w.script.applyFails > 0 || w.chance(w.cfg.PApplyFail)
	if w.script.applyFails > 0 {
		w.script.applyFails--
	}
	b.applying = &a
	inc := b.inc
	w.after(took, func() {
		if !b.up || b.inc != inc {
			return
		}
		done := &Applied{Conn: a.Conn, Epoch: a.Epoch}
		if fail {
			b.image.torn = true
			done.Err = errors.New("device state: no space left on device")
		} else {
			b.image = simImage{inc: b.inc, session: c.backupSession, epoch: a.Epoch}
			c.appliedOK = a.Epoch
		}
		b.applyDone = done
		b.run()
	})
}

// scan: a stranger connects, is heard, perhaps says a wrong hello, and
// goes.
func (w *simWorld) scan(vm string) {
	if !w.backup.up {
		return
	}
	w.nextConn++
	id := w.nextConn
	w.logf("net", "connection %d from a stranger (%s)", id, map[bool]string{true: "hello for " + vm, false: "port scan"}[vm != ""])
	w.backup.stranger(FrameHeard{Conn: id})
	if vm != "" {
		h := simPrimaryHello
		h.VMName = vm
		w.after(time.Millisecond, func() { w.backup.stranger(HelloIn{Conn: id, Hello: h}) })
	} else if w.rng.IntN(2) == 0 {
		h := simPrimaryHello
		h.Role = transport.RoleBackup
		w.after(time.Millisecond, func() { w.backup.stranger(HelloIn{Conn: id, Hello: h}) })
	}
	w.after(2*time.Millisecond+w.jitter(), func() {
		w.backup.stranger(FrameHeard{Conn: id})
		w.backup.stranger(ConnClosed{Conn: id, Err: errors.New("garbage")})
	})
}

// secondPrimary: another host claiming vm1 connects; its agent makes one
// session and is stopped after d.
func (w *simWorld) secondPrimary(d time.Duration) {
	if w.second != nil {
		return
	}
	h := newSimPrimaryHost(w, "second")
	h.oneSession = true
	w.second = h
	h.startAgent()
	w.after(d, h.sigterm)
}

// simDesc shows an event or action in the trace, formatted only when the
// trace is shown.
type simDesc struct{ v any }

func (d simDesc) String() string { return simDescribe(d.v) }

// simDescribe is an event or action for the trace.
func simDescribe(v any) string {
	switch v := v.(type) {
	case BackupMessage:
		if v.Epoch != 0 {
			return fmt.Sprintf("%s %d", v.Msg.Type(), v.Epoch)
		}
		if e, ok := v.Msg.(transport.Error); ok {
			return fmt.Sprintf("error %s", e.Code)
		}
		return v.Msg.Type().String()
	case HelloIn:
		return fmt.Sprintf("HelloIn conn=%d vm=%s role=%s", v.Conn, v.Hello.VMName, v.Hello.Role)
	case FrameHeard:
		return fmt.Sprintf("FrameHeard conn=%d", v.Conn)
	case ConnClosed:
		return fmt.Sprintf("ConnClosed conn=%d", v.Conn)
	case EpochStaged:
		return fmt.Sprintf("EpochStaged conn=%d epoch=%d", v.Conn, v.Epoch)
	case EpochRejected:
		return fmt.Sprintf("EpochRejected conn=%d epoch=%d", v.Conn, v.Epoch)
	case Applied:
		return fmt.Sprintf("Applied conn=%d epoch=%d err=%v", v.Conn, v.Epoch, v.Err)
	case GoodbyeIn:
		return fmt.Sprintf("GoodbyeIn conn=%d takeover=%v", v.Conn, v.TakeOver)
	case FailOver:
		return fmt.Sprintf("FailOver epoch=%d (last heard %v before)", v.Epoch, v.Declared.Sub(v.LastHeard))
	case simTakeoverFailOver:
		return "(takeover) " + simDescribe(v.FailOver)
	case Reject:
		return fmt.Sprintf("Reject conn=%d %s: %v", v.Conn, v.Code, v.Err)
	case CloseConn:
		return fmt.Sprintf("CloseConn conn=%d", v.Conn)
	case Note:
		return "Note: " + v.Msg
	case End:
		return fmt.Sprintf("End: %v", v.Err)
	case TakeCheckpoint:
		return fmt.Sprintf("TakeCheckpoint %d", v.Epoch)
	case CheckpointTaken:
		return fmt.Sprintf("CheckpointTaken %d", v.Epoch)
	case CheckpointFailed:
		return fmt.Sprintf("CheckpointFailed %d stuck=%v: %v", v.Epoch, v.GuestStuck, v.Err)
	case Ship:
		return fmt.Sprintf("Ship %d", v.Epoch)
	case ShipFailed:
		return fmt.Sprintf("ShipFailed %d: %v", v.Epoch, v.Err)
	case Release:
		return fmt.Sprintf("Release %d", v.Epoch)
	case Goodbye:
		return fmt.Sprintf("Goodbye takeover=%v: %s", v.TakeOver, v.Reason)
	case KillGuest:
		return "KillGuest: " + v.Reason
	case LinkDown:
		return fmt.Sprintf("LinkDown: %v", v.Err)
	case Prepared:
		return fmt.Sprintf("Prepared err=%v", v.Err)
	case StopRequested:
		return "StopRequested: " + v.Reason
	case SendAck:
		return fmt.Sprintf("SendAck conn=%d epoch=%d", v.Conn, v.Epoch)
	case Apply:
		return fmt.Sprintf("Apply conn=%d epoch=%d", v.Conn, v.Epoch)
	case Claim:
		return fmt.Sprintf("Claim epoch=%d retry=%v", v.Epoch, v.Retry)
	case ClaimDone:
		return fmt.Sprintf("ClaimDone held=%v err=%v", v.Held, v.Err)
	}
	s := fmt.Sprintf("%T%+v", v, v)
	return strings.TrimPrefix(s, "checkpoint.")
}

package checkpoint

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/witness"
)

var (
	simSeedFlag  = flag.Uint64("sim.seed", 0, "TestSimRandomized: run this seed only, with its whole trace")
	simSeedsFlag = flag.Int("sim.seeds", 10000, "TestSimRandomized: how many seeds to run")
	simTraceFlag = flag.Bool("sim.trace", false, "print the whole trace of a seed or scenario run (with -v)")
	simWideFlag  = flag.Bool("sim.wide", false, "TestSimRandomized: also draw pauses and applies longer than the heartbeat timeout, the agents' real 10 s command timeout, and killed QEMUs that take up to 250 ms to show as gone")
)

// TestSimRandomized runs the simulation with random faults, one seed a run
// (-sim.seeds of them, 10,000 by default; a tenth with -short), and fails
// with each failing seed's violations and the end of its trace. The even
// seeds run with the witness, and its faults besides (partitions between a
// host and etcd, etcd down, the primary isolated from both). Replay a seed
// with its whole trace:
//
//	go test -run 'TestSimRandomized/seed=1234' -v ./checkpoint/
//	go test -run TestSimRandomized -v ./checkpoint/ -sim.seed=1234
//
// (REMUS_SIM_SEED=1234 does the same.)
func TestSimRandomized(t *testing.T) {
	if seed := simOneSeed(); seed != 0 {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			w := simRandomRun(seed, *simWideFlag, true)
			t.Logf("seed %d: %s\ntrace:\n%s", seed, simSummary(w), w.trace)
			for _, v := range w.check.violations {
				t.Errorf("%v", v)
			}
		})
		return
	}
	n := *simSeedsFlag
	if testing.Short() {
		n /= 10
	}
	// The runs make much short-lived garbage: trade memory for less GC.
	defer debug.SetGCPercent(debug.SetGCPercent(2000))
	start := time.Now()
	var (
		mu       sync.Mutex
		failures = map[uint64][]simViolation{}
		known    = map[string][]uint64{}
		stats    simStats
	)
	seeds := make(chan uint64)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seed := range seeds {
				w := simRandomRunTraced(seed, *simWideFlag, false, true)
				mu.Lock()
				stats.add(w)
				if bug, ok := simKnown(w); ok {
					known[bug] = append(known[bug], seed)
				} else if len(w.check.violations) > 0 {
					failures[seed] = w.check.violations
				}
				mu.Unlock()
			}
		}()
	}
	for seed := uint64(1); seed <= uint64(n); seed++ {
		seeds <- seed
	}
	close(seeds)
	wg.Wait()
	t.Logf("%d seeds in %v: %s", n, time.Since(start).Round(time.Millisecond), stats)
	for _, b := range simKnownBugs {
		if seeds := known[b.name]; len(seeds) > 0 {
			sort.Slice(seeds, func(i, j int) bool { return seeds[i] < seeds[j] })
			t.Logf("known bug %s (%s) hit by %d seeds, e.g. %v", b.name, b.script, len(seeds), simFirst(seeds, 5))
		}
	}

	failed := make([]uint64, 0, len(failures))
	for seed := range failures {
		failed = append(failed, seed)
	}
	sort.Slice(failed, func(i, j int) bool { return failed[i] < failed[j] })
	if len(failed) == 0 {
		return
	}
	byInv := map[string]int{}
	for _, vs := range failures {
		for _, v := range vs {
			byInv[v.inv]++
		}
	}
	t.Errorf("%d of %d seeds broke an invariant (violations by invariant: %v); seeds: %v", len(failed), n, byInv, simFirst(failed, 30))
	for _, seed := range simFirst(failed, 3) {
		w := simRandomRun(seed, *simWideFlag, false)
		var b strings.Builder
		for _, v := range w.check.violations {
			fmt.Fprintf(&b, "  %v\n", v)
		}
		t.Errorf("seed %d (replay: go test -run 'TestSimRandomized/seed=%d' -v ./checkpoint/): %s\n%s%s",
			seed, seed, simSummary(w), b.String(), w.trace)
	}
}

// simKnownBugs are the bugs the simulation found that are not fixed yet,
// each reproduced by a script under testdata/sim (known-bug). A seed whose
// every violation is one of them is counted and logged, not failed: the
// scripts keep them visible, and a new bug still fails the test.
var simKnownBugs = []struct {
	name, script string
	match        func(w *simWorld, v simViolation) bool
}{}

// simKnown names the known bug behind w's violations, if every one is of
// it.
func simKnown(w *simWorld) (string, bool) {
	vs := w.check.violations
	if len(vs) == 0 {
		return "", false
	}
	for _, b := range simKnownBugs {
		all := true
		for _, v := range vs {
			if !b.match(w, v) {
				all = false
				break
			}
		}
		if all {
			return b.name, true
		}
	}
	return "", false
}

// simOneSeed is the seed asked for by -sim.seed, REMUS_SIM_SEED, or a -run
// pattern naming TestSimRandomized/seed=N; 0 if none.
func simOneSeed() uint64 {
	if *simSeedFlag != 0 {
		return *simSeedFlag
	}
	if s, err := strconv.ParseUint(os.Getenv("REMUS_SIM_SEED"), 10, 64); err == nil {
		return s
	}
	if f := flag.Lookup("test.run"); f != nil {
		if m := regexp.MustCompile(`TestSimRandomized/seed=(\d+)`).FindStringSubmatch(f.Value.String()); m != nil {
			s, _ := strconv.ParseUint(m[1], 10, 64)
			return s
		}
	}
	return 0
}

func simFirst(s []uint64, n int) []uint64 { return s[:min(n, len(s))] }

// simRandomRun runs one seed: a random configuration, a random schedule
// of faults in the first 0.4 to 1.6 seconds (with a witness, the witness's
// faults last up to 3 s more), then 1.4 s of quiet, and at the end the
// check that the system settled.
func simRandomRun(seed uint64, wide, keepTrace bool) *simWorld {
	return simRandomRunTraced(seed, wide, keepTrace, false)
}

// simRandomRunTraced is simRandomRun, without any trace when untraced.
func simRandomRunTraced(seed uint64, wide, keepTrace, untraced bool) *simWorld {
	pr := rand.New(rand.NewPCG(seed, 0xfa17))
	cfg := simDefaults()
	cfg.Prepare = pr.IntN(3) == 0
	cfg.Pipeline.MaxInFlight = 1 + pr.IntN(3)
	cfg.Pipeline.Interval = []time.Duration{10 * time.Millisecond, 25 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 50 * time.Millisecond}[pr.IntN(5)]
	cfg.Retry = simRange{20 * time.Millisecond, time.Second} // the agents' default is 1 s
	cfg.LinkSpike = []float64{0, 0.01, 0.05}[pr.IntN(3)]
	cfg.Pipeline.MinRun = []float64{-1, 0.5, DefaultMinRun}[pr.IntN(3)]
	on := func(p float64) float64 {
		if pr.IntN(2) == 0 {
			return 0
		}
		return p
	}
	cfg.PFailRunning, cfg.PFailStuck, cfg.PSlowPause = on(0.01), on(0.005), on(0.02)
	cfg.PApplyFail, cfg.PSlowApply = on(0.005), on(0.02)
	cfg.PCorrupt, cfg.PLoseAck, cfg.PPrepareFail = on(0.005), on(0.002), on(0.1)
	witnessed := seed%2 == 0
	if witnessed {
		// Every other seed runs with the witness, the primary host's
		// clock slower than etcd's by up to witness.ClockRate or faster
		// (in a quarter of the runs exactly that much slower, the worst
		// the guard allows for; in a quarter at etcd's rate).
		wr := rand.New(rand.NewPCG(seed, 0x1ea5e))
		cfg.Witness = true
		switch wr.IntN(4) {
		case 0:
			cfg.ClockRate = witness.ClockRate
		case 1:
		default:
			cfg.ClockRate = (2*wr.Float64() - 1) * witness.ClockRate
		}
		// The primary agent's start after its Hold: quick, or in a
		// quarter of the runs now and then slow (a slow QMP, network or
		// disk set-up).
		cfg.AgentSetup = simRange{time.Millisecond, 50 * time.Millisecond}
		if wr.IntN(4) == 0 {
			cfg.PSlowSetup = 0.3
		}
		if wr.IntN(8) == 0 {
			// A slow etcd (or a long way to it): a round trip takes up
			// to 400 ms, near the renewals' bound (TTL/4).
			cfg.WitnessLink = simRange{time.Millisecond, 200 * time.Millisecond}
		}
	}
	if wide {
		cfg.CommandTimeout = 10 * time.Second
		cfg.SlowPause = simRange{20 * time.Millisecond, time.Second}
		cfg.SlowApply = simRange{20 * time.Millisecond, time.Second}
		// Within GuestGone's grace (300 ms).
		cfg.QEMUExit = simRange{time.Millisecond, 250 * time.Millisecond}
	}

	w := newSimWorld(seed, cfg, keepTrace)
	w.trace.off = untraced
	w.begin()
	faultsEnd := 400*time.Millisecond + time.Duration(pr.Int64N(int64(1200*time.Millisecond)))
	settle := faultsEnd // faults and their effects (partitions, restarts) end by then
	at := func() time.Duration {
		return 50*time.Millisecond + time.Duration(pr.Int64N(int64(faultsEnd-50*time.Millisecond)))
	}
	d := func(lo, hi time.Duration) time.Duration { return lo + time.Duration(pr.Int64N(int64(hi-lo)+1)) }
	h := w.primary
	kinds := 16
	if witnessed {
		kinds = 22 // and the witness's faults
	}
	for range pr.IntN(5) {
		when := at()
		switch k := pr.IntN(kinds); {
		case k < 1:
			rst := pr.IntN(3) == 0
			w.after(when, func() { h.die(rst) })
		case k < 3:
			back := d(20*time.Millisecond, 1500*time.Millisecond)
			settle = max(settle, when+back)
			w.after(when, func() { h.sigkill(); h.restartAfter(back) })
		case k < 5:
			back := d(20*time.Millisecond, time.Second)
			settle = max(settle, when+back+cfg.Heartbeat.Timeout)
			w.after(when, func() { h.sigterm(); h.restartAfter(back) })
		case k < 7:
			long := d(10*time.Millisecond, 1500*time.Millisecond)
			settle = max(settle, when+long)
			w.after(when, func() { w.partition(h, long) })
		case k < 9:
			w.after(when, func() {
				if ps := h.current(); ps != nil {
					ps.conn.reset()
				}
			})
		case k < 10:
			down := d(0, 500*time.Millisecond)
			settle = max(settle, when+down)
			w.after(when, func() {
				if w.backup.up && !w.backup.failedOver {
					w.backup.crash()
					w.after(down, w.backup.boot)
				}
			})
		case k < 12:
			w.after(when, func() { w.scan("") })
		case k < 13:
			w.after(when, func() { w.scan("vm2") })
		case k < 14:
			stay := d(50*time.Millisecond, 500*time.Millisecond)
			settle = max(settle, when+stay+cfg.Heartbeat.Timeout)
			w.after(when, func() {
				// A second host that claims the VM before the primary
				// first held the witness owns it: a misconfiguration
				// the witness cannot tell from a primary.
				if w.wit == nil || w.wit.owner != "" {
					w.secondPrimary(stay)
				}
			})
		case k < 16:
			// A quiet slot: fewer faults on average.
		default:
			// Settling after it may take a claim that got no
			// answer (its bound), the wait before the next (during
			// which the backup opens no session) and the primary's
			// retry wait: a TTL covers them.
			long := d(10*time.Millisecond, 3*time.Second)
			settle = max(settle, when+long+w.wit.ttl)
			lose := pr.IntN(2) == 0
			switch k {
			case 16, 17:
				w.after(when, func() { w.wit.partition("primary", long, lose) })
			case 18:
				w.after(when, func() { w.wit.partition("backup", long, lose) })
			case 19:
				w.after(when, func() { w.wit.down(long) })
			default:
				w.after(when, func() { w.isolate(h, long, lose) })
			}
		}
	}
	w.runFor(settle)
	// With a witness, an agent still taking the lease (a Hold lost to a
	// fault is tried again after its bound and TTL/2) or starting slowly
	// protects once that is over: the quiet time starts then.
	for i := 0; w.wit != nil && i < 100 && !w.halted; i++ {
		if a := h.agent; a == nil || a.started || !h.alive {
			break
		}
		w.runFor(50 * time.Millisecond)
	}
	w.quiet = true
	w.logf("sim", "faults over; settling")
	w.runFor(1400*time.Millisecond + w.minRunSlack())
	if !w.halted {
		w.checkSettled()
	}
	return w
}

// minRunSlack is the longest wait the minimum run fraction imposes after a
// pause: the guest runs its share after the longest pause drawn.
func (w *simWorld) minRunSlack() time.Duration {
	return w.cfg.Pipeline.MinRunAfter(max(w.cfg.SlowPause.Max, w.cfg.Pause.Max))
}

// checkSettled: after the faults stop, the system settles.
//
// (e) Once the faults are over (partitions healed, agents back), the guest
// is protected again — the primary's session is protecting and releasing
// epochs — or the backup runs it and the primary's copy is gone (its host
// dead, or killed when its agent came back and heard of the failover), or
// the primary's host died with nothing the backup could resume.
func (w *simWorld) checkSettled() {
	h, b := w.primary, w.backup
	switch {
	case b.failedOver && w.wit != nil:
		// The primary's copy was killed, or stopped by an agent that
		// found the guest owned elsewhere.
		if h.alive && h.guest && h.vmRunning {
			w.check.violate("e", "the backup failed over (%s) and the primary's guest still runs at the end (agent %v)", w.check.failover.why, h.agent != nil)
		}
	case b.failedOver:
		if h.alive && h.guest {
			w.check.violate("e", "the backup failed over (%s) and the primary's guest still runs at the end (agent %v)", w.check.failover.why, h.agent != nil)
		}
	case !h.alive || !h.guest:
		// The guest is gone; the expected failovers were checked.
	default:
		ps := h.current()
		switch {
		case ps == nil:
			w.check.violate("e", "protection not restored: no session at the end")
		case ps.s.State() != Running || w.now.Sub(ps.progress) > w.cfg.Heartbeat.Timeout+w.minRunSlack():
			w.check.violate("e", "protection not restored: session %d is %v, its last release %v ago", ps.id, ps.s.State(), w.now.Sub(ps.progress))
		case w.wit != nil && !h.vmRunning && !ps.agent.gate.loopPaused:
			w.check.violate("e", "protection restored, but the guest is left stopped (the guard froze it %d times, the last at %.3fs)", h.freezes, h.frozeAt.Sub(w.start).Seconds())
		}
	}
}

// simStats sums up many runs.
type simStats struct {
	runs, failovers, takeovers, splitBrains, sessions, hostDeaths int
	// With a witness: runs, their failovers, the runs where the guard
	// froze the guest, and where an agent found it owned elsewhere.
	witnessRuns, witnessFailovers, freezeRuns, ownedElsewhere int
	simulated                                                 time.Duration
}

func (s *simStats) add(w *simWorld) {
	s.runs++
	s.simulated += w.elapsed()
	s.sessions += w.sessions
	if w.backup.failedOver {
		s.failovers++
		if strings.Contains(w.check.failover.why, "handed over") {
			s.takeovers++
		}
	}
	if len(w.check.splitBrains) > 0 {
		s.splitBrains++
	}
	if !w.primary.alive {
		s.hostDeaths++
	}
	if w.wit != nil {
		s.witnessRuns++
		if w.backup.failedOver {
			s.witnessFailovers++
		}
		if w.primary.freezes > 0 {
			s.freezeRuns++
		}
		if w.primary.ownedElsewhere > 0 {
			s.ownedElsewhere++
		}
	}
}

func (s simStats) String() string {
	return fmt.Sprintf("%v simulated, %d primary sessions, %d failovers (%d handovers), %d host deaths, %d runs with two live guests excused as network faults; "+
		"%d runs with the witness: %d failovers, %d with the guest frozen by the guard, %d with the guest found owned elsewhere",
		s.simulated.Round(time.Second), s.sessions, s.failovers, s.takeovers, s.hostDeaths, s.splitBrains,
		s.witnessRuns, s.witnessFailovers, s.freezeRuns, s.ownedElsewhere)
}

func simSummary(w *simWorld) string {
	var s simStats
	s.add(w)
	return s.String()
}

package e2e

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/testvm/counter"
)

var (
	chaosN    = flag.Int("chaos.n", 0, "TestChaos: iterations to run (0: skip; make chaos sets it)")
	chaosSeed = flag.Uint64("chaos.seed", 0, "TestChaos: seed of the first iteration, iteration i runs seed+i (0: from the clock)")
	chaosOnly = flag.String("chaos.fault", "", "TestChaos: run only this fault")
	chaosJSON = flag.String("chaos.json", "", "TestChaos: write the results as JSON to this file")
)

// chaosFault is one kind of failure the suite injects into a protected
// guest, with its weight in the draw and whether the backup must resume
// the guest afterwards (true), must not (false), or may (nil: it depends
// on timing, as with a partition that may outlast the witness lease).
type chaosFault struct {
	name     string
	weight   int
	failover *bool
	inject   func(r *chaosRun) error
}

var (
	yes, no = func() *bool { b := true; return &b }(), func() *bool { b := false; return &b }()
)

// chaosFaults are the faults drawn, the riskiest first (the order a short
// run takes them in).
var chaosFaults = []chaosFault{
	{"host-death", 3, yes, func(r *chaosRun) error {
		// QEMU and the agent die together, as with their host.
		r.g.vm.Kill()
		r.p.Primary.Kill()
		return nil
	}},
	{"agent-sigterm-restart", 3, no, func(r *chaosRun) error {
		if err := r.p.Primary.Stop(30 * time.Second); err != nil {
			return err
		}
		r.sleep(0, 2*time.Second)
		return r.p.RestartPrimary()
	}},
	{"qemu-crash", 2, yes, func(r *chaosRun) error {
		r.g.vm.Kill()
		return nil
	}},
	{"partition", 2, nil, func(r *chaosRun) error {
		// The hosts lose each other for a while; each still reaches the
		// witness and the clients.
		if err := r.h.Cut(r.h.A, r.h.B); err != nil {
			return err
		}
		r.sleep(200*time.Millisecond, 4*time.Second)
		return r.h.Heal(r.h.A, r.h.B)
	}},
	{"primary-isolated", 1, yes, func(r *chaosRun) error {
		// The primary's host loses the network (backup, witness,
		// clients) and never comes back.
		if err := r.h.Isolate(r.h.A); err != nil {
			return err
		}
		return r.l.Net.NS.Exec("link", "set", "dev", r.l.Net.TapPrimary, "down")
	}},
	{"backup-agent-kill-restart", 2, no, func(r *chaosRun) error {
		r.p.Backup.Kill()
		r.sleep(0, 2*time.Second)
		r.p.Backup = nil
		return r.p.StartBackup()
	}},
}

// chaosResult is one iteration's outcome.
type chaosResult struct {
	Seed       uint64   `json:"seed"`
	Fault      string   `json:"fault"`
	At         string   `json:"injected_at"` // after how long protected
	Passed     bool     `json:"passed"`
	FailedOver bool     `json:"failed_over"`
	MaxGapMS   float64  `json:"client_max_gap_ms"` // longest wait for a reply
	ReprotMS   float64  `json:"reprotect_ms,omitempty"`
	Violations []string `json:"violations,omitempty"`
}

// chaosRun is the state of one iteration.
type chaosRun struct {
	t   *testing.T
	rng *rand.Rand
	l   *lab.Lab
	h   *lab.Hosts
	g   *protectedGuest
	p   *lab.Protection
	res *chaosResult
}

func (r *chaosRun) sleep(min, max time.Duration) {
	time.Sleep(min + time.Duration(r.rng.Int64N(int64(max-min)+1)))
}

func (r *chaosRun) violate(format string, args ...any) {
	r.res.Violations = append(r.res.Violations, fmt.Sprintf(format, args...))
}

// TestChaos injects one randomly drawn fault per iteration into a protected
// guest (witness on, each agent and the witness in a host namespace of its
// own) at a random moment, with a client holding one TCP connection that
// increments the guest's counter throughout, and checks from outside:
// every reply follows the one before on that connection (nothing taken
// back, the connection never reset), exactly one guest's QEMU runs at the
// end (sampled every 100 ms from the fault on), the backup resumed the
// guest exactly when the fault calls for it, the guest that runs is the
// same boot with its memory consistent (the dirtier's pages in order), and
// a guest left on the primary is protected again. Every iteration logs its
// seed; -chaos.seed with -chaos.n 1 replays one.
func TestChaos(t *testing.T) {
	if *chaosN <= 0 {
		t.Skip("the fault-injection suite runs with -chaos.n N (make chaos)")
	}
	seed := *chaosSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	var results []chaosResult
	for i := range *chaosN {
		s := seed + uint64(i)
		f := drawFault(s, i)
		t.Run(fmt.Sprintf("seed=%d/%s", s, f.name), func(t *testing.T) {
			res := runChaos(t, s, f)
			results = append(results, res)
			if !res.Passed {
				t.Errorf("seed %d (%s): %s; replay: go test ./e2e -run 'TestChaos' -chaos.n 1 -chaos.seed %d -chaos.fault %s -v",
					s, f.name, strings.Join(res.Violations, "; "), s, f.name)
			}
		})
	}
	t.Log("\n" + chaosTable(results))
	if *chaosJSON != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		if err := os.WriteFile(*chaosJSON, append(b, '\n'), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// drawFault picks iteration i's fault: -chaos.fault if given, else drawn
// by weight from the seed.
func drawFault(seed uint64, i int) chaosFault {
	if *chaosOnly != "" {
		for _, f := range chaosFaults {
			if f.name == *chaosOnly {
				return f
			}
		}
		panic("unknown -chaos.fault " + *chaosOnly)
	}
	total := 0
	for _, f := range chaosFaults {
		total += f.weight
	}
	n := rand.New(rand.NewPCG(seed, 0x5eed)).IntN(total)
	for _, f := range chaosFaults {
		if n -= f.weight; n < 0 {
			return f
		}
	}
	return chaosFaults[0]
}

func runChaos(t *testing.T, seed uint64, f chaosFault) chaosResult {
	t.Logf("seed %d, fault %s", seed, f.name)
	res := chaosResult{Seed: seed, Fault: f.name}
	r := &chaosRun{t: t, rng: rand.New(rand.NewPCG(seed, 1)), res: &res}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r.l = newLab(t)
	var err error
	if r.h, err = r.l.NewHosts(); err != nil {
		t.Fatal(err)
	}
	wit, err := r.h.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var c *consecutiveClient
	r.g, r.p, c = protectGuest(t, ctx, r.l, lab.ProtectOptions{Witness: wit.Endpoint, Hosts: r.h}, 3)

	// The client runs beside the fault; it stops at the first bad reply.
	stop := make(chan struct{})
	var cerr error
	var wg sync.WaitGroup
	wg.Go(func() { cerr = c.run(stop) })
	protectedAt := time.Now()
	r.sleep(200*time.Millisecond, 3*time.Second)
	res.At = time.Since(protectedAt).Round(time.Millisecond).String()
	before, _ := r.p.Epochs()
	faultAt := time.Now()
	if err := f.inject(r); err != nil {
		close(stop)
		wg.Wait()
		t.Fatalf("inject %s: %v", f.name, err)
	}

	// Watch the guests until things settle: a failover reported, or the
	// primary protecting again.
	alive := func() (n int, who []string) {
		for _, g := range []testvm.Config{r.g.prim, r.g.back} {
			if guestRuns(ctx, g.QMP[0]) {
				n, who = n+1, append(who, g.SerialLog)
			}
		}
		return n, who
	}
	// At the end, a checkpoint's pause must not hide a guest: the most
	// seen running over a few samples.
	aliveAtEnd := func() (n int, who []string) {
		for range 5 {
			if m, w := alive(); m > n {
				n, who = m, w
			}
			time.Sleep(50 * time.Millisecond)
		}
		return n, who
	}
	settle := time.Now().Add(30 * time.Second)
	var report *agent.FailoverReport
	for time.Now().Before(settle) {
		if n, who := alive(); n > 1 {
			r.violate("two guests run %v after the fault: %s", time.Since(faultAt).Round(time.Millisecond), strings.Join(who, ", "))
			break
		}
		if report == nil {
			report, _ = lab.ReadReport(r.p.Report)
		}
		if report != nil && time.Since(faultAt) > 3*time.Second {
			break
		}
		if report == nil && f.failover != yes {
			if eps, _ := r.p.Epochs(); len(eps) > len(before)+5 && time.Since(faultAt) > 3*time.Second {
				res.ReprotMS = float64(eps[len(eps)-1].Acked.Sub(faultAt).Milliseconds())
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Two more seconds of service after things settled.
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	res.MaxGapMS = float64(c.maxGap.Microseconds()) / 1000
	res.FailedOver = report != nil
	if cerr != nil {
		r.violate("client: %v", cerr)
	}
	switch {
	case f.failover == yes && report == nil:
		r.violate("no failover after %s", f.name)
	case f.failover == no && report != nil:
		r.violate("the backup resumed the guest (epoch %d) after %s", report.Epoch, f.name)
	}
	if n, who := aliveAtEnd(); n != 1 {
		r.violate("%d guests run at the end: %s", n, strings.Join(who, ", "))
	}
	if report == nil && f.failover != yes {
		if eps, _ := r.p.Epochs(); len(eps) <= len(before) {
			r.violate("the guest on the primary is not protected again")
		}
	}
	// The guest that runs: same boot, memory consistent, counter at
	// least the last reply.
	r.checkGuest(ctx, c.last.Value)
	res.Passed = len(res.Violations) == 0
	t.Logf("%s injected %s after protection; failover %v; %d replies, longest wait %.0f ms; re-protected after %.0f ms",
		f.name, res.At, res.FailedOver, c.n, res.MaxGapMS, res.ReprotMS)
	return res
}

// checkGuest connects to the guest that runs and checks it is the same
// boot, its counter at least last (the last reply the client got) and its
// memory consistent.
func (r *chaosRun) checkGuest(ctx context.Context, last uint64) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := r.l.Dial(ctx)
	if err != nil {
		r.violate("connect to the guest at the end: %v", err)
		return
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	cl := counter.NewClient(conn)
	got, err := cl.Get()
	switch {
	case err != nil:
		r.violate("GET at the end: %v", err)
	case got.BootID != r.g.ready.BootID:
		r.violate("the guest rebooted: boot %s, want %s", got.BootID, r.g.ready.BootID)
	case got.Value < last:
		r.violate("counter %d at the end, below the last reply %d: an acknowledged increment was lost", got.Value, last)
	}
	if chk, err := cl.Check(); err != nil || chk.Value != 0 {
		r.violate("memory check: %d pages out of order, %v", chk.Value, err)
	}
}

// run increments until stop, returning the first failure.
func (c *consecutiveClient) run(stop <-chan struct{}) error {
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		if err := c.next(); err != nil {
			return err
		}
	}
}

// guestRuns reports whether a guest's QEMU answers on its QMP socket and
// says its guest is running (not paused: a guest a guard froze, or one
// loaded and not yet continued, runs nothing).
func guestRuns(ctx context.Context, qmpSocket string) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	mon, err := qmp.Dial(ctx, qmpSocket)
	if err != nil {
		return false
	}
	defer mon.Close()
	st, err := qemu.Status(ctx, mon)
	return err == nil && st == "running"
}

// chaosTable is the results per fault: iterations, passed, failovers, the
// client's longest wait (p50, max) and the seeds that failed.
func chaosTable(results []chaosResult) string {
	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "fault\titerations\tpassed\tfailovers\tclient wait p50 (ms)\tmax (ms)\tfailed seeds")
	for _, f := range chaosFaults {
		var n, ok, fo int
		var gaps []float64
		var failed []string
		for _, r := range results {
			if r.Fault != f.name {
				continue
			}
			n++
			if r.Passed {
				ok++
			} else {
				failed = append(failed, strconv.FormatUint(r.Seed, 10))
			}
			if r.FailedOver {
				fo++
			}
			gaps = append(gaps, r.MaxGapMS)
		}
		if n == 0 {
			continue
		}
		slices.Sort(gaps)
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.0f\t%.0f\t%s\n", f.name, n, ok, fo, gaps[len(gaps)/2], gaps[len(gaps)-1], strings.Join(failed, " "))
	}
	tw.Flush()
	return sb.String()
}

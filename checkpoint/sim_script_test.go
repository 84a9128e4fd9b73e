package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/witness"
)

// TestSimScenarios runs the scripts in testdata/sim (the format is at the
// top of sim_test.go), each run of each file a subtest.
func TestSimScenarios(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "sim", "*.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no scenarios in testdata/sim")
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".txt")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			runs, err := parseSimScript(string(data))
			if err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			for i, r := range runs {
				label := "run" + strconv.Itoa(i+1)
				if r.title != "" {
					label = r.title
				}
				t.Run(label, func(t *testing.T) { r.play(t, file) })
			}
		})
	}
}

// simCmd is one line of a script; a repeat holds its body.
type simCmd struct {
	line  int
	words []string
	body  []simCmd
}

func (c simCmd) String() string {
	return fmt.Sprintf("line %d: %s", c.line, strings.Join(c.words, " "))
}

// simRun is one independent run of a script file.
type simRun struct {
	title    string // the first comment line of the run, shortened
	config   []simCmd
	cmds     []simCmd
	knownInv string
	knownBug string
}

func parseSimScript(text string) ([]*simRun, error) {
	var runs []*simRun
	run := &simRun{}
	stack := []*[]simCmd{&run.cmds}
	for i, raw := range strings.Split(text, "\n") {
		line := strings.TrimSpace(raw)
		if strings.HasPrefix(line, "#") {
			if run.title == "" && len(run.cmds) == 0 && len(run.config) == 0 {
				run.title = simTitle(strings.TrimSpace(strings.TrimPrefix(line, "#")))
			}
			continue
		}
		if j := strings.Index(line, "#"); j >= 0 {
			line = strings.TrimSpace(line[:j])
		}
		if line == "" {
			continue
		}
		words := strings.Fields(line)
		cmd := simCmd{line: i + 1, words: words}
		switch {
		case line == "---":
			if len(stack) != 1 {
				return nil, fmt.Errorf("line %d: --- inside a repeat", i+1)
			}
			runs = append(runs, run)
			run = &simRun{}
			stack = []*[]simCmd{&run.cmds}
		case words[0] == "config":
			if len(words) != 3 || len(run.cmds) > 0 {
				return nil, fmt.Errorf("%v: config KEY VALUE, before the run's first command", cmd)
			}
			run.config = append(run.config, cmd)
		case words[0] == "known-bug":
			if len(words) < 3 {
				return nil, fmt.Errorf("%v: known-bug INV TEXT", cmd)
			}
			run.knownInv, run.knownBug = words[1], strings.Join(words[2:], " ")
		case words[0] == "repeat":
			if len(words) != 2 {
				return nil, fmt.Errorf("%v: repeat N", cmd)
			}
			top := stack[len(stack)-1]
			*top = append(*top, cmd)
			stack = append(stack, &(*top)[len(*top)-1].body)
		case words[0] == "end" && len(words) == 1:
			if len(stack) == 1 {
				return nil, fmt.Errorf("%v: end without repeat", cmd)
			}
			stack = stack[:len(stack)-1]
		default:
			top := stack[len(stack)-1]
			*top = append(*top, cmd)
		}
	}
	if len(stack) != 1 {
		return nil, errors.New("repeat without end")
	}
	return append(runs, run), nil
}

func simTitle(s string) string {
	s = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return '_'
	}, s)
	if len(s) > 48 {
		s = s[:48]
	}
	return s
}

// play runs the script against a fresh world and checks its expectations
// and the invariants.
func (r *simRun) play(t *testing.T, file string) {
	cfg := simDefaults()
	var seed uint64 = 1
	for _, c := range r.config {
		if err := simConfigure(&cfg, &seed, c.words[1], c.words[2]); err != nil {
			t.Fatalf("%s %v: %v", file, c, err)
		}
	}
	w := newSimWorld(seed, cfg, true)
	w.begin()
	failed := false
	fail := func(c simCmd, format string, args ...any) {
		failed = true
		t.Errorf("%s %v: %s", file, c, fmt.Sprintf(format, args...))
	}
	var exec func([]simCmd)
	exec = func(cmds []simCmd) {
		for _, c := range cmds {
			if w.halted {
				return
			}
			if c.words[0] == "repeat" {
				n, err := strconv.Atoi(c.words[1])
				if err != nil {
					fail(c, "%v", err)
					return
				}
				for range n {
					exec(c.body)
				}
				continue
			}
			w.logf("script", "%s", strings.Join(c.words, " "))
			if err := w.do(c.words); err != nil {
				fail(c, "%v", err)
			}
		}
	}
	exec(r.cmds)
	w.runFor(10 * time.Millisecond) // let the last happenings be checked

	bad := w.check.failed(r.knownInv)
	for _, v := range bad {
		failed = true
		t.Errorf("%s: %v", file, v)
	}
	if r.knownInv != "" {
		if len(w.check.violations) == len(bad) {
			failed = true
			t.Errorf("%s: known bug (%s) no longer reproduces: %s; if it was fixed, drop the known-bug line and expect the fixed behaviour", file, r.knownInv, r.knownBug)
		} else {
			for _, v := range w.check.violations {
				if strings.Contains(r.knownInv, v.inv) {
					t.Logf("known bug reproduced (%s): %v", r.knownBug, v)
				}
			}
		}
	}
	if failed || testing.Verbose() && *simTraceFlag {
		t.Logf("trace:\n%s", w.trace)
	}
}

func simConfigure(cfg *simConfig, seed *uint64, key, val string) error {
	dur := func() (time.Duration, error) { return time.ParseDuration(val) }
	var err error
	var d time.Duration
	switch key {
	case "seed":
		*seed, err = strconv.ParseUint(val, 10, 64)
	case "retry":
		d, err = dur()
		cfg.Retry = simRange{d, d}
	case "pause":
		d, err = dur()
		cfg.Pause = simRange{d, d}
	case "apply":
		d, err = dur()
		cfg.Apply = simRange{d, d}
	case "link":
		d, err = dur()
		cfg.Link = simRange{min(d, cfg.Link.Min), d}
	case "interval":
		cfg.Pipeline.Interval, err = dur()
	case "max-in-flight":
		cfg.Pipeline.MaxInFlight, err = strconv.Atoi(val)
	case "command-timeout":
		cfg.CommandTimeout, err = dur()
	case "prepare":
		cfg.Prepare = val == "on"
	case "qemu-exit":
		d, err = dur()
		cfg.QEMUExit = simRange{d, d}
	case "witness":
		cfg.Witness = val == "on"
	case "ttl":
		cfg.WitnessTTL, err = dur()
	case "witness-link":
		d, err = dur()
		cfg.WitnessLink = simRange{min(d, cfg.WitnessLink.Min), d}
	case "agent-setup":
		d, err = dur()
		cfg.AgentSetup = simRange{d, d}
	case "clock-rate":
		cfg.ClockRate, err = strconv.ParseFloat(val, 64)
		if err == nil && (cfg.ClockRate > witness.ClockRate || cfg.ClockRate < -witness.ClockRate) {
			err = fmt.Errorf("clock-rate %v: beyond witness.ClockRate (%v), what the guard allows for", cfg.ClockRate, witness.ClockRate)
		}
	default:
		return fmt.Errorf("unknown config %q", key)
	}
	return err
}

// do carries out one script command.
func (w *simWorld) do(words []string) error {
	line := strings.Join(words, " ")
	arg := func(i int) string {
		if i < len(words) {
			return words[i]
		}
		return ""
	}
	durAt := func(i int) (time.Duration, error) { return time.ParseDuration(arg(i)) }
	h := w.primary
	switch {
	case words[0] == "run":
		d, err := durAt(1)
		if err != nil {
			return err
		}
		w.runFor(d)
	case line == "kill primary-host" || line == "kill primary-host rst":
		h.die(arg(2) == "rst")
	case strings.HasPrefix(line, "kill primary-host at "):
		points := map[string]FaultPoint{"paused": FaultPaused, "taken": FaultResumed, "shipping": FaultShipping, "shipped": FaultShipped, "acked": FaultAcked}
		p, ok := points[arg(3)]
		if !ok {
			return fmt.Errorf("unknown point %q", arg(3))
		}
		h.dieAt = simDieAt{point: p}
		if arg(4) == "epoch" {
			n, err := strconv.ParseUint(arg(5), 10, 64)
			if err != nil {
				return err
			}
			h.dieAt.epoch = n
		}
	case line == "sigterm primary":
		h.sigterm()
	case line == "sigkill primary-agent":
		h.sigkill()
	case line == "guest crashes":
		h.crash()
	case strings.HasPrefix(line, "restart primary after "):
		d, err := durAt(3)
		if err != nil {
			return err
		}
		h.restartAfter(d)
	case line == "break link":
		ps := h.current()
		if ps == nil {
			return errors.New("no session to break")
		}
		ps.conn.reset()
	case words[0] == "partition" && strings.HasSuffix(arg(1), "-witness"),
		words[0] == "witness", words[0] == "isolate":
		return w.doWitness(words)
	case words[0] == "partition":
		d, err := durAt(1)
		if err != nil {
			return err
		}
		w.partition(h, d)
	case line == "stray heartbeat to primary":
		ps := h.current()
		if ps == nil {
			return errors.New("no session")
		}
		ps.conn.toPrimary.push(simFrame{kind: simHeartbeatFrame}, 0)
	case line == "scan backup":
		w.scan("")
	case strings.HasPrefix(line, "hello backup from "):
		w.scan(arg(3))
	case line == "checkpoint fails":
		w.script.checkpoints = append(w.script.checkpoints, simCheckpoint{kind: simFailRunning, took: w.cfg.Pause.Min})
	case line == "checkpoint fails stuck":
		w.script.checkpoints = append(w.script.checkpoints, simCheckpoint{kind: simFailStuck, took: w.cfg.CommandTimeout})
	case strings.HasPrefix(line, "checkpoint slow "):
		d, err := durAt(2)
		if err != nil {
			return err
		}
		w.check.maxStall = max(w.check.maxStall, d)
		w.script.checkpoints = append(w.script.checkpoints, simCheckpoint{kind: simTaken, took: d})
	case line == "apply fails":
		w.script.applyFails++
	case strings.HasPrefix(line, "apply slow "):
		d, err := durAt(2)
		if err != nil {
			return err
		}
		w.check.maxStall = max(w.check.maxStall, d)
		w.script.applySlow = d
	case line == "corrupt next epoch":
		w.script.corrupt++
	case line == "lose next ack":
		w.script.loseAcks++
	case strings.HasPrefix(line, "delay acks "):
		d, err := durAt(2)
		if err != nil {
			return err
		}
		w.script.ackDelay = d
	case strings.HasPrefix(line, "delay backup hello "):
		d, err := durAt(3)
		if err != nil {
			return err
		}
		w.script.helloDelay = d
	case strings.HasPrefix(line, "delay ship-reports "):
		d, err := durAt(2)
		if err != nil {
			return err
		}
		w.script.reportDelay = d
	case strings.HasPrefix(line, "restart backup after "):
		d, err := durAt(3)
		if err != nil {
			return err
		}
		w.backup.crash()
		w.after(d, w.backup.boot)
	case words[0] == "second" && arg(1) == "primary":
		d := 300 * time.Millisecond
		if arg(2) == "for" {
			var err error
			if d, err = durAt(3); err != nil {
				return err
			}
		}
		w.secondPrimary(d)
	case words[0] == "expect":
		return w.expect(words[1:])
	default:
		return fmt.Errorf("unknown command %q", line)
	}
	return nil
}

// expect checks a script's expectation now.
func (w *simWorld) expect(words []string) error {
	line := strings.Join(words, " ")
	b, h := w.backup, w.primary
	fo := func() string {
		if !b.failedOver {
			return "no failover"
		}
		return fmt.Sprintf("failover to epoch %d (%s)", b.failover.Epoch, w.check.failover.why)
	}
	switch {
	case line == "no-failover":
		if b.failedOver {
			return errors.New(fo())
		}
	case line == "failover by takeover":
		if !b.failedOver || w.check.failover.why != "the primary handed over" {
			return errors.New(fo())
		}
	case line == "guest dead before failover":
		switch {
		case !b.failedOver:
			return errors.New("no failover")
		case h.guestGoneAt.IsZero() || h.alive && h.guest:
			return errors.New("the primary's guest is alive")
		case h.guestGoneAt.After(w.check.failoverAt):
			return fmt.Errorf("the primary's guest died at %.3fs, the backup resumed it at %.3fs",
				h.guestGoneAt.Sub(w.start).Seconds(), w.check.failoverAt.Sub(w.start).Seconds())
		}
	case words[0] == "failover":
		if !b.failedOver {
			return errors.New("no failover")
		}
		if len(words) > 1 {
			var n uint64
			var cmp string
			switch {
			case strings.HasPrefix(words[1], "epoch>="):
				cmp = ">="
			case strings.HasPrefix(words[1], "epoch<="):
				cmp = "<="
			case strings.HasPrefix(words[1], "epoch="):
				cmp = "="
			default:
				return fmt.Errorf("want epoch>=N, epoch<=N or epoch=N, not %q", words[1])
			}
			n, err := strconv.ParseUint(strings.TrimPrefix(words[1], "epoch"+cmp), 10, 64)
			if err != nil {
				return err
			}
			if got := b.failover.Epoch; cmp == ">=" && got < n || cmp == "<=" && got > n || cmp == "=" && got != n {
				return fmt.Errorf("%s, want epoch%s%d", fo(), cmp, n)
			}
		}
	case len(words) == 3 && words[0] == "backup" && words[1] == "state":
		if !b.up {
			return errors.New("the backup is down")
		}
		if got := b.sb.State().String(); got != words[2] {
			return fmt.Errorf("backup state %s", got)
		}
	case len(words) == 3 && words[0] == "primary" && words[1] == "state":
		got := "none"
		if ps := h.current(); ps != nil {
			got = ps.s.State().String()
		}
		if got != words[2] {
			return fmt.Errorf("primary state %s", got)
		}
	case len(words) >= 3 && words[0] == "primary" && words[1] == "ended":
		if len(h.ends) == 0 {
			return errors.New("no session ended")
		}
		got := h.ends[len(h.ends)-1]
		want := map[string]error{"ErrStopped": ErrStopped, "ErrPeerLost": ErrPeerLost, "ErrPeerRejected": ErrPeerRejected,
			"ErrFailedOver": ErrFailedOver, "ErrHandedOver": ErrHandedOver}[words[2]]
		if want == nil {
			// Not a sentinel: words of the error's text.
			if text := strings.Join(words[2:], " "); !strings.Contains(got.Error(), text) {
				return fmt.Errorf("the last session ended with %v, not %q", got, text)
			}
			break
		}
		if !errors.Is(got, want) {
			return fmt.Errorf("the last session ended with %v", got)
		}
	case len(words) == 3 && words[0] == "primary" && words[1] == "exited":
		if h.agent != nil {
			return fmt.Errorf("agent %d runs", h.agent.gen)
		}
		got := h.exitErr
		if words[2] == "stopped" {
			if got != nil {
				return fmt.Errorf("its protection loop ended with %v", got)
			}
			break
		}
		want := map[string]error{"ErrGuestGone": simErrGuestGone, "ErrFailedOver": ErrFailedOver, "ErrHandedOver": ErrHandedOver}[words[2]]
		if want == nil {
			return fmt.Errorf("want ErrGuestGone, ErrFailedOver, ErrHandedOver or stopped, not %q", words[2])
		}
		if !errors.Is(got, want) {
			return fmt.Errorf("its protection loop ended with %v", got)
		}
	case line == "guest alive" || line == "guest dead":
		if alive := h.alive && h.guest; alive != (words[1] == "alive") {
			return fmt.Errorf("guest alive: %v", alive)
		}
	case strings.HasPrefix(line, "committed>="):
		n, err := strconv.ParseUint(strings.TrimPrefix(line, "committed>="), 10, 64)
		if err != nil {
			return err
		}
		ps := h.current()
		if ps == nil {
			return errors.New("no session")
		}
		if got := ps.s.Committed(); got < n {
			return fmt.Errorf("committed %d", got)
		}
	case words[0] == "primary" && len(words) >= 2 && (words[1] == "frozen" || words[1] == "running" || words[1] == "froze" || words[1] == "never"),
		words[0] == "witness":
		return w.expectWitness(words)
	case line == "split-brain":
		if len(w.check.splitBrains) == 0 {
			return errors.New("no two live guests seen")
		}
	case line == "no-split-brain":
		if len(w.check.splitBrains) > 0 {
			return fmt.Errorf("two live guests: %v", w.check.splitBrains)
		}
	default:
		return fmt.Errorf("unknown expectation %q", line)
	}
	return nil
}

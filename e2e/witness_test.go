package e2e

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/witness"
)

// logTime is the time of the first line of an agent's log (slog text) that
// contains s.
func logTime(t *testing.T, log, s string) time.Time {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, s) {
			continue
		}
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], "time=") {
			ts, err := time.Parse(time.RFC3339Nano, strings.TrimPrefix(f[0], "time="))
			if err != nil {
				t.Fatalf("log line %q: %v", line, err)
			}
			return ts
		}
	}
	t.Fatalf("no log line with %q in:\n%s", s, log)
	return time.Time{}
}

// TestWitnessIsolatedPrimaryStopsBeforeTheBackupResumes cuts the primary's
// host off from everything (its link to the hosts' switch goes down, and
// its tap on the clients' bridge) while its agent and guest live on: a
// partition, not a death. Each agent and the witness run in a network
// namespace of their own. The primary stops its
// guest before its witness lease can expire; the backup resumes only after
// claiming the witness, which it can only once that lease expired: the
// order is checked on both agents' clocks. The client's counter carries on,
// one boot; when the partition heals, the primary finds the guest owned by
// the backup and kills its stale copy: one guest.
func TestWitnessIsolatedPrimaryStopsBeforeTheBackupResumes(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	h, err := l.NewHosts()
	if err != nil {
		t.Fatal(err)
	}
	wit, err := h.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{Witness: wit.Endpoint, Hosts: h}, 3)
	c.incFor(time.Second)

	// The primary's host loses the network: to its backup, to the witness
	// and to the clients (its tap on the clients' bridge goes down).
	cutAt := time.Now()
	if err := h.Isolate(h.A); err != nil {
		t.Fatal(err)
	}
	if err := l.Net.NS.Exec("link", "set", "dev", l.Net.TapPrimary, "down"); err != nil {
		t.Fatal(err)
	}
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stopped := logTime(t, p.Primary.Output(), "stopping the guest: it may not run here now")
	if !stopped.Before(r.Cleared) || r.Cleared.IsZero() {
		t.Fatalf("the primary stopped its guest at %s, the backup claimed the witness at %s: want the stop first",
			stopped.Format(time.StampMicro), r.Cleared.Format(time.StampMicro))
	}
	if !strings.Contains(r.Cause, "claimed the witness") {
		t.Fatalf("failover cause %q: want the witness claim named", r.Cause)
	}
	t.Logf("cut at 0; primary's guest stopped at +%v; backup declared the primary dead at +%v, claimed the witness at +%v, guest running at +%v",
		stopped.Sub(cutAt).Round(time.Millisecond), r.Declared.Sub(cutAt).Round(time.Millisecond),
		r.Cleared.Sub(cutAt).Round(time.Millisecond), r.Running.Sub(cutAt).Round(time.Millisecond))

	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s after the failover, want %s", c.last.BootID, g.ready.BootID)
	}

	// The partition heals: the stale primary learns the backup owns the
	// guest and kills its copy.
	if err := h.Rejoin(h.A); err != nil {
		t.Fatal(err)
	}
	if err := l.Net.NS.Exec("link", "set", "dev", l.Net.TapPrimary, "up"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.vm.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("the primary's stale guest still runs 30s after the partition healed:\n%s", p.Primary.Output())
	}
	c.incFor(time.Second)
	st := witnessStatus(t, ctx, wit)
	if st.Owner != lab.WitnessB || st.Active != lab.WitnessB {
		t.Fatalf("witness says %+v: want the backup owner and active", st)
	}
	t.Logf("%d consecutive replies up to %d, one boot; the primary's copy ended once the partition healed", c.n, c.last.Value)
}

// TestWitnessDownProtectionGoesOn stops the witness (SIGSTOP: it answers
// nothing) while the agents talk: protection goes on past several lease
// TTLs. Then the primary's host dies: with neither witness nor fence
// command the backup does not resume the guest, and says why; once the
// witness answers again, the primary's lease has expired and the backup
// claims it and resumes the guest, the same boot.
func TestWitnessDownProtectionGoesOn(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	wit, err := l.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{Witness: wit.Endpoint}, 3)
	if err := wit.Pause(); err != nil {
		t.Fatal(err)
	}
	before, err := p.Epochs()
	if err != nil {
		t.Fatal(err)
	}
	c.incFor(3 * witness.DefaultTTL)
	after, err := p.Epochs()
	if err != nil {
		t.Fatal(err)
	}
	if len(after) < len(before)+10 || strings.Contains(p.Primary.Output(), "stopping the guest") {
		t.Fatalf("witness down for %v: %d epochs committed (want protection to go on), primary log:\n%s", 3*witness.DefaultTTL, len(after)-len(before), p.Primary.Output())
	}

	p.Primary.Kill()
	g.vm.Kill()
	if _, err := p.Backup.WaitLine(ctx, "the witness cannot be reached, and no fence command is set"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * heartbeatTimeout)
	if _, err := lab.ReadReport(p.Report); err == nil {
		t.Fatal("the backup resumed the guest without the witness or a fence")
	}
	if err := wit.Resume(); err != nil {
		t.Fatal(err)
	}
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s after the failover, want %s", c.last.BootID, g.ready.BootID)
	}
	t.Logf("resumed epoch %d once the witness answered (claim %.0f ms after the primary was declared dead); %d consecutive replies", r.Epoch, r.ClearMS, c.n)
}

// waitWitnessOwner waits up to 10 s after what happened (after) for the
// witness to name owner both the guest's owner and its active side.
func waitWitnessOwner(t *testing.T, ctx context.Context, wit *witness.Local, after, owner string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for st := witnessStatus(t, ctx, wit); st.Owner != owner || st.Active != owner; st = witnessStatus(t, ctx, wit) {
		if time.Now().After(deadline) {
			t.Fatalf("witness says %+v 10 s after %s: want %s owner and active", st, after, owner)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func witnessStatus(t *testing.T, ctx context.Context, l *witness.Local) witness.Status {
	t.Helper()
	w, err := witness.Open(witness.Config{Endpoints: []string{l.Endpoint}}, "lab", "test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	st, err := w.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestSwitchoverMovesTheGuestWithNothingLost asks the primary remusd (its
// control socket, as remusctl switchover does) to move the guest to the
// backup while a client increments on one TCP connection: the backup
// resumes the final epoch, the primary's QEMU ends, the witness names the
// backup, and the client's counter carries on consecutively, one boot. The
// longest reply wait is the client-visible gap.
func TestSwitchoverMovesTheGuestWithNothingLost(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	wit, err := l.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{Witness: wit.Endpoint}, 3)
	c.incFor(time.Second)
	st, err := p.Status(ctx)
	if err != nil || st.State != "protecting" || st.Witness != lab.WitnessA || st.WitnessOwner != lab.WitnessA || st.WitnessActive != lab.WitnessA || st.CommittedEpoch == 0 {
		t.Fatalf("status %+v (%v): want protecting, with a witness and a committed epoch", st, err)
	}
	checkMetrics(t, ctx, p)
	c.maxGap = 0
	type result struct {
		r   agent.SwitchoverResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := p.Switchover(ctx)
		done <- result{r, err}
	}()
	var res result
	for res.r.Result == "" && res.err == nil {
		c.incFor(100 * time.Millisecond)
		select {
		case res = <-done:
		default:
		}
	}
	if res.err != nil {
		t.Fatalf("switchover: %v\n%s", res.err, p.Primary.Output())
	}
	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s after the switchover, want %s", c.last.BootID, g.ready.BootID)
	}
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Cause, "switchover") {
		t.Fatalf("backup's cause %q: want the switchover named", r.Cause)
	}
	select {
	case <-g.vm.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the primary's QEMU still runs after the switchover")
	}
	select {
	case <-p.Primary.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the primary remusd still runs after the switchover")
	}
	if out := p.Primary.Output(); !strings.Contains(out, "switched over: the guest runs on the backup now") {
		t.Fatalf("the primary remusd did not say it switched over:\n%s", out)
	}
	waitWitnessOwner(t, ctx, wit, "the switchover", lab.WitnessB)
	t.Logf("switchover took %.0f ms (final epoch acked, guest killed, takeover sent); backup restore %.0f ms; longest client wait %v; %d consecutive replies up to %d, one boot",
		res.r.TookMS, r.RestoreMS, c.maxGap.Round(time.Millisecond), c.n, c.last.Value)
}

// TestReprotectBothWays moves one guest back and forth between the lab's
// two hosts with a client on one TCP connection throughout: protected
// A→B, switched over to B; protected again from B (B→A), switched back to
// A; protected A→B, A's host dies, failover to B; protected B→A, B's host
// dies, failover to A. Each time the survivor's backup agent is stopped
// (its QEMU runs on) and a primary agent attaches to the running guest on
// that host, under that host's name at the witness, with a fresh standby
// on the other host (full sync first). The counter stays consecutive, one
// boot, through all four moves.
func TestReprotectBothWays(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	wit, err := l.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{Witness: wit.Endpoint}, 3)
	c.incFor(time.Second)
	// onB: the guest runs on B (started from g.back's command line).
	onB := false
	protectAgain := func(step string) {
		t.Helper()
		if err := p.Backup.Stop(30 * time.Second); err != nil {
			t.Fatalf("%s: stop the survivor's backup agent: %v", step, err)
		}
		prim, back := g.prim, g.back
		if onB {
			prim, back = back, prim
		}
		var err error
		p, err = l.Protect(prim, back, lab.ProtectOptions{Witness: wit.Endpoint, Reverse: onB, HeartbeatTimeout: heartbeatTimeout})
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		dump(t, l, p)
		if _, err := p.WaitCommitted(ctx, 3); err != nil {
			t.Fatalf("%s: not protected again: %v", step, err)
		}
		c.incFor(time.Second)
	}
	survivor := func(step string, r *agent.FailoverReport) {
		t.Helper()
		onB = !onB
		c.incFor(time.Second)
		if c.last.BootID != g.ready.BootID {
			t.Fatalf("%s: boot id %s, want %s", step, c.last.BootID, g.ready.BootID)
		}
		owner := lab.WitnessA
		if onB {
			owner = lab.WitnessB
		}
		waitWitnessOwner(t, ctx, wit, step, owner)
		t.Logf("%s: the guest runs on %s (resumed epoch %d, restore %.0f ms); counter %d", step, owner, r.Epoch, r.RestoreMS, c.last.Value)
	}
	switchover := func(step string) {
		t.Helper()
		if _, err := p.Switchover(ctx); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		r, err := p.WaitReport(ctx)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		survivor(step, r)
	}
	hostDies := func(step string) {
		t.Helper()
		pid, err := guestPID(l)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		killed := time.Now()
		p.Primary.Kill()
		syscall.Kill(pid, syscall.SIGKILL)
		r, err := p.WaitReport(ctx)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		c.inc() // the first reply after the kill
		t.Logf("%s: the client's first reply %v after the kill (detection %.0f ms, witness %.0f ms, restore %.0f ms)",
			step, time.Since(killed).Round(time.Millisecond), r.DetectionMS, r.ClearMS, r.RestoreMS)
		survivor(step, r)
	}

	switchover("switchover A→B")
	protectAgain("re-protect B→A")
	switchover("switchover B→A")
	protectAgain("re-protect A→B")
	hostDies("A dies")
	protectAgain("re-protect B→A")
	hostDies("B dies")
	t.Logf("%d consecutive replies up to %d on one connection, one boot, through two switchovers and two failovers", c.n, c.last.Value)
}

// guestPID is the pid of the QEMU that the last failover or switchover
// started (named in the backup state directory).
func guestPID(l *lab.Lab) (int, error) {
	b, err := os.ReadFile(agent.QEMUPIDFile(filepath.Join(l.Dir, "backup-state")))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// TestWitnessLinkCutNoFailover cuts only the link between the agents' hosts
// (a blackhole route each way); both reach the witness and the clients. The backup cannot claim the witness
// (the primary renews its lease) and resumes nothing; the primary runs on
// unprotected and its client is served throughout; once the link is back
// the guest is protected again.
func TestWitnessLinkCutNoFailover(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	h, err := l.NewHosts()
	if err != nil {
		t.Fatal(err)
	}
	wit, err := h.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{Witness: wit.Endpoint, Hosts: h}, 3)
	c.incFor(time.Second)
	if err := h.Cut(h.A, h.B); err != nil {
		t.Fatal(err)
	}
	// Longer than detection plus two lease TTLs: a backup that could
	// resume would have.
	c.incFor(heartbeatTimeout + 3*witness.DefaultTTL)
	if _, err := lab.ReadReport(p.Report); err == nil {
		t.Fatalf("the backup resumed the guest while the primary held its lease:\n%s", p.Backup.Output())
	}
	if !strings.Contains(p.Backup.Output(), "its witness lease is alive") {
		t.Fatalf("the backup does not say why it does not resume:\n%s", p.Backup.Output())
	}
	if st, err := p.Status(ctx); err != nil || st.State == "stopped" {
		t.Fatalf("primary status %+v (%v): want its guest running", st, err)
	}
	before, err := p.Epochs()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Heal(h.A, h.B); err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitCommitted(ctx, len(before)+5); err != nil {
		t.Fatalf("not protected again after the link came back: %v", err)
	}
	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s, want %s", c.last.BootID, g.ready.BootID)
	}
	t.Logf("link cut for %v: no failover, %d consecutive replies up to %d, protected again", heartbeatTimeout+3*witness.DefaultTTL, c.n, c.last.Value)
}

// TestWitnessDownFenceDecides: the witness is down and the primary's host
// dies; with a fence command the backup fences and resumes without the
// witness.
func TestWitnessDownFenceDecides(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	wit, err := l.StartWitness(ctx)
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(l.Dir, "fence.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"powered off $2\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{Witness: wit.Endpoint, BackupArgs: []string{"--fence-command", script}}, 3)
	if err := wit.Pause(); err != nil {
		t.Fatal(err)
	}
	c.incFor(witness.DefaultTTL)
	p.Primary.Kill()
	g.vm.Kill()
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Cause, "fenced") || !strings.Contains(p.Backup.Output(), "the witness cannot be reached: fencing the primary instead") {
		t.Fatalf("failover cause %q: want the fence after an unreachable witness:\n%s", r.Cause, p.Backup.Output())
	}
	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot id %s, want %s", c.last.BootID, g.ready.BootID)
	}
	wit.Resume()
	t.Logf("witness down: fenced and resumed epoch %d (%.0f ms after the primary was declared dead); %d consecutive replies", r.Epoch, r.ClearMS, c.n)
}

// checkMetrics scrapes the protecting primary's /metrics and checks the
// series an administrator alerts on: protected, epochs committed, the
// last commit's time, pauses observed, the witness lease trusted.
func checkMetrics(t *testing.T, ctx context.Context, p *lab.Protection) {
	t.Helper()
	m, err := p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	value := func(series string) float64 {
		for line := range strings.Lines(m) {
			if rest, ok := strings.CutPrefix(line, series+" "); ok {
				v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
				if err == nil {
					return v
				}
			}
		}
		t.Fatalf("no series %s in /metrics:\n%s", series, m)
		return 0
	}
	if v := value(`remus_protected{vm="lab"}`); v != 1 {
		t.Errorf("remus_protected %v, want 1", v)
	}
	if v := value(`remus_epochs_committed_total{vm="lab"}`); v < 3 {
		t.Errorf("remus_epochs_committed_total %v, want at least 3", v)
	}
	if v := value(`remus_last_commit_timestamp_seconds{vm="lab"}`); time.Since(time.Unix(int64(v), 0)) > time.Minute {
		t.Errorf("remus_last_commit_timestamp_seconds %v: not recent", v)
	}
	if v := value(`remus_checkpoint_pause_seconds_count{step="total",vm="lab"}`); v < 3 {
		t.Errorf("pause histogram count %v, want at least 3", v)
	}
	if v := value(`remus_witness_lease_trusted{vm="lab"}`); v != 1 {
		t.Errorf("remus_witness_lease_trusted %v, want 1", v)
	}
}

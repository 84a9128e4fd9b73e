package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/witness"
)

// WitnessConfig is how an agent reaches the witness.
type WitnessConfig struct {
	witness.Config
	// ID names this host to the witness, the same for its primary and
	// its backup agents (after a failover the backup's host protects the
	// guest as primary under the same name); default the host name. Two
	// hosts must never share one.
	ID string
}

// open connects to the witness as this host's side.
func (c WitnessConfig) open(vm string) (*witness.Witness, error) {
	id := c.ID
	if id == "" {
		host, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("witness: name this host (--witness-id): %w", err)
		}
		id = host
	}
	return witness.Open(c.Config, vm, id)
}

// checkBackupSide refuses to run a backup on the side the witness names as
// the guest's owner: the guest runs here (an earlier failover or
// switchover, or both agents given the same name).
func checkBackupSide(ctx context.Context, w *witness.Witness, log *slog.Logger) error {
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := w.Status(sctx)
	if err != nil {
		log.Warn("cannot read the witness at start; going on (a failover needs it, or the fence command)", "err", err)
		return nil
	}
	if st.Owner == w.ID() {
		return fmt.Errorf("the witness names this host (%q) as the owner of the guest: it runs here after a failover or switchover, so protect it from here with remusd primary; if the other host is named %q too, give each host its own --witness-id", w.ID(), w.ID())
	}
	return nil
}

// failStopRisk is what running without witness or fence risks, for the
// refusal and the warning.
const failStopRisk = "a partition between the two hosts (both alive) would let the backup resume the guest while the primary runs on: two live copies"

// guardStopBudget is how long the guard allows itself to stop the guest
// once its lease is no longer trusted: its check period plus a QMP stop.
const (
	guardPeriod     = 50 * time.Millisecond
	guardStopBudget = 250 * time.Millisecond
)

// gate is what the primary's guard acts through: the checkpoint loop's QMP
// monitor (stop and cont pass through it, so a guest the guard froze is
// not continued by a checkpoint) and its output commit (output passes
// unacknowledged only while the lease is trusted).
//
// freeze never waits for the checkpoint loop: a checkpoint whose QMP stop
// hangs must not keep the guard from stopping the guest (or, failing that
// within its budget, killing it) before the lease can expire. thaw does
// wait its turn, and is tried again when a checkpoint command is under way.
type gate struct {
	mon checkpoint.Monitor

	frozen atomic.Bool // the guard stopped the guest
	// mu serializes the loop's stop and cont with thaw; freeze never
	// takes it.
	mu         sync.Mutex
	loopPaused bool // the checkpoint loop has the guest stopped

	omu         sync.Mutex
	out         checkpoint.Output // nil without output commit
	mayPass     bool              // the lease is trusted: output may pass unacknowledged
	passPending bool              // a PassThrough waits for the lease
}

// Execute runs a QMP command for the checkpoint loop; a cont of a frozen
// guest is kept back until the guard thaws it.
func (g *gate) Execute(ctx context.Context, command string, args, result any) error {
	switch command {
	case "stop":
		g.mu.Lock()
		defer g.mu.Unlock()
		err := g.mon.Execute(ctx, command, args, result)
		if err == nil {
			g.loopPaused = true
		}
		return err
	case "cont":
		g.mu.Lock()
		defer g.mu.Unlock()
		g.loopPaused = false
		if g.frozen.Load() {
			return nil
		}
		if err := g.mon.Execute(ctx, command, args, result); err != nil {
			return err
		}
		if g.frozen.Load() {
			// Frozen while the cont was on its way: the guard's stop
			// may have reached QEMU first.
			return g.mon.Execute(ctx, "stop", nil, nil)
		}
		return nil
	}
	return g.mon.Execute(ctx, command, args, result)
}

// freeze stops the guest, whatever the checkpoint loop is doing (a stop of
// a stopped guest is harmless); the loop's next cont is kept back.
func (g *gate) freeze(ctx context.Context) error {
	g.frozen.Store(true)
	return g.mon.Execute(ctx, "stop", nil, nil)
}

// thaw lets a frozen guest run again, unless a checkpoint has it stopped
// (its cont then resumes it). ok is false when a checkpoint's QMP command
// is under way: try again later.
func (g *gate) thaw(ctx context.Context) (ok bool, err error) {
	if !g.mu.TryLock() {
		return false, nil
	}
	defer g.mu.Unlock()
	g.frozen.Store(false)
	if g.loopPaused {
		return true, nil
	}
	return true, g.mon.Execute(ctx, "cont", nil, nil)
}

// setOutput gives the gate the output commit, once the network is set up.
func (g *gate) setOutput(out checkpoint.Output) {
	g.omu.Lock()
	defer g.omu.Unlock()
	g.out = out
}

// allowPass says whether the lease is trusted; a PassThrough that waited
// for it is done now.
func (g *gate) allowPass(ok bool) {
	g.omu.Lock()
	defer g.omu.Unlock()
	g.mayPass = ok
	if ok && g.passPending && g.out != nil {
		g.passPending = false
		g.out.PassThrough()
	}
}

// output is the output commit as the guard gates it (nil: none).
func (g *gate) output() checkpoint.Output {
	g.omu.Lock()
	defer g.omu.Unlock()
	if g.out == nil {
		return nil
	}
	return gatedOutput{g}
}

type gatedOutput struct{ g *gate }

func (o gatedOutput) Hold() error {
	o.g.omu.Lock()
	o.g.passPending = false
	o.g.omu.Unlock()
	return o.g.out.Hold()
}

func (o gatedOutput) Cut(ctx context.Context, epoch uint64) error { return o.g.out.Cut(ctx, epoch) }

func (o gatedOutput) Commit(epoch uint64) netbuffer.Release { return o.g.out.Commit(epoch) }

func (o gatedOutput) PassThrough() {
	o.g.omu.Lock()
	defer o.g.omu.Unlock()
	if !o.g.mayPass {
		o.g.passPending = true
		return
	}
	o.g.out.PassThrough()
}

// primaryGuard keeps the primary's witness lease and applies
// witness.Guard's verdict to the guest: frozen (stopped, output held) when
// the lease is not trusted and the backup does not acknowledge; thawed
// when either comes back. A lease that expired and cannot be taken back
// because the backup owns the guest now ends the primary: its guest is
// killed (see run).
type primaryGuard struct {
	w       *witness.Witness
	g       *gate
	log     *slog.Logger
	grace   time.Duration
	kill    func(ctx context.Context, reason string) error // ends the guest's QEMU
	lastAck atomic.Int64                                   // unix ns of the backup's last acknowledgement
	metrics *primaryMetrics

	mu   sync.Mutex
	snap guardSnapshot
}

// guardSnapshot is the guard's view as of its last check, for status.
type guardSnapshot struct {
	trustedFor time.Duration
	frozen     bool
	why        string
}

func (p *primaryGuard) snapshot() guardSnapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.snap
}

// acked records the backup's acknowledgement (from the checkpoint loop).
func (p *primaryGuard) acked(t time.Time) { p.lastAck.Store(t.UnixNano()) }

// run keeps the lease and guards the guest until ctx ends. It returns an
// error matching checkpoint.ErrFailedOver when the backup owns the guest
// now (the caller must kill the guest then), or checkpoint.ErrHandedOver
// when the guest could not be stopped in time and was killed.
func (p *primaryGuard) run(ctx context.Context, first witness.Lease) error {
	guard := witness.Guard{StopBudget: guardStopBudget, Grace: p.grace}
	guard.Renewed(first)
	ttl := first.TTL
	type renewal struct {
		lease witness.Lease
		err   error
	}
	renewed := make(chan renewal, 1)
	renew := func() {
		rctx, cancel := context.WithTimeout(ctx, ttl/4)
		defer cancel()
		l, err := p.w.Renew(rctx)
		if errors.Is(err, witness.ErrLeaseGone) {
			// Expired (we were cut off): take it back, if the guest is
			// still ours.
			l, err = p.w.Hold(rctx)
		}
		renewed <- renewal{l, err}
	}
	renewing := false
	nextRenew := time.Now().Add(ttl / 4)
	tick := time.NewTicker(guardPeriod)
	defer tick.Stop()
	frozen, trusted := false, true
	p.g.allowPass(true)
	var lastErr error
	for {
		select {
		case <-ctx.Done():
			if renewing {
				<-renewed
			}
			return nil
		case r := <-renewed:
			renewing = false
			switch {
			case errors.Is(r.err, witness.ErrOwnedElsewhere):
				if err := p.freezeGuest(ctx, "the backup owns the guest now"); err != nil {
					return err
				}
				return fmt.Errorf("%w: %v", checkpoint.ErrFailedOver, r.err)
			case r.err != nil:
				if lastErr == nil {
					p.log.Warn("cannot renew the witness lease", "err", r.err, "trusted_for", guard.TrustedFor(time.Now()).Round(time.Millisecond))
				}
				lastErr = r.err
			default:
				if lastErr != nil {
					p.log.Info("witness lease renewed again")
				}
				lastErr = nil
				guard.Renewed(r.lease)
			}
		case now := <-tick.C:
			if !renewing && !now.Before(nextRenew) {
				renewing, nextRenew = true, now.Add(ttl/4)
				go renew()
			}
			if ns := p.lastAck.Load(); ns != 0 {
				guard.Heard(time.Unix(0, ns))
			}
			if t := guard.LeaseTrusted(now); t != trusted {
				trusted = t
				p.g.allowPass(t)
				if !t {
					p.log.Warn("witness lease no longer trusted: the guest's output leaves only with the backup's acknowledgement")
				}
			}
			ok, why := guard.MayRun(now)
			p.mu.Lock()
			p.snap = guardSnapshot{trustedFor: guard.TrustedFor(now), frozen: !ok, why: why}
			p.mu.Unlock()
			p.metrics.witness(trusted, !ok)
			switch {
			case !ok && !frozen:
				frozen = true
				if err := p.freezeGuest(ctx, why); err != nil {
					return err
				}
			case ok && frozen:
				thawed, err := p.g.thaw(ctx)
				switch {
				case !thawed:
					// A checkpoint's QMP command is under way: next tick.
				case err != nil:
					frozen = false
					p.log.Error("continue the guest", "err", err)
				default:
					frozen = false
					p.log.Warn("guest running again: the witness lease or the backup is back")
				}
			}
		}
	}
}

// freezeGuest stops the guest within the stop budget; a guest that cannot
// be stopped in time (QEMU does not answer: a checkpoint's stop hangs) is
// killed, since the lease may run out next, and the error says so (the
// backup resumes the guest once it claims the witness).
func (p *primaryGuard) freezeGuest(ctx context.Context, why string) error {
	p.log.Error("stopping the guest: it may not run here now", "reason", why)
	sctx, cancel := context.WithTimeout(ctx, guardStopBudget-guardPeriod)
	err := p.g.freeze(sctx)
	cancel()
	if err == nil {
		return nil
	}
	p.log.Error("the guest could not be stopped in time: killing it", "err", err)
	if kerr := p.kill(context.WithoutCancel(ctx), "the witness lease may run out and the guest could not be stopped"); kerr != nil {
		return fmt.Errorf("%w: the guest could be neither stopped (%v) nor killed: %v", checkpoint.ErrHandedOver, err, kerr)
	}
	return fmt.Errorf("%w: the guest could not be stopped before the witness lease could run out (%v): it was killed", checkpoint.ErrHandedOver, err)
}

// holdPrimaryLease takes the witness for the primary at start, waiting for
// the witness while it cannot be reached; the guest may run on only once
// it holds it. ErrOwnedElsewhere: the backup resumed the guest; this copy
// must not run.
func holdPrimaryLease(ctx context.Context, w *witness.Witness, log *slog.Logger) (witness.Lease, error) {
	for warned := false; ; {
		hctx, cancel := context.WithTimeout(ctx, w.TTL())
		l, err := w.Hold(hctx)
		cancel()
		if err == nil || errors.Is(err, witness.ErrOwnedElsewhere) || ctx.Err() != nil {
			return l, err
		}
		if !warned {
			log.Warn("waiting for the witness", "err", err)
			warned = true
		}
		select {
		case <-ctx.Done():
			return l, ctx.Err()
		case <-time.After(w.TTL() / 2):
		}
	}
}

// claimFor returns the backup's claim of the witness, each attempt bounded.
func claimFor(w *witness.Witness, bound time.Duration) func(context.Context) (bool, error) {
	return func(ctx context.Context) (bool, error) {
		ctx, cancel := context.WithTimeout(ctx, bound)
		defer cancel()
		_, err := w.Claim(ctx)
		return errors.Is(err, witness.ErrHeld), err
	}
}

// keepBackupLease holds the witness for the side that resumed the guest,
// until ctx ends: claimed (again) when it expired or was never taken (a
// failover decided by the fence while the witness was down: Renew says
// ErrLeaseGone when this side holds no lease).
func keepBackupLease(ctx context.Context, w *witness.Witness, log *slog.Logger) {
	var lastErr error
	for {
		rctx, cancel := context.WithTimeout(ctx, w.TTL()/4)
		_, err := w.Renew(rctx)
		if errors.Is(err, witness.ErrLeaseGone) {
			_, err = w.Claim(rctx)
		}
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && (lastErr == nil || lastErr.Error() != err.Error()):
			log.Warn("the guest runs here; cannot hold the witness lease", "err", err)
		case err == nil && lastErr != nil:
			log.Info("holding the witness lease: the guest runs here")
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return
		case <-time.After(w.TTL() / 4):
		}
	}
}

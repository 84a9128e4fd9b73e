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
type gate struct {
	mon checkpoint.Monitor
	out checkpoint.Output // nil without output commit

	mu          sync.Mutex
	frozen      bool // the guard stopped the guest
	loopPaused  bool // the checkpoint loop stopped it (for a checkpoint)
	mayPass     bool // the lease is trusted: output may pass unacknowledged
	passPending bool // a PassThrough waits for the lease
}

// Execute runs a QMP command for the checkpoint loop; a cont of a frozen
// guest is kept back until the guard thaws it.
func (g *gate) Execute(ctx context.Context, command string, args, result any) error {
	if command != "stop" && command != "cont" {
		return g.mon.Execute(ctx, command, args, result)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if command == "cont" {
		g.loopPaused = false
		if g.frozen {
			return nil
		}
	}
	err := g.mon.Execute(ctx, command, args, result)
	if command == "stop" && err == nil {
		g.loopPaused = true
	}
	return err
}

// freeze stops the guest (unless a checkpoint has it stopped: its cont is
// then kept back).
func (g *gate) freeze(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.frozen = true
	if g.loopPaused {
		return nil
	}
	return g.mon.Execute(ctx, "stop", nil, nil)
}

// thaw lets a frozen guest run again.
func (g *gate) thaw(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.frozen = false
	if g.loopPaused {
		return nil
	}
	return g.mon.Execute(ctx, "cont", nil, nil)
}

// allowPass says whether the lease is trusted; a PassThrough that waited
// for it is done now.
func (g *gate) allowPass(ok bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.mayPass = ok
	if ok && g.passPending {
		g.passPending = false
		g.out.PassThrough()
	}
}

// output is the output commit as the guard gates it (nil: none).
func (g *gate) output() checkpoint.Output {
	if g.out == nil {
		return nil
	}
	return gatedOutput{g}
}

type gatedOutput struct{ g *gate }

func (o gatedOutput) Hold() error {
	o.g.mu.Lock()
	o.g.passPending = false
	o.g.mu.Unlock()
	return o.g.out.Hold()
}

func (o gatedOutput) Cut(ctx context.Context, epoch uint64) error { return o.g.out.Cut(ctx, epoch) }

func (o gatedOutput) Commit(epoch uint64) netbuffer.Release { return o.g.out.Commit(epoch) }

func (o gatedOutput) PassThrough() {
	o.g.mu.Lock()
	defer o.g.mu.Unlock()
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
	lastAck atomic.Int64 // unix ns of the backup's last acknowledgement

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
// now; the caller must kill the guest then.
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
				p.freezeGuest(ctx, "the backup owns the guest now")
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
			switch {
			case !ok && !frozen:
				frozen = true
				p.freezeGuest(ctx, why)
			case ok && frozen:
				frozen = false
				if err := p.g.thaw(ctx); err != nil {
					p.log.Error("continue the guest", "err", err)
				} else {
					p.log.Warn("guest running again: the witness lease or the backup is back")
				}
			}
		}
	}
}

func (p *primaryGuard) freezeGuest(ctx context.Context, why string) {
	p.log.Error("stopping the guest: it may not run here now", "reason", why)
	sctx, cancel := context.WithTimeout(ctx, guardStopBudget)
	defer cancel()
	if err := p.g.freeze(sctx); err != nil {
		p.log.Error("stop the guest", "err", err)
	}
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
// failover decided by the fence while the witness was down).
func keepBackupLease(ctx context.Context, w *witness.Witness, log *slog.Logger) {
	held := true // Renew says when it is not
	var lastErr error
	for {
		rctx, cancel := context.WithTimeout(ctx, w.TTL()/4)
		var err error
		if held {
			_, err = w.Renew(rctx)
		}
		if !held || errors.Is(err, witness.ErrLeaseGone) {
			_, err = w.Claim(rctx)
		}
		cancel()
		held = err == nil
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

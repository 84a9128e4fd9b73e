package checkpoint

import (
	"errors"
	"fmt"
	"time"
)

// PipelineConfig sets the epoch cadence.
type PipelineConfig struct {
	// Interval between the starts of two checkpoints. Default 25 ms.
	Interval time.Duration
	// MaxInFlight bounds the epochs taken but not yet acknowledged by the
	// backup. When the bound is reached no new checkpoint starts until an
	// ack arrives: a slow link lengthens epochs instead of growing memory.
	// Default 2.
	MaxInFlight int
	// MinRun is the least share of wall time the guest runs: after a pause
	// of P the next checkpoint waits until the guest has run for at least
	// P × MinRun / (1 − MinRun), so when pauses grow (a large dirty set, a
	// slow tracker) the effective epoch stretches instead of the guest
	// starving. Default DefaultMinRun (0.9: a 25 ms pause is followed by at
	// least 225 ms of running); negative: no minimum (epochs start every
	// Interval however long the pauses).
	MinRun float64
}

// Defaults for PipelineConfig.
const (
	DefaultInterval    = 25 * time.Millisecond
	DefaultMaxInFlight = 2
	DefaultMinRun      = 0.9
)

// WithDefaults fills zero fields.
func (c PipelineConfig) WithDefaults() PipelineConfig {
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	if c.MinRun == 0 {
		c.MinRun = DefaultMinRun
	}
	return c
}

// Validate rejects impossible settings.
func (c PipelineConfig) Validate() error {
	c = c.WithDefaults()
	if c.Interval < time.Millisecond {
		return fmt.Errorf("checkpoint: epoch interval %v is below 1ms", c.Interval)
	}
	if c.MaxInFlight < 1 {
		return fmt.Errorf("checkpoint: at least one epoch must be allowed in flight (got %d)", c.MaxInFlight)
	}
	if c.MinRun >= 0.99 {
		return fmt.Errorf("checkpoint: minimum run fraction %.3g leaves no time for checkpoints (at most 0.99)", c.MinRun)
	}
	return nil
}

// ErrUnexpectedAck reports an ack for an epoch that is not the oldest one in
// flight: the backup acknowledges epochs strictly in order.
var ErrUnexpectedAck = errors.New("checkpoint: unexpected ack")

// Pipeline is the primary's epoch bookkeeping as a pure state machine: it
// does no I/O and never reads the clock; the driver passes the time in and
// acts on the answers. Epochs are numbered from 1; epoch N is committed when
// the backup acknowledged it, and acks arrive in order.
type Pipeline struct {
	cfg       PipelineConfig
	next      uint64
	committed uint64
	lastStart time.Time
	// lastResume is when the guest ran again after the checkpoint begun
	// at lastStart (zero while it is being taken, and before the first).
	lastResume time.Time
	inFlight   []InFlight
}

// InFlight is an epoch taken and not yet acknowledged.
type InFlight struct {
	Epoch   uint64
	Started time.Time // when its pause began
}

// NewPipeline starts a pipeline whose first epoch is 1 and whose previous
// committed epoch is committed (0 for a fresh protection).
func NewPipeline(cfg PipelineConfig, committed uint64) (*Pipeline, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Pipeline{cfg: cfg.WithDefaults(), next: committed + 1, committed: committed}, nil
}

// Due reports whether a checkpoint should start at now: the interval since
// the last start has passed and the in-flight bound leaves room. When the
// bound is what holds it back, blocked is true.
func (p *Pipeline) Due(now time.Time) (due, blocked bool) {
	if !p.lastStart.IsZero() && now.Before(p.NextDue()) {
		return false, false
	}
	if len(p.inFlight) >= p.cfg.MaxInFlight {
		return false, true
	}
	return true, false
}

// NextDue is the earliest time at which Due can become true by the clock
// alone (an ack may be needed as well): an interval after the last start,
// and not before the guest has run its share since the last resume.
func (p *Pipeline) NextDue() time.Time {
	if p.lastStart.IsZero() {
		return time.Time{}
	}
	next := p.lastStart.Add(p.cfg.Interval)
	if run := p.lastResume.Add(p.MinRunAfter(p.lastResume.Sub(p.lastStart))); !p.lastResume.IsZero() && run.After(next) {
		next = run
	}
	return next
}

// MinRunAfter is how long the guest must run after a pause of the given
// length before the next checkpoint may start (zero without a minimum).
func (p *Pipeline) MinRunAfter(pause time.Duration) time.Duration {
	return p.cfg.MinRunAfter(pause)
}

// MinRunAfter is how long the guest must run after a pause of the given
// length before the next checkpoint may start (zero without a minimum).
func (c PipelineConfig) MinRunAfter(pause time.Duration) time.Duration {
	f := c.WithDefaults().MinRun
	if f <= 0 || pause <= 0 {
		return 0
	}
	return time.Duration(float64(pause) * f / (1 - f))
}

// Resumed records that the guest runs again, at now, after the checkpoint
// begun last: the pause since that start sets how long it must run before
// the next one (MinRun).
func (p *Pipeline) Resumed(now time.Time) {
	if !p.lastStart.IsZero() {
		p.lastResume = now
	}
}

// Begin records that the checkpoint of a new epoch started at now and
// returns its number.
func (p *Pipeline) Begin(now time.Time) uint64 {
	n := p.next
	p.next++
	p.lastStart, p.lastResume = now, time.Time{}
	p.inFlight = append(p.inFlight, InFlight{Epoch: n, Started: now})
	return n
}

// Acked records the backup's ack of epoch n and returns that epoch's record
// (its start time gives the time to ack).
func (p *Pipeline) Acked(n uint64) (InFlight, error) {
	if len(p.inFlight) == 0 || p.inFlight[0].Epoch != n {
		return InFlight{}, fmt.Errorf("%w: epoch %d (in flight: %v)", ErrUnexpectedAck, n, p.epochs())
	}
	e := p.inFlight[0]
	p.inFlight = p.inFlight[1:]
	p.committed = n
	return e, nil
}

// Committed is the newest epoch the backup acknowledged.
func (p *Pipeline) Committed() uint64 { return p.committed }

// InFlight returns the epochs taken and not yet acknowledged, oldest first.
func (p *Pipeline) InFlight() []InFlight { return append([]InFlight(nil), p.inFlight...) }

func (p *Pipeline) epochs() []uint64 {
	out := make([]uint64, len(p.inFlight))
	for i, e := range p.inFlight {
		out[i] = e.Epoch
	}
	return out
}

// Package failover decides when the primary is dead and brings the protected
// guest back on the backup from its last committed checkpoint.
//
// The failure detector is a pure state machine: it does no I/O, starts no
// goroutines and never reads the clock. The caller feeds it the time with
// every event (a frame heard from the peer, a periodic tick) and acts on what
// it returns, so every timing scenario is a deterministic table test.
package failover

import (
	"errors"
	"fmt"
	"time"
)

// DetectorConfig sets heartbeat timing.
type DetectorConfig struct {
	// Interval between heartbeats this side sends. Default 100 ms.
	Interval time.Duration
	// Timeout after the last frame heard from the peer at which the peer is
	// declared dead. Default 500 ms. Must exceed Interval.
	Timeout time.Duration
}

// Default heartbeat timing.
const (
	DefaultHeartbeatInterval = 100 * time.Millisecond
	DefaultHeartbeatTimeout  = 500 * time.Millisecond
)

// WithDefaults fills zero fields with the defaults.
func (c DetectorConfig) WithDefaults() DetectorConfig {
	if c.Interval == 0 {
		c.Interval = DefaultHeartbeatInterval
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultHeartbeatTimeout
	}
	return c
}

// Validate rejects impossible timings.
func (c DetectorConfig) Validate() error {
	c = c.WithDefaults()
	switch {
	case c.Interval < 0 || c.Timeout < 0:
		return errors.New("failover: heartbeat interval and timeout must be positive")
	case c.Timeout <= c.Interval:
		return fmt.Errorf("failover: heartbeat timeout %v must exceed the interval %v", c.Timeout, c.Interval)
	}
	return nil
}

// Detector tracks one peer's liveness.
type Detector struct {
	cfg       DetectorConfig
	lastHeard time.Time
	lastSent  time.Time
	dead      bool
	deadAt    time.Time
}

// NewDetector starts tracking at now, as if the peer had just been heard.
func NewDetector(cfg DetectorConfig, now time.Time) (*Detector, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Detector{cfg: cfg.WithDefaults(), lastHeard: now}, nil
}

// Heard records that a frame (any frame) arrived from the peer at now. It has
// no effect once the peer was declared dead: a declared failure is final.
func (d *Detector) Heard(now time.Time) {
	if !d.dead && now.After(d.lastHeard) {
		d.lastHeard = now
	}
}

// Sent records that this side sent a frame at now (any frame counts as a
// heartbeat to the peer).
func (d *Detector) Sent(now time.Time) {
	if now.After(d.lastSent) {
		d.lastSent = now
	}
}

// Verdict is what the caller must do after a Tick.
type Verdict struct {
	// SendHeartbeat: nothing was sent for an interval; send a heartbeat.
	SendHeartbeat bool
	// PeerDead is true exactly once: on the tick that declares the peer
	// dead.
	PeerDead bool
	// Silence is how long the peer has been silent.
	Silence time.Duration
}

// Tick advances the detector to now.
func (d *Detector) Tick(now time.Time) Verdict {
	v := Verdict{Silence: now.Sub(d.lastHeard)}
	if d.dead {
		return v
	}
	if now.Sub(d.lastSent) >= d.cfg.Interval {
		v.SendHeartbeat = true
	}
	if v.Silence >= d.cfg.Timeout {
		d.dead, d.deadAt = true, now
		v.PeerDead = true
		v.SendHeartbeat = false
	}
	return v
}

// HeartbeatDue reports whether a heartbeat is due at now, without judging
// the peer: for a caller that cannot weigh the peer's silence yet (it is
// busy with the peer's last message).
func (d *Detector) HeartbeatDue(now time.Time) bool {
	return !d.dead && now.Sub(d.lastSent) >= d.cfg.Interval
}

// Dead reports whether the peer was declared dead, and when.
func (d *Detector) Dead() (bool, time.Time) { return d.dead, d.deadAt }

// LastHeard is when the peer was last heard from.
func (d *Detector) LastHeard() time.Time { return d.lastHeard }

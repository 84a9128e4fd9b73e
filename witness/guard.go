package witness

import (
	"fmt"
	"time"
)

// ClockRate is how much faster etcd's clock may run than this host's, as a
// fraction: a lease etcd counts as TTL long may end after TTL*(1-ClockRate)
// by this host's clock. 5% is far beyond what NTP-disciplined or even free-
// running quartz clocks drift.
const ClockRate = 0.05

// Guard decides, from the witness lease and the backup's acknowledgements,
// whether the primary's guest may run and whether its output may leave
// without a backup's acknowledgement. It is pure: the caller feeds it the
// times (of renewals, of acknowledgements, now).
//
//   - The lease is trusted until Sent + TTL*(1-ClockRate) - StopBudget of its
//     last grant or renewal: by then the guest must be stopped, because
//     etcd may expire the lease soon after and the backup claim the guest.
//   - Without a trusted lease the guest may run only while the backup
//     acknowledges epochs (within Grace of the last acknowledgement): a
//     backup that hears the primary does not fail over, and the output
//     leaves only with its acknowledgement. Grace must be well below the
//     backup's heartbeat timeout (half of it by default).
//   - Output may pass unacknowledged (running unprotected) only under a
//     trusted lease.
type Guard struct {
	// StopBudget is how long stopping the guest may take once decided
	// (the check's period plus a QMP stop).
	StopBudget time.Duration
	// Grace is how long after the backup's last acknowledgement the guest
	// may run without a trusted lease.
	Grace time.Duration

	trusted time.Time // the lease is trusted before this
	heard   time.Time // the backup's last acknowledgement
}

// Renewed records a grant or renewal of the lease.
func (g *Guard) Renewed(l Lease) {
	until := l.Sent.Add(l.TTL - time.Duration(float64(l.TTL)*ClockRate) - g.StopBudget)
	if until.After(g.trusted) {
		g.trusted = until
	}
}

// Lost records that the lease is gone (expired, or owned elsewhere).
func (g *Guard) Lost() { g.trusted = time.Time{} }

// Heard records the backup's acknowledgement of an epoch at t.
func (g *Guard) Heard(t time.Time) {
	if t.After(g.heard) {
		g.heard = t
	}
}

// LeaseTrusted reports whether the lease still covers now.
func (g *Guard) LeaseTrusted(now time.Time) bool { return now.Before(g.trusted) }

// TrustedFor is how long the lease is still trusted (≤ 0: not).
func (g *Guard) TrustedFor(now time.Time) time.Duration { return g.trusted.Sub(now) }

// MayRun reports whether the guest may run at now, and if not, why.
func (g *Guard) MayRun(now time.Time) (bool, string) {
	if g.LeaseTrusted(now) {
		return true, ""
	}
	if !g.heard.IsZero() && now.Sub(g.heard) < g.Grace {
		return true, ""
	}
	why := "no witness lease"
	if !g.trusted.IsZero() {
		why = fmt.Sprintf("the witness lease is no longer trusted (for %v)", now.Sub(g.trusted).Round(time.Millisecond))
	}
	if g.heard.IsZero() {
		return false, why + " and no acknowledgement from the backup"
	}
	return false, fmt.Sprintf("%s and no acknowledgement from the backup for %v", why, now.Sub(g.heard).Round(time.Millisecond))
}

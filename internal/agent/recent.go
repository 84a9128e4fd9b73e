package agent

import (
	"math"
	"slices"
	"sync"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/transport"
)

// RecentStats describes the epochs the primary committed lately: those
// acknowledged in the last WindowS seconds.
type RecentStats struct {
	// WindowS is the span the figures cover: RecentWindow, or less when
	// more epochs committed in it than the primary remembers (then the
	// span since the oldest one it remembers).
	WindowS    float64 `json:"window_s"`
	EpochsPerS float64 `json:"epochs_per_s"`
	// The guest's pause per epoch (all steps), median and 99th
	// percentile; 0 without epochs in the window.
	PauseP50MS float64 `json:"pause_p50_ms"`
	PauseP99MS float64 `json:"pause_p99_ms"`
	// What the epochs (and a live sync) carried before encoding (pages ×
	// 4096, device state, disk write data) and the frame bytes sent for
	// them, per second.
	RawBytesPerS  float64 `json:"raw_bytes_per_s"`
	WireBytesPerS float64 `json:"wire_bytes_per_s"`
	// HeldOutputBytes is the guest output the relay held for a commit as
	// of the last commit (0 without remusd's relay).
	HeldOutputBytes int64 `json:"held_output_bytes"`
}

// RecentWindow is the span of RecentStats, and recentSize the most epochs
// the primary remembers for it.
const (
	RecentWindow = 10 * time.Second
	recentSize   = 4096
)

// recentEpoch is what recentEpochs remembers of one committed epoch.
type recentEpoch struct {
	acked     int64 // unix nanoseconds
	pause     time.Duration
	raw, wire int64
}

// recentEpochs remembers the newest committed epochs (at most size, the
// oldest dropped first) to describe those of the last window. It is safe
// for concurrent use; its methods do nothing on a nil *recentEpochs.
type recentEpochs struct {
	window time.Duration
	mu     sync.Mutex
	ring   []recentEpoch // up to cap(ring); once full, next is the oldest
	next   int
	held   int64 // the relay's held bytes at the last commit
	added  bool  // an epoch was added
}

func newRecentEpochs(window time.Duration, size int) *recentEpochs {
	return &recentEpochs{window: window, ring: make([]recentEpoch, 0, size)}
}

// add records a committed epoch; relay is the relay's state then (nil
// without one).
func (r *recentEpochs) add(st checkpoint.EpochStats, relay *netbuffer.Status) {
	if r == nil {
		return
	}
	e := recentEpoch{acked: st.Acked.UnixNano(), pause: st.Pause.Total(), raw: epochRawBytes(st), wire: epochWireBytes(st)}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.ring) < cap(r.ring) {
		r.ring = append(r.ring, e)
	} else {
		r.ring[r.next] = e
		r.next = (r.next + 1) % len(r.ring)
	}
	r.held = 0
	if relay != nil {
		r.held = relay.HeldBytes
	}
	r.added = true
}

// stats describes the epochs acknowledged in the window that ends at now
// (after its start, up to now); false when no epoch was ever added.
func (r *recentEpochs) stats(now time.Time) (RecentStats, bool) {
	if r == nil {
		return RecentStats{}, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.added {
		return RecentStats{}, false
	}
	end := now.UnixNano()
	start := now.Add(-r.window).UnixNano()
	span := r.window
	if len(r.ring) == cap(r.ring) {
		// Full: epochs before the oldest one held may have committed in
		// the window too; the figures cover the span since it.
		if oldest := r.ring[r.next].acked; oldest > start && oldest <= end {
			start, span = oldest, time.Duration(end-oldest)
		}
	}
	s := RecentStats{WindowS: span.Seconds(), HeldOutputBytes: r.held}
	var pauses []time.Duration
	var raw, wire int64
	for _, e := range r.ring {
		if e.acked <= start || e.acked > end {
			continue
		}
		pauses = append(pauses, e.pause)
		raw += e.raw
		wire += e.wire
	}
	if len(pauses) == 0 || span <= 0 {
		return s, true
	}
	secs := span.Seconds()
	s.EpochsPerS = float64(len(pauses)) / secs
	s.RawBytesPerS, s.WireBytesPerS = float64(raw)/secs, float64(wire)/secs
	slices.Sort(pauses)
	s.PauseP50MS, s.PauseP99MS = ms(percentile(pauses, 50)), ms(percentile(pauses, 99))
	return s, true
}

// percentile is the p-th percentile of sorted (nearest rank).
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// epochRawBytes is what an epoch (with the live sync before it) carried
// before encoding: pages × 4096, device state, disk write data.
func epochRawBytes(st checkpoint.EpochStats) int64 {
	return int64(st.DirtyPages+st.LiveSync.Pages)*transport.PageSize + int64(st.DeviceBytes) + st.DiskBytes
}

// epochWireBytes is the frame bytes sent for an epoch and the live sync
// before it.
func epochWireBytes(st checkpoint.EpochStats) int64 { return st.WireBytes + st.LiveSync.WireBytes }

package agent

import (
	"sync"
	"testing"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/netbuffer"
)

// epochAt is a committed epoch acknowledged at t whose pause (all in the
// save step) is pause.
func epochAt(t time.Time, pause time.Duration, dirty, wire int) checkpoint.EpochStats {
	return checkpoint.EpochStats{Acked: t, Pause: checkpoint.PauseStats{Save: pause}, DirtyPages: dirty, WireBytes: int64(wire)}
}

func TestRecentEpochs(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	type add struct {
		st    checkpoint.EpochStats
		relay *netbuffer.Status
	}
	// hundred: epochs 1..100 ms of pause, one every 50 ms up to t0+5s.
	var hundred []add
	for i := 1; i <= 100; i++ {
		hundred = append(hundred, add{st: epochAt(t0.Add(time.Duration(i)*50*time.Millisecond), time.Duration(i)*time.Millisecond, 1, 1000)})
	}
	for _, tc := range []struct {
		name string
		size int
		adds []add
		now  time.Time
		ok   bool
		want RecentStats
	}{
		{name: "nothing committed", size: 16, now: t0},
		{name: "empty window", size: 16, now: t0.Add(time.Minute), ok: true,
			adds: []add{{st: epochAt(t0, time.Millisecond, 1, 100), relay: &netbuffer.Status{HeldBytes: 1500}}},
			want: RecentStats{WindowS: 10, HeldOutputBytes: 1500}},
		{name: "percentiles", size: 256, adds: hundred, now: t0.Add(5 * time.Second), ok: true,
			want: RecentStats{WindowS: 10, EpochsPerS: 10, PauseP50MS: 50, PauseP99MS: 99, RawBytesPerS: 100 * 4096 / 10, WireBytesPerS: 100 * 1000 / 10}},
		{name: "old epochs age out", size: 256, now: t0.Add(12 * time.Second), ok: true,
			adds: []add{
				{st: epochAt(t0, 900*time.Millisecond, 100, 1e6)},                    // 12 s ago: out
				{st: epochAt(t0.Add(2*time.Second), 800*time.Millisecond, 100, 1e6)}, // 10 s ago: out
				{st: epochAt(t0.Add(3*time.Second), 2*time.Millisecond, 2, 10_000)},
				{st: epochAt(t0.Add(11*time.Second), 4*time.Millisecond, 3, 30_000), relay: &netbuffer.Status{HeldBytes: 64}},
			},
			want: RecentStats{WindowS: 10, EpochsPerS: 0.2, PauseP50MS: 2, PauseP99MS: 4, RawBytesPerS: 5 * 4096 / 10.0, WireBytesPerS: 4000, HeldOutputBytes: 64}},
		{name: "epochs after now are not counted", size: 16, now: t0, ok: true,
			adds: []add{{st: epochAt(t0.Add(-time.Second), 3*time.Millisecond, 0, 100)}, {st: epochAt(t0.Add(time.Second), 7*time.Millisecond, 0, 100)}},
			want: RecentStats{WindowS: 10, EpochsPerS: 0.1, PauseP50MS: 3, PauseP99MS: 3, WireBytesPerS: 10}},
		{name: "live sync and device state count", size: 16, now: t0.Add(time.Second), ok: true,
			adds: []add{{st: checkpoint.EpochStats{Acked: t0, DirtyPages: 1, DeviceBytes: 1000, DiskBytes: 24, WireBytes: 500,
				LiveSync: checkpoint.LiveSyncStats{Pages: 9, WireBytes: 49_500}}}},
			want: RecentStats{WindowS: 10, EpochsPerS: 0.1, RawBytesPerS: (10*4096 + 1024) / 10.0, WireBytesPerS: 5000}},
		{name: "more epochs than remembered", size: 10, adds: hundred, now: t0.Add(5 * time.Second), ok: true,
			// Epochs 91..100 held: the span since epoch 91 (450 ms) holds 92..100.
			want: RecentStats{WindowS: 0.45, EpochsPerS: 9 / 0.45, PauseP50MS: 96, PauseP99MS: 100, RawBytesPerS: 9 * 4096 / 0.45, WireBytesPerS: 9000 / 0.45}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRecentEpochs(RecentWindow, tc.size)
			for _, a := range tc.adds {
				r.add(a.st, a.relay)
			}
			got, ok := r.stats(tc.now)
			if ok != tc.ok || !near(got, tc.want) {
				t.Errorf("stats = %+v, %v; want %+v, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

// near compares RecentStats up to rounding.
func near(a, b RecentStats) bool {
	eq := func(x, y float64) bool { return x-y < 1e-6*(1+y) && y-x < 1e-6*(1+y) }
	return eq(a.WindowS, b.WindowS) && eq(a.EpochsPerS, b.EpochsPerS) && eq(a.PauseP50MS, b.PauseP50MS) && eq(a.PauseP99MS, b.PauseP99MS) &&
		eq(a.RawBytesPerS, b.RawBytesPerS) && eq(a.WireBytesPerS, b.WireBytesPerS) && a.HeldOutputBytes == b.HeldOutputBytes
}

func TestRecentEpochsNil(t *testing.T) {
	var r *recentEpochs
	r.add(epochAt(time.Now(), time.Millisecond, 1, 1), nil)
	if _, ok := r.stats(time.Now()); ok {
		t.Error("a nil recentEpochs has stats")
	}
}

// TestRecentEpochsConcurrent: the status handler reads while epochs
// commit (run with -race).
func TestRecentEpochsConcurrent(t *testing.T) {
	r := newRecentEpochs(RecentWindow, 64)
	t0 := time.Now()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := range 1000 {
			r.add(epochAt(t0.Add(time.Duration(i)*time.Millisecond), time.Millisecond, 1, 1), &netbuffer.Status{HeldBytes: int64(i)})
		}
	}()
	go func() {
		defer wg.Done()
		for range 1000 {
			r.stats(t0.Add(time.Second))
		}
	}()
	wg.Wait()
	if s, ok := r.stats(t0.Add(time.Second)); !ok || s.HeldOutputBytes != 999 {
		t.Errorf("after the writes: %+v, %v", s, ok)
	}
}

package failover

import (
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func ms(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }

func TestDetectorScenarios(t *testing.T) {
	type step struct {
		at        int    // ms after start
		ev        string // "heard", "sent", "tick"
		heartbeat bool   // expected on tick
		dead      bool   // expected on tick
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"steady heartbeats keep the peer alive", []step{
			{100, "tick", true, false}, {100, "sent", false, false},
			{150, "heard", false, false},
			{200, "tick", true, false}, {200, "sent", false, false},
			{550, "heard", false, false}, {600, "tick", true, false},
		}},
		{"silence of exactly the timeout declares death once", []step{
			{100, "tick", true, false}, {100, "sent", false, false},
			{499, "tick", true, false},
			{500, "tick", false, true},
			{600, "tick", false, false},
		}},
		{"a frame heard late does not revive a dead peer", []step{
			{600, "tick", false, true},
			{601, "heard", false, false},
			{700, "tick", false, false},
		}},
		{"the silence counts from the last frame heard", []step{
			{400, "heard", false, false},
			{899, "tick", true, false},
			{900, "tick", false, true},
		}},
		{"a frame from the past does not move the clock back", []step{
			{400, "heard", false, false},
			{300, "heard", false, false},
			{899, "tick", true, false},
		}},
		{"recent sends suppress heartbeats", []step{
			{50, "sent", false, false}, {120, "tick", false, false}, {150, "tick", true, false},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := NewDetector(DetectorConfig{}, t0)
			if err != nil {
				t.Fatal(err)
			}
			d.Sent(t0)
			for i, s := range tc.steps {
				switch s.ev {
				case "heard":
					d.Heard(ms(s.at))
				case "sent":
					d.Sent(ms(s.at))
				case "tick":
					v := d.Tick(ms(s.at))
					if v.SendHeartbeat != s.heartbeat || v.PeerDead != s.dead {
						t.Fatalf("step %d (tick at %d ms): heartbeat=%v dead=%v, want %v %v", i, s.at, v.SendHeartbeat, v.PeerDead, s.heartbeat, s.dead)
					}
				}
			}
		})
	}
}

func TestDetectorReportsSilenceAndTime(t *testing.T) {
	d, _ := NewDetector(DetectorConfig{Interval: 10 * time.Millisecond, Timeout: 30 * time.Millisecond}, t0)
	d.Heard(ms(5))
	v := d.Tick(ms(40))
	if !v.PeerDead || v.Silence != 35*time.Millisecond {
		t.Fatalf("verdict %+v, want dead after 35 ms of silence", v)
	}
	if dead, at := d.Dead(); !dead || !at.Equal(ms(40)) {
		t.Fatalf("Dead() = %v, %v", dead, at)
	}
}

func TestDetectorConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		c  DetectorConfig
		ok bool
	}{
		{DetectorConfig{}, true},
		{DetectorConfig{Interval: 200 * time.Millisecond}, true},
		{DetectorConfig{Interval: time.Second, Timeout: time.Second}, false},
		{DetectorConfig{Interval: time.Second, Timeout: 500 * time.Millisecond}, false},
		{DetectorConfig{Interval: -1}, false},
	} {
		if err := tc.c.Validate(); (err == nil) != tc.ok {
			t.Errorf("Validate(%+v) = %v, want ok=%v", tc.c, err, tc.ok)
		}
	}
}

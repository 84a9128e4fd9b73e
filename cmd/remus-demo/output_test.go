package main

import (
	"testing"

	"github.com/remus-kvm/remus/internal/agent"
)

func TestFormatAgentLine(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		show     bool
	}{
		{`  [remusd backup] time=2025-01-02T03:04:05.000Z level=INFO msg="waiting for the primary" vm=lab listen=127.0.0.1:4000`,
			`backup  | waiting for the primary  listen=127.0.0.1:4000`, true},
		{`  [remusd primary] time=2025-01-02T03:04:05.000Z level=WARN msg="protection lost" vm=lab err="read: connection reset" retry_in=1s`,
			`primary | WARN protection lost  err="read: connection reset" retry_in=1s`, true},
		{`  [remusd primary] time=x level=INFO msg="shipping epoch" vm=lab epoch=1 frames_sent=10`, "", false},
		{`  [remusd primary] time=x level=DEBUG msg="epoch committed" epoch=2`, "", false},
		{`  [remusd backup] failed over: VM lab resumed epoch 3 in QEMU pid 9 (detection 1 ms, restore 2 ms)`, "", false},
		{`  [remusd backup] remusd: something unexpected`, `backup  | remusd: something unexpected`, true},
		{`  [remusd-dev primary] time=x level=INFO msg="map guest RAM" vm=lab`, `primary | map guest RAM`, true},
	} {
		got, show := formatAgentLine(tc.in)
		if got != tc.want || show != tc.show {
			t.Errorf("formatAgentLine(%q) = %q, %v; want %q, %v", tc.in, got, show, tc.want, tc.show)
		}
	}
}

func TestPct(t *testing.T) {
	var eps []agent.EpochRecord
	if got := p50(eps, pauseUS); got != -1 {
		t.Errorf("p50 of nothing = %d, want -1", got)
	}
	for _, us := range []int64{50, 10, 40, 20, 30} {
		eps = append(eps, agent.EpochRecord{PauseUS: us})
	}
	if got := p50(eps, pauseUS); got != 30 {
		t.Errorf("p50 = %d, want 30", got)
	}
	if got := pct(eps, pauseUS, 0.99); got != 50 {
		t.Errorf("p99 = %d, want 50", got)
	}
}

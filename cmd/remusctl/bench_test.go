package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
)

func TestPct(t *testing.T) {
	v := []float64{}
	for i := 100; i >= 1; i-- {
		v = append(v, float64(i))
	}
	if p := pct(v); p.P50 != 50 || p.P99 != 99 {
		t.Fatalf("pct = %+v", p)
	}
	if p := pct(nil); p != (Pct{}) {
		t.Fatalf("pct(nil) = %+v", p)
	}
}

func TestCPUTime(t *testing.T) {
	start, err := cpuTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		now, err := cpuTime(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		if now > start {
			return
		}
	}
	t.Fatal("this process's CPU time did not grow while it spun")
}

// TestSummarizeAndTable: the figures come from the epoch log as recorded
// and the table shows every row.
func TestSummarizeAndTable(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var eps []agent.EpochRecord
	for i := range 11 {
		eps = append(eps, agent.EpochRecord{Epoch: uint64(i + 1), Start: t0.Add(time.Duration(i) * 50 * time.Millisecond),
			PauseUS: 20000, StopUS: 1000, HarvestUS: 10000, CopyUS: 5000, SaveUS: 3000, ContUS: 1000,
			DirtyPages: 100, DeviceBytes: 0, WireBytes: 40960, AckUS: 60000})
		if i > 0 {
			// 50 ms apart, 20 ms of it paused.
			eps[i].IntervalUS, eps[i].RanUS = 50000, 30000
		}
	}
	r := &Result{Workload: "dirtier", PauseMS: map[string]Pct{}}
	summarize(r, eps)
	if r.EpochsPerSec != 20 || r.PauseMS["harvest"].P50 != 10 || r.DirtyPages.P50 != 100 || r.RawKiB.P50 != 400 ||
		r.WireKiB.P50 != 40 || r.WireRatio != 0.1 || r.AckMS.P99 != 60 || r.RunFraction != 0.6 || r.EffectiveEpochMS.P50 != 50 {
		t.Fatalf("summary %+v", r)
	}
	var b bytes.Buffer
	printTable(&b, r)
	for _, want := range []string{"epochs/s", "pause harvest", "dirty pages/epoch", "wire KiB/epoch", "ratio 0.100", "60.0% of the time", "remusd CPU", "client unprotected", "client protected"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

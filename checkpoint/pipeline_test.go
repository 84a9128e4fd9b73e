package checkpoint

import (
	"errors"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

func TestPipelineScript(t *testing.T) {
	// Each step: an event at a time and what the pipeline must answer.
	type step struct {
		ms      int
		op      string // "due?", "begin", "resumed", "ack"
		epoch   uint64 // begin: expected number; ack: epoch acked
		due     bool
		blocked bool
		err     bool
	}
	for _, tc := range []struct {
		name  string
		cfg   PipelineConfig
		steps []step
	}{
		{"first checkpoint is due at once, then every interval", PipelineConfig{}, []step{
			{ms: 0, op: "due?", due: true}, {ms: 0, op: "begin", epoch: 1},
			{ms: 24, op: "due?"}, {ms: 25, op: "due?", due: true}, {ms: 25, op: "begin", epoch: 2},
		}},
		{"the in-flight bound holds the next epoch until an ack", PipelineConfig{MaxInFlight: 2}, []step{
			{ms: 0, op: "begin", epoch: 1}, {ms: 25, op: "begin", epoch: 2},
			{ms: 50, op: "due?", blocked: true}, {ms: 90, op: "due?", blocked: true},
			{ms: 91, op: "ack", epoch: 1},
			{ms: 91, op: "due?", due: true}, {ms: 91, op: "begin", epoch: 3},
		}},
		{"short pauses keep the interval", PipelineConfig{}, []step{
			{ms: 0, op: "begin", epoch: 1}, {ms: 2, op: "resumed"},
			{ms: 24, op: "due?"}, {ms: 25, op: "due?", due: true},
		}},
		{"a long pause stretches the epoch until the guest ran 90% of it", PipelineConfig{}, []step{
			// 20 ms paused: the guest must run 180 ms before the next.
			{ms: 0, op: "begin", epoch: 1}, {ms: 20, op: "resumed"},
			{ms: 25, op: "due?"}, {ms: 199, op: "due?"}, {ms: 200, op: "due?", due: true},
			{ms: 200, op: "begin", epoch: 2}, {ms: 202, op: "ack", epoch: 1}, {ms: 203, op: "resumed"},
			// A 3 ms pause: 27 ms of running, past the interval.
			{ms: 225, op: "due?"}, {ms: 229, op: "due?"}, {ms: 230, op: "due?", due: true},
		}},
		{"a lower share stretches less", PipelineConfig{MinRun: 0.5}, []step{
			{ms: 0, op: "begin", epoch: 1}, {ms: 20, op: "resumed"},
			{ms: 39, op: "due?"}, {ms: 40, op: "due?", due: true},
		}},
		{"without a minimum the interval alone decides", PipelineConfig{MinRun: -1}, []step{
			{ms: 0, op: "begin", epoch: 1}, {ms: 20, op: "resumed"},
			{ms: 25, op: "due?", due: true},
		}},
		{"acks must come in order", PipelineConfig{MaxInFlight: 3}, []step{
			{ms: 0, op: "begin", epoch: 1}, {ms: 25, op: "begin", epoch: 2},
			{ms: 30, op: "ack", epoch: 2, err: true},
			{ms: 31, op: "ack", epoch: 1}, {ms: 32, op: "ack", epoch: 2},
			{ms: 33, op: "ack", epoch: 2, err: true},
			{ms: 34, op: "ack", epoch: 3, err: true},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := NewPipeline(tc.cfg, 0)
			if err != nil {
				t.Fatal(err)
			}
			for i, s := range tc.steps {
				switch s.op {
				case "due?":
					due, blocked := p.Due(at(s.ms))
					if due != s.due || blocked != s.blocked {
						t.Fatalf("step %d at %d ms: due=%v blocked=%v, want %v %v", i, s.ms, due, blocked, s.due, s.blocked)
					}
				case "begin":
					if n := p.Begin(at(s.ms)); n != s.epoch {
						t.Fatalf("step %d: began epoch %d, want %d", i, n, s.epoch)
					}
				case "resumed":
					p.Resumed(at(s.ms))
					if want := at(s.ms).Add(p.MinRunAfter(at(s.ms).Sub(p.lastStart))); p.NextDue().Before(want) {
						t.Fatalf("step %d: next due %v before the guest ran its share (%v)", i, p.NextDue().Sub(t0), want.Sub(t0))
					}
				case "ack":
					e, err := p.Acked(s.epoch)
					if s.err {
						if !errors.Is(err, ErrUnexpectedAck) {
							t.Fatalf("step %d: ack of %d gave %v, want ErrUnexpectedAck", i, s.epoch, err)
						}
						continue
					}
					if err != nil || e.Epoch != s.epoch || p.Committed() != s.epoch {
						t.Fatalf("step %d: ack of %d gave %+v, %v; committed %d", i, s.epoch, e, err, p.Committed())
					}
				}
			}
		})
	}
}

func TestPipelineResumesNumbering(t *testing.T) {
	p, _ := NewPipeline(PipelineConfig{}, 41)
	if n := p.Begin(t0); n != 42 || p.Committed() != 41 {
		t.Fatalf("began %d with committed %d; want 42 after 41", n, p.Committed())
	}
	if e, _ := p.Acked(42); !e.Started.Equal(t0) {
		t.Fatalf("ack returned start %v", e.Started)
	}
}

func TestPipelineConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		c  PipelineConfig
		ok bool
	}{
		{PipelineConfig{}, true},
		{PipelineConfig{Interval: 100 * time.Microsecond}, false},
		{PipelineConfig{Interval: -time.Second}, false},
		{PipelineConfig{MaxInFlight: -1}, false},
		{PipelineConfig{MinRun: 0.95}, true},
		{PipelineConfig{MinRun: 0.99}, false},
	} {
		if err := tc.c.Validate(); (err == nil) != tc.ok {
			t.Errorf("Validate(%+v) = %v, want ok=%v", tc.c, err, tc.ok)
		}
	}
}

package stats

import (
	"testing"
	"time"
)

func TestQuantile(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i))
	}
	if q := Quantile(ds, 0.5); q != 50 {
		t.Fatalf("p50 = %v", q)
	}
	if q := Quantile(ds, 0.99); q != 99 {
		t.Fatalf("p99 = %v", q)
	}
	if q := Quantile([]time.Duration(nil), 0.5); q != 0 {
		t.Fatalf("p50 of none = %v", q)
	}
	if q := Quantile([]float64{3}, 0.99); q != 3 {
		t.Fatalf("p99 of one = %v", q)
	}
}

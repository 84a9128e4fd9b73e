package testvm_test

import (
	"slices"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testguest"
)

// BenchmarkBoot boots the test guest b.N times (QEMU start to the ready
// line on the console) and reports the median and the slowest boot. Run it
// with -benchtime Nx: `go test -run - -bench Boot -benchtime 5x ./testvm`.
func BenchmarkBoot(b *testing.B) {
	c := testguest.Config(b)
	var boots []time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		vm := testguest.Launch(b, c)
		testguest.WaitReady(b, vm)
		boots = append(boots, time.Since(start))
		b.StopTimer()
		vm.Close()
		b.StartTimer()
	}
	slices.Sort(boots)
	b.ReportMetric(float64(boots[len(boots)/2].Milliseconds()), "ms-median")
	b.ReportMetric(float64(boots[len(boots)-1].Milliseconds()), "ms-max")
}

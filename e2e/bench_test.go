package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/testvm/counter"
)

// BenchmarkProtectedGuest measures protection of the 256 MiB test guest
// dirtying 1,000 pages per 25 ms epoch: it runs the counter client for a
// while unprotected, then for protectFor under protection, then kills the
// primary and measures the failover. Run it with -benchtime=1x; every
// iteration is a whole experiment.
func BenchmarkProtectedGuest(b *testing.B) {
	const protectFor = 10 * time.Second
	for i := 0; i < b.N; i++ {
		benchOnce(b, protectFor)
	}
}

func benchOnce(b *testing.B, protectFor time.Duration) {
	l := newLab(b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootPrimary(b, l, ctx, 40000)
	prim, back, vm := g.prim, g.back, g.vm
	// The primary remusd relays the guest's network unprotected until the
	// backup is started: the same connection then measures both.
	p, err := l.Protect(prim, back, lab.ProtectOptions{HeartbeatTimeout: heartbeatTimeout, BackupLater: true})
	if err != nil {
		b.Fatal(err)
	}
	conn, err := l.Dial(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Minute))
	cl := counter.NewClient(conn)
	rate := func(d time.Duration) float64 {
		n, from := 0, time.Now()
		for time.Since(from) < d {
			if _, err := cl.Inc(); err != nil {
				b.Fatal(err)
			}
			n++
		}
		return float64(n) / time.Since(from).Seconds()
	}
	unprotected := rate(3 * time.Second)

	if err := p.StartBackup(); err != nil {
		b.Fatal(err)
	}
	if _, err := p.WaitCommitted(ctx, 1); err != nil {
		b.Fatal(err)
	}
	first, _ := p.Epochs()
	b.ResetTimer()
	protected := rate(protectFor)
	eps, err := p.Epochs()
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	eps = eps[len(first):]
	if len(eps) < 2 {
		b.Fatalf("only %d epochs committed in %v", len(eps), protectFor)
	}
	span := eps[len(eps)-1].Start.Sub(eps[0].Start).Seconds()
	b.ReportMetric(float64(len(eps)-1)/span, "epochs/s")
	field := func(name string, f func(agent.EpochRecord) float64) {
		v := make([]float64, len(eps))
		for i, e := range eps {
			v[i] = f(e)
		}
		slices.Sort(v)
		b.ReportMetric(v[len(v)/2], name+"-p50")
		b.ReportMetric(v[len(v)*99/100], name+"-p99")
	}
	field("pause-ms", func(e agent.EpochRecord) float64 { return float64(e.PauseUS) / 1000 })
	field("stop-ms", func(e agent.EpochRecord) float64 { return float64(e.StopUS) / 1000 })
	field("harvest-ms", func(e agent.EpochRecord) float64 { return float64(e.HarvestUS) / 1000 })
	field("copy-ms", func(e agent.EpochRecord) float64 { return float64(e.CopyUS) / 1000 })
	field("save-ms", func(e agent.EpochRecord) float64 { return float64(e.SaveUS) / 1000 })
	field("cont-ms", func(e agent.EpochRecord) float64 { return float64(e.ContUS) / 1000 })
	field("ack-ms", func(e agent.EpochRecord) float64 { return float64(e.AckUS) / 1000 })
	field("dirty-pages", func(e agent.EpochRecord) float64 { return float64(e.DirtyPages) })
	field("wire-KiB", func(e agent.EpochRecord) float64 { return float64(e.WireBytes) / 1024 })
	b.ReportMetric(unprotected, "unprotected-req/s")
	b.ReportMetric(protected, "protected-req/s")

	vm.Kill()
	p.Primary.Kill()
	r, err := p.WaitReport(ctx)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(r.DetectionMS, "detection-ms")
	b.ReportMetric(r.RestoreMS, "restore-ms")
	b.ReportMetric(r.LoadMS, "devload-ms")
}

package e2e

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/testvm"
	"github.com/remus-kvm/remus/testvm/counter"
)

// BenchmarkProtectedGuest measures protection of the 256 MiB test guest
// dirtying 1,000 pages per 25 ms epoch: it runs the counter client for a
// while unprotected (the primary remusd relays the network, no backup yet),
// then on the same connection for protectFor under protection with output
// commit, then kills the primary and measures the failover. Run it with -benchtime=1x; every
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
	p, cl := protectLater(b, ctx, l, prim, back)
	rate := func(d time.Duration) (float64, []time.Duration) { return incRate(b, cl, d) }
	rttMetrics := func(name string, rtts []time.Duration) { reportRTT(b, name, rtts) }
	unprotected, unprotectedRTT := rate(3 * time.Second)

	if err := p.StartBackup(); err != nil {
		b.Fatal(err)
	}
	if _, err := p.WaitCommitted(ctx, 1); err != nil {
		b.Fatal(err)
	}
	first, _ := p.Epochs()
	b.ResetTimer()
	protected, protectedRTT := rate(protectFor)
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
	// How long the guest's frames were held: each epoch's median and 99th
	// percentile, over the epochs.
	field("net-wait-epoch-p50-ms", func(e agent.EpochRecord) float64 { return float64(e.NetWaitP50US) / 1000 })
	field("net-wait-epoch-p99-ms", func(e agent.EpochRecord) float64 { return float64(e.NetWaitP99US) / 1000 })
	var peak int64
	for _, e := range eps {
		peak = max(peak, e.NetPeakBytes)
	}
	b.ReportMetric(float64(peak)/1024, "net-held-peak-KiB")
	b.ReportMetric(unprotected, "unprotected-req/s")
	b.ReportMetric(protected, "protected-req/s")
	rttMetrics("unprotected", unprotectedRTT)
	rttMetrics("protected", protectedRTT)

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

// incRate runs the counter client for d and returns requests per second
// and each request's round-trip time.
func incRate(b *testing.B, cl *counter.Client, d time.Duration) (float64, []time.Duration) {
	var rtts []time.Duration
	from := time.Now()
	for time.Since(from) < d {
		sent := time.Now()
		if _, err := cl.Inc(); err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, time.Since(sent))
	}
	return float64(len(rtts)) / time.Since(from).Seconds(), rtts
}

// reportRTT reports the median and 99th percentile of round trips.
func reportRTT(b *testing.B, name string, rtts []time.Duration) {
	slices.Sort(rtts)
	b.ReportMetric(float64(rtts[len(rtts)/2].Microseconds())/1000, name+"-rtt-ms-p50")
	b.ReportMetric(float64(rtts[len(rtts)*99/100].Microseconds())/1000, name+"-rtt-ms-p99")
}

// BenchmarkDiskGuest measures disk replication: the initial copy of a
// 1 GiB disk filled with random data, and the counter service's fsync'd
// record writes (one per request, the client waiting for each reply)
// unprotected and then protected, on the same connection. Run it with
// -benchtime=1x.
func BenchmarkDiskGuest(b *testing.B) {
	for i := 0; i < b.N; i++ {
		diskBenchOnce(b)
	}
}

func diskBenchOnce(b *testing.B) {
	const diskMiB = 1024
	l := newLab(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	fill := func(g *protectedGuest) error {
		if err := l.AddDisk(&g.prim, &g.back, diskMiB); err != nil {
			return err
		}
		f, err := os.OpenFile(g.prim.Disk, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		// Random data past the first MiB (the counter's records start at 0).
		rng := rand.New(rand.NewPCG(1, 2))
		buf := make([]byte, 1<<20)
		for off := int64(1 << 20); off < diskMiB<<20; off += int64(len(buf)) {
			for i := 0; i < len(buf); i += 8 {
				binary.LittleEndian.PutUint64(buf[i:], rng.Uint64())
			}
			if _, err := f.WriteAt(buf, off); err != nil {
				return err
			}
		}
		return nil
	}
	g := bootPrimary(b, l, ctx, 0, fill)
	p, cl := protectLater(b, ctx, l, g.prim, g.back)
	unprotected, unprotectedRTT := incRate(b, cl, 3*time.Second)

	start := time.Now()
	if err := p.StartBackup(); err != nil {
		b.Fatal(err)
	}
	if _, err := p.Primary.WaitLine(ctx, "disk in step"); err != nil {
		b.Fatal(err)
	}
	sync := time.Since(start)
	if _, err := p.WaitCommitted(ctx, 1); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	protected, protectedRTT := incRate(b, cl, 10*time.Second)
	b.StopTimer()
	b.ReportMetric(sync.Seconds(), "sync-1GiB-s")
	b.ReportMetric(float64(diskMiB)/sync.Seconds(), "sync-MiB/s")
	b.ReportMetric(unprotected, "unprotected-fsync-req/s")
	b.ReportMetric(protected, "protected-fsync-req/s")
	reportRTT(b, "unprotected", unprotectedRTT)
	reportRTT(b, "protected", protectedRTT)
}

// protectLater starts the primary remusd alone (it relays the guest's
// network unprotected until p.StartBackup) and connects a counter client,
// so that one connection measures the guest unprotected and protected.
func protectLater(b *testing.B, ctx context.Context, l *lab.Lab, prim, back testvm.Config) (*lab.Protection, *counter.Client) {
	b.Helper()
	p, err := l.Protect(prim, back, lab.ProtectOptions{HeartbeatTimeout: heartbeatTimeout, BackupLater: true})
	if err != nil {
		b.Fatal(err)
	}
	conn, err := l.Dial(ctx)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Minute))
	return p, counter.NewClient(conn)
}

package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/transport"
)

// traceEpochs is how many epochs a recorded trace holds (the first is all
// of RAM; it primes the replay's cache as it primed the primary's).
const traceEpochs = 41

// traceRAM is the test guest's RAM.
const traceRAM = 256 << 20

// BenchmarkPageTraces records the dirty pages of real guest workloads
// (idle Linux, the page dirtier, a compile-like workload that writes and
// gzips source-like text) under protection, then replays each trace
// through the page encoder with each codec choice, and with a page cache of
// all of RAM or an LRU of a quarter or a twentieth of it, and reports bytes
// on the wire per dirty page and the encoder's and decoder's CPU time per
// page.
// Run it with -benchtime=1x.
func BenchmarkPageTraces(b *testing.B) {
	for _, w := range []struct {
		name  string
		dirty int
		work  string
	}{
		{"idle", 0, ""},
		{"dirtier", 40000, ""},
		{"compile-like", 0, "compress"},
	} {
		b.Run(w.name, func(b *testing.B) {
			trace := recordTrace(b, w.dirty, w.work)
			for _, v := range []struct {
				name     string
				codecs   []transport.Codec
				lruPages int // 0: a cache of all of RAM
			}{
				{"best-of-both", nil, 0},
				{"lz4", []transport.Codec{transport.CodecLZ4}, 0},
				{"zstd", []transport.Codec{transport.CodecZstd}, 0},
				{"xor-only", []transport.Codec{}, 0},
				{"best-lru-25pct", nil, traceRAM / transport.PageSize / 4},
				{"best-lru-5pct", nil, traceRAM / transport.PageSize / 20},
			} {
				b.Run(v.name, func(b *testing.B) { replayTrace(b, trace, v.codecs, v.lruPages) })
			}
		})
	}
}

// recordTrace protects a guest running the workload and returns the trace
// file remusd recorded.
func recordTrace(b *testing.B, dirty int, work string) string {
	l := newLab(b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g := bootPrimary(b, l, ctx, dirty, func(g *protectedGuest) error { g.prim.Guest.Work = work; g.back.Guest.Work = work; return nil })
	// The guest's workload settles before protection starts.
	time.Sleep(3 * time.Second)
	trace := filepath.Join(os.TempDir(), fmt.Sprintf("remus-trace-%d-%s.rtrc", dirty, work))
	p, err := l.Protect(g.prim, g.back, lab.ProtectOptions{HeartbeatTimeout: heartbeatTimeout,
		PrimaryArgs: []string{"--trace", trace, "--trace-epochs", fmt.Sprint(traceEpochs)}})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := p.Primary.WaitLine(ctx, "page trace written"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.Remove(trace) })
	return trace
}

// replayTrace encodes the trace's epochs after the first and decodes them
// against a copy that follows along, reporting per dirty page.
func replayTrace(b *testing.B, trace string, codecs []transport.Codec, lruPages int) {
	f, err := os.Open(trace)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	r := transport.NewTraceReader(f)
	const ram = traceRAM
	enc, err := transport.NewDeltaEncoder(ram)
	if lruPages > 0 {
		enc, err = transport.NewBoundedDeltaEncoder(ram, lruPages)
	}
	if err != nil {
		b.Fatal(err)
	}
	enc.Codecs = codecs
	backup := make([]byte, ram)
	base := func(idx uint64) []byte { return backup[idx*transport.PageSize : (idx+1)*transport.PageSize] }
	var pages, wire int64
	var encT, decT time.Duration
	first := true
	b.ResetTimer()
	for {
		_, eps, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			b.Fatal(err)
		}
		for i := 0; i < len(eps); i += transport.MaxPagesPerFrame {
			run := eps[i:min(i+transport.MaxPagesPerFrame, len(eps))]
			t0 := time.Now()
			m, err := enc.Encode(run)
			if err != nil {
				b.Fatal(err)
			}
			payload, err := m.AppendPayload(nil)
			if err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			got, err := m.Expand(base)
			if err != nil {
				b.Fatal(err)
			}
			for _, pg := range got.Pages {
				copy(base(pg.Index), pg.Data)
			}
			if first {
				continue // all of RAM: primes both copies, not measured
			}
			encT += t1.Sub(t0)
			decT += time.Since(t1)
			pages += int64(len(run))
			wire += int64(len(payload) + transport.Overhead)
		}
		if first {
			// The priming allocated and touched two RAM-sized copies:
			// collect now rather than inside the measured epochs.
			runtime.GC()
		}
		first = false
	}
	b.StopTimer()
	if pages == 0 {
		b.Fatal("the trace has no dirty pages after its first epoch")
	}
	b.ReportMetric(float64(pages)/float64(traceEpochs-1), "pages/epoch")
	b.ReportMetric(float64(wire)/float64(pages), "B/page")
	b.ReportMetric(float64(wire)/float64(pages*transport.PageSize), "ratio")
	b.ReportMetric(float64(encT.Nanoseconds())/float64(pages), "enc-ns/page")
	b.ReportMetric(float64(decT.Nanoseconds())/float64(pages), "dec-ns/page")
}

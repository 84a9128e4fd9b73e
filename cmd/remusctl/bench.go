package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/internal/stats"
	"github.com/remus-kvm/remus/testvm/counter"
	"github.com/remus-kvm/remus/transport"
)

type benchOptions struct {
	Workload   string
	Dirty      int
	For, Epoch time.Duration
	RAMMiB     int
	Tracker    string
	MinRun     string
	DeltaCache int64
	Compress   bool
	QEMU       string
	Accel      string
	Remusd     string
}

// Pct is a median and a 99th percentile.
type Pct struct {
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
}

// ClientStats is the counter client's view: requests per second and round
// trips in milliseconds.
type ClientStats struct {
	ReqPerSec float64 `json:"req_per_s"`
	RTTms     Pct     `json:"rtt_ms"`
}

// FirstSync describes how protection began: from the session's live sync
// to the first epoch acknowledged, the live sync's rounds and time, the first
// pause and its pages, and how long output was held for the first epoch
// (from its pause to its ack).
type FirstSync struct {
	ToProtectedMS   float64 `json:"to_protected_ms"`
	LiveRounds      int     `json:"live_rounds"`
	LiveMS          float64 `json:"live_ms"`
	FirstPauseMS    float64 `json:"first_pause_ms"`
	FirstPausePages int     `json:"first_pause_pages"`
	OutputStallMS   float64 `json:"output_stall_ms"`
}

// RSS is the peak resident memory of the two agents, in MiB.
type RSS struct {
	Primary float64 `json:"primary"`
	Backup  float64 `json:"backup"`
}

// Result is one bench run.
type Result struct {
	Workload     string  `json:"workload"`
	RAMMiB       int     `json:"ram_mib"`
	Tracker      string  `json:"tracker"`
	Accel        string  `json:"accel"`
	AccelReason  string  `json:"accel_reason"`
	Compress     bool    `json:"compress"`
	Seconds      float64 `json:"seconds"`
	Epochs       int     `json:"epochs"`
	EpochsPerSec float64 `json:"epochs_per_s"`
	// RunFraction is the share of the protected time the guest ran
	// (the pauses' complement); EffectiveEpochMS the epochs' start-to-start
	// spacing, stretched beyond the interval when pauses are long.
	RunFraction      float64        `json:"run_fraction"`
	EffectiveEpochMS Pct            `json:"effective_epoch_ms"`
	PauseMS          map[string]Pct `json:"pause_ms"`
	DirtyPages       Pct            `json:"dirty_pages"`
	RawKiB           Pct            `json:"raw_kib"`
	WireKiB          Pct            `json:"wire_kib"`
	WireRatio        float64        `json:"wire_ratio"` // all bytes sent / all raw bytes
	AckMS            Pct            `json:"ack_ms"`
	// HarvestMSPerGiB is the harvest's p50 scaled to a GiB of guest RAM;
	// HostMemGBps the host's memory copy bandwidth measured in the same
	// run, for comparison.
	HarvestMSPerGiB float64   `json:"harvest_ms_per_gib"`
	HostMemGBps     float64   `json:"host_mem_gbps"`
	RSSMiB          RSS       `json:"rss_mib"`
	FirstSync       FirstSync `json:"first_sync"`
	// WorkloadRatio is the guest workload's throughput protected over
	// unprotected (the compile workload; 0 for the others); RTTms the
	// counter client's round trip while protected.
	WorkloadRatio float64     `json:"workload_ratio"`
	RTTms         Pct         `json:"rtt_ms"`
	RemusdCPU     float64     `json:"remusd_cpu_percent"` // of one core, primary remusd
	Unprotected   ClientStats `json:"unprotected"`
	Protected     ClientStats `json:"protected"`
}

var pauseSteps = []string{"total", "stop", "cut", "harvest", "copy", "save", "cont"}

func runBench(ctx context.Context, o benchOptions, log io.Writer) (*Result, error) {
	dirty, work := 0, ""
	switch o.Workload {
	case "idle", "counter":
	case "dirtier":
		dirty = o.Dirty
	case "compile":
		work = "compress"
	default:
		return nil, fmt.Errorf("unknown workload %q (idle, dirtier, compile or counter)", o.Workload)
	}
	fmt.Fprintf(log, "setting up: guest image, remusd, network namespace\n")
	l, err := lab.New(ctx, lab.Options{QEMU: o.QEMU, Remusd: o.Remusd, Accel: o.Accel})
	if err != nil {
		return nil, err
	}
	defer l.Close()
	prim, back := l.GuestConfig("primary", dirty), l.GuestConfig("backup", dirty)
	prim.Guest.Work, back.Guest.Work = work, work
	if o.RAMMiB > 0 {
		prim.MemoryMiB, back.MemoryMiB = o.RAMMiB, o.RAMMiB
	}
	back.RAMPath = filepath.Join(l.Dir, "backup-image.ram")
	fmt.Fprintf(log, "booting the test guest (workload %s)\n", o.Workload)
	vm, err := l.StartVM(ctx, prim)
	if err != nil {
		return nil, err
	}
	bctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := vm.WaitReady(bctx); err != nil {
		return nil, err
	}
	p, err := l.Protect(prim, back, lab.ProtectOptions{Epoch: o.Epoch, BackupLater: true,
		PrimaryArgs: primaryArgs(o)})
	if err != nil {
		return nil, err
	}
	conn, err := l.Dial(bctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	cl := counter.NewClient(conn)
	r := &Result{Workload: o.Workload, RAMMiB: prim.MemoryMiB, Tracker: o.Tracker, Accel: vm.Config.Accel, AccelReason: l.Accel.Reason, Compress: o.Compress, PauseMS: map[string]Pct{}}
	fmt.Fprintf(log, "client, unprotected, 3s\n")
	var unprotectedWork float64
	if r.Unprotected, unprotectedWork, err = clientWithWork(ctx, conn, cl, 3*time.Second); err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "starting the backup; the first sync copies all of RAM\n")
	if err := p.StartBackup(); err != nil {
		return nil, err
	}
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Minute)
	defer wcancel()
	first, err := p.WaitCommitted(wctx, 1)
	if err != nil {
		return nil, fmt.Errorf("no checkpoint committed: %w\n%s", err, p.Primary.Output())
	}
	e1 := first[0]
	// The session's start is not logged: protected after the live sync
	// plus the first epoch's pause-to-ack (it begins right after).
	r.FirstSync = FirstSync{ToProtectedMS: float64(e1.LiveSyncUS+e1.AckUS) / 1000,
		LiveRounds: e1.LiveSyncRounds, LiveMS: float64(e1.LiveSyncUS) / 1000, FirstPausePages: e1.DirtyPages,
		FirstPauseMS: float64(e1.PauseUS) / 1000, OutputStallMS: float64(e1.AckUS) / 1000}
	cpu0, err := cpuTime(p.Primary.PID())
	if err != nil {
		return nil, err
	}
	start := time.Now()
	fmt.Fprintf(log, "client, protected, %v\n", o.For)
	var protectedWork float64
	if r.Protected, protectedWork, err = clientWithWork(ctx, conn, cl, o.For); err != nil {
		return nil, err
	}
	if unprotectedWork > 0 {
		r.WorkloadRatio = protectedWork / unprotectedWork
	}
	r.RTTms = r.Protected.RTTms
	cpu1, err := cpuTime(p.Primary.PID())
	if err != nil {
		return nil, err
	}
	r.Seconds = time.Since(start).Seconds()
	r.RemusdCPU = 100 * (cpu1 - cpu0).Seconds() / r.Seconds
	eps, err := p.Epochs()
	if err != nil {
		return nil, err
	}
	eps = eps[len(first):]
	if len(eps) < 2 {
		return nil, errors.New("fewer than 2 epochs committed while protected")
	}
	summarize(r, eps)
	if r.RAMMiB > 0 {
		r.HarvestMSPerGiB = r.PauseMS["harvest"].P50 * 1024 / float64(r.RAMMiB)
	}
	r.RSSMiB.Primary, _ = peakRSS(p.Primary.PID())
	r.RSSMiB.Backup, _ = peakRSS(p.Backup.PID())
	r.HostMemGBps = memBandwidth(256 << 20)
	return r, nil
}

// primaryArgs are the bench's options for remusd primary.
func primaryArgs(o benchOptions) []string {
	args := []string{"--compress=" + strconv.FormatBool(o.Compress)}
	if o.Tracker != "" {
		args = append(args, "--tracker", o.Tracker)
	}
	if o.MinRun != "" {
		args = append(args, "--min-run", o.MinRun)
	}
	if o.DeltaCache > 0 {
		args = append(args, "--delta-cache", strconv.FormatInt(o.DeltaCache, 10))
	}
	return args
}

// clientWithWork runs the client for d and measures the guest workload's
// throughput over the same time (units per second; 0 without one).
func clientWithWork(ctx context.Context, conn interface{ SetDeadline(time.Time) error }, cl *counter.Client, d time.Duration) (ClientStats, float64, error) {
	w0, err := cl.Work()
	if err != nil {
		return ClientStats{}, 0, err
	}
	t0 := time.Now()
	cs, err := client(ctx, conn, cl, d)
	if err != nil {
		return cs, 0, err
	}
	w1, err := cl.Work()
	if err != nil {
		return cs, 0, err
	}
	return cs, float64(w1.Value-w0.Value) / time.Since(t0).Seconds(), nil
}

// peakRSS is a process's peak resident set (VmHWM) in MiB.
func peakRSS(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}

// memBandwidth measures this host's memory copy bandwidth in GB/s (bytes
// read plus written): the best of five copies of n bytes.
func memBandwidth(n int) float64 {
	src, dst := make([]byte, n), make([]byte, n)
	for i := range src {
		src[i] = byte(i)
	}
	best := time.Duration(1<<63 - 1)
	for range 5 {
		t := time.Now()
		copy(dst, src)
		best = min(best, time.Since(t))
	}
	return 2 * float64(n) / best.Seconds() / 1e9
}

// client runs INC requests back to back for d.
func client(ctx context.Context, conn interface{ SetDeadline(time.Time) error }, cl *counter.Client, d time.Duration) (ClientStats, error) {
	var rtts []float64
	from := time.Now()
	for time.Since(from) < d && ctx.Err() == nil {
		conn.SetDeadline(time.Now().Add(time.Minute))
		t := time.Now()
		if _, err := cl.Inc(); err != nil {
			return ClientStats{}, fmt.Errorf("counter client: %w", err)
		}
		rtts = append(rtts, float64(time.Since(t).Microseconds())/1000)
	}
	return ClientStats{ReqPerSec: float64(len(rtts)) / time.Since(from).Seconds(), RTTms: pct(rtts)}, ctx.Err()
}

func summarize(r *Result, eps []agent.EpochRecord) {
	r.Epochs = len(eps)
	r.EpochsPerSec = float64(len(eps)-1) / eps[len(eps)-1].Start.Sub(eps[0].Start).Seconds()
	field := func(f func(agent.EpochRecord) float64) Pct {
		v := make([]float64, len(eps))
		for i, e := range eps {
			v[i] = f(e)
		}
		return pct(v)
	}
	ms := func(us int64) float64 { return float64(us) / 1000 }
	for _, s := range pauseSteps {
		r.PauseMS[s] = field(func(e agent.EpochRecord) float64 {
			return ms(map[string]int64{"total": e.PauseUS, "stop": e.StopUS, "cut": e.CutUS, "harvest": e.HarvestUS,
				"copy": e.CopyUS, "save": e.SaveUS, "cont": e.ContUS}[s])
		})
	}
	raw := func(e agent.EpochRecord) float64 {
		return float64(int64(e.DirtyPages)*transport.PageSize+int64(e.DeviceBytes)) / 1024
	}
	var ran, spanned int64
	for _, e := range eps {
		ran, spanned = ran+e.RanUS, spanned+e.IntervalUS
	}
	if spanned > 0 {
		r.RunFraction = float64(ran) / float64(spanned)
	}
	r.EffectiveEpochMS = field(func(e agent.EpochRecord) float64 { return ms(e.IntervalUS) })
	r.DirtyPages = field(func(e agent.EpochRecord) float64 { return float64(e.DirtyPages) })
	r.RawKiB = field(raw)
	r.WireKiB = field(func(e agent.EpochRecord) float64 { return float64(e.WireBytes) / 1024 })
	r.AckMS = field(func(e agent.EpochRecord) float64 { return ms(e.AckUS) })
	var sumRaw, sumWire float64
	for _, e := range eps {
		sumRaw += raw(e)
		sumWire += float64(e.WireBytes) / 1024
	}
	r.WireRatio = sumWire / sumRaw
}

// pct is the median and 99th percentile (nearest rank); it sorts v.
func pct(v []float64) Pct {
	return Pct{P50: stats.Quantile(v, 0.5), P99: stats.Quantile(v, 0.99)}
}

// cpuTime is the user and system CPU time of a process so far.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("remusd CPU time: %w", err)
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("remusd CPU time: short /proc/%d/stat", pid)
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / 100, nil // USER_HZ
}

func printTable(w io.Writer, r *Result) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "remus-kvm bench\tworkload %s, %d MiB, tracker %s, %s, compress %v, %.1f s protected\n", r.Workload, r.RAMMiB, r.Tracker, r.Accel, r.Compress, r.Seconds)
	fmt.Fprintf(tw, "accelerator\t%s\n", r.AccelReason)
	fs := r.FirstSync
	fmt.Fprintf(tw, "first sync\tprotected after %.0f ms; live rounds %d (%.0f ms); first pause %.1f ms (%d pages); output held %.1f ms\n",
		fs.ToProtectedMS, fs.LiveRounds, fs.LiveMS, fs.FirstPauseMS, fs.FirstPausePages, fs.OutputStallMS)
	fmt.Fprintf(tw, "epochs/s\t%.2f (%d epochs)\n", r.EpochsPerSec, r.Epochs)
	fmt.Fprintf(tw, "guest ran\t%.1f%% of the time; effective epoch p50 %.1f ms, p99 %.1f ms\n", 100*r.RunFraction, r.EffectiveEpochMS.P50, r.EffectiveEpochMS.P99)
	for _, s := range pauseSteps {
		p := r.PauseMS[s]
		fmt.Fprintf(tw, "pause %s (ms)\tp50 %.2f\tp99 %.2f\n", s, p.P50, p.P99)
	}
	fmt.Fprintf(tw, "dirty pages/epoch\tp50 %.0f\tp99 %.0f\n", r.DirtyPages.P50, r.DirtyPages.P99)
	fmt.Fprintf(tw, "raw KiB/epoch\tp50 %.1f\tp99 %.1f\n", r.RawKiB.P50, r.RawKiB.P99)
	fmt.Fprintf(tw, "wire KiB/epoch\tp50 %.1f\tp99 %.1f\tratio %.3f\n", r.WireKiB.P50, r.WireKiB.P99, r.WireRatio)
	fmt.Fprintf(tw, "ack (ms)\tp50 %.1f\tp99 %.1f\n", r.AckMS.P50, r.AckMS.P99)
	fmt.Fprintf(tw, "harvest per GiB\t%.1f ms (host memory copy %.1f GB/s)\n", r.HarvestMSPerGiB, r.HostMemGBps)
	fmt.Fprintf(tw, "primary remusd CPU\t%.0f%% of a core\n", r.RemusdCPU)
	fmt.Fprintf(tw, "peak RSS (MiB)\tprimary %.0f\tbackup %.0f\n", r.RSSMiB.Primary, r.RSSMiB.Backup)
	if r.WorkloadRatio > 0 {
		fmt.Fprintf(tw, "workload protected/unprotected\t%.2f\n", r.WorkloadRatio)
	}
	fmt.Fprintf(tw, "client unprotected\t%.0f req/s\tRTT p50 %.2f ms\tp99 %.2f ms\n", r.Unprotected.ReqPerSec, r.Unprotected.RTTms.P50, r.Unprotected.RTTms.P99)
	fmt.Fprintf(tw, "client protected\t%.0f req/s\tRTT p50 %.2f ms\tp99 %.2f ms\n", r.Protected.ReqPerSec, r.Protected.RTTms.P50, r.Protected.RTTms.P99)
	tw.Flush()
}

func writeJSON(path string, r *Result) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if path == "-" {
		_, err = os.Stdout.Write(b)
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

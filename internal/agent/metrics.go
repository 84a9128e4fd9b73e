package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/netbuffer"
)

// Metrics: each agent process has a Prometheus registry of its own (not
// the client library's global one) holding its VM's metrics, each labelled
// vm, beside the Go runtime's (go_*) and the process's (process_*). Each
// agent serves it at GET /metrics on its control socket, and over TCP with
// --metrics ADDR. The agent pushes each event into the metrics (one method
// per event); the metrics never read the agent.
//
// remusd primary:
//
//	remus_epochs_committed_total             counter   epochs the backup acknowledged
//	remus_last_commit_timestamp_seconds      gauge     when the newest epoch was acknowledged (unix time)
//	remus_checkpoint_pause_seconds{step}     histogram the guest's pause per epoch, by step: stop, cut
//	                                                   (the network output cut; 0 without output commit),
//	                                                   harvest, copy, save, cont, and total
//	remus_epoch_dirty_pages                  histogram pages the guest wrote per epoch
//	remus_dirty_pages_total                  counter   their sum
//	remus_checkpoint_raw_bytes_total         counter   what the epochs and live syncs carried before encoding:
//	                                                   pages × 4096, device state, disk write data
//	remus_checkpoint_wire_bytes_total        counter   the frame bytes sent for them
//	remus_ack_latency_seconds                histogram from an epoch's pause to the backup's acknowledgement
//	remus_output_released_frames_total       counter   guest network frames the commits released (output commit)
//	remus_output_released_bytes_total        counter   their bytes
//	remus_output_held_bytes                  gauge     guest output held for a commit, as of the last commit
//	                                                   (with --net-guest: remusd's relay)
//	remus_output_peak_held_bytes             gauge     the most the relay ever held (with --net-guest)
//	remus_protected                          gauge     1 while a session with the backup has committed an epoch
//	remus_sessions_started_total             counter   sessions with the backup (connected, checkpointing)
//	remus_sessions_ended_total{reason}       counter   how they ended: stopped, peer_lost, peer_rejected,
//	                                                   failed_over, handed_over, switched_over, other
//	remus_witness_lease_trusted              gauge     1 while the witness lease is trusted (with --witness)
//	remus_witness_guest_stopped              gauge     1 while the guest is stopped for want of the lease and
//	                                                   of acknowledgements (with --witness)
//
// remusd backup:
//
//	remus_backup_epochs_applied_total            counter epochs applied to the RAM image and device state
//	remus_backup_last_apply_timestamp_seconds    gauge   when the newest epoch was applied (unix time)
//	remus_backup_failovers_total{result}         counter failovers: ok (the guest runs here) or failed
//	remus_backup_last_failover_seconds{phase}    gauge   the last failover that resumed the guest, by phase:
//	                                                     detection, clear, restore, load (as in the
//	                                                     failover report)
const MetricsPath = "/metrics"

// Buckets of the histograms.
var (
	pauseBuckets = prometheus.ExponentialBuckets(100e-6, 2, 15) // 100 µs .. 1.6 s
	ackBuckets   = prometheus.ExponentialBuckets(1e-3, 2, 14)   // 1 ms .. 8.2 s
	pageBuckets  = prometheus.ExponentialBuckets(16, 4, 10)     // 16 .. 4 Mi pages (16 GiB)
)

// pauseSteps are the step label's values, in PauseStats' order.
var pauseSteps = [...]string{"stop", "cut", "harvest", "copy", "save", "cont", "total"}

// sessionEndReasons are the reason label's values.
var sessionEndReasons = [...]string{"stopped", "peer_lost", "peer_rejected", "failed_over", "handed_over", "switched_over", "other"}

// newRegistry is an agent's registry, and the registerer that labels what
// is registered through it with the VM.
func newRegistry(vm string) (*prometheus.Registry, prometheus.Registerer) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg, prometheus.WrapRegistererWith(prometheus.Labels{"vm": vm}, reg)
}

func metricsHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

// primaryMetrics are remusd primary's. Its methods do nothing on a nil
// *primaryMetrics.
type primaryMetrics struct {
	reg *prometheus.Registry

	epochs       prometheus.Counter
	lastCommit   prometheus.Gauge
	pause        [len(pauseSteps)]prometheus.Observer
	dirty        prometheus.Histogram
	dirtyPages   prometheus.Counter
	rawBytes     prometheus.Counter
	wireBytes    prometheus.Counter
	ackLatency   prometheus.Histogram
	outFrames    prometheus.Counter
	outBytes     prometheus.Counter
	protected    prometheus.Gauge
	started      prometheus.Counter
	ended        *prometheus.CounterVec
	heldBytes    prometheus.Gauge // nil without a relay
	peakBytes    prometheus.Gauge // nil without a relay
	leaseTrust   prometheus.Gauge // nil without a witness
	guestStopped prometheus.Gauge // nil without a witness
}

// newPrimaryMetrics registers the primary's metrics for vm; those of the
// relay and of the witness only when the agent has them.
func newPrimaryMetrics(vm string, relay, witness bool) *primaryMetrics {
	reg, r := newRegistry(vm)
	f := promauto.With(r)
	counter := func(name, help string) prometheus.Counter {
		return f.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return f.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	m := &primaryMetrics{reg: reg,
		epochs:     counter("remus_epochs_committed_total", "Epochs the backup acknowledged."),
		lastCommit: gauge("remus_last_commit_timestamp_seconds", "When the newest epoch was acknowledged (unix time; 0: none yet)."),
		dirty: f.NewHistogram(prometheus.HistogramOpts{Name: "remus_epoch_dirty_pages",
			Help: "Pages the guest wrote per epoch.", Buckets: pageBuckets}),
		dirtyPages: counter("remus_dirty_pages_total", "Pages the guest wrote, summed over the epochs."),
		rawBytes: counter("remus_checkpoint_raw_bytes_total",
			"Bytes the epochs and live syncs carried before encoding: pages × 4096, device state, disk write data."),
		wireBytes: counter("remus_checkpoint_wire_bytes_total", "Frame bytes sent to the backup for the epochs and live syncs."),
		ackLatency: f.NewHistogram(prometheus.HistogramOpts{Name: "remus_ack_latency_seconds",
			Help: "Time from the start of an epoch's pause to the backup's acknowledgement.", Buckets: ackBuckets}),
		outFrames: counter("remus_output_released_frames_total", "Guest network frames released by epoch commits (output commit)."),
		outBytes:  counter("remus_output_released_bytes_total", "Bytes of the guest network frames released by epoch commits."),
		protected: gauge("remus_protected", "1 while a session with the backup has committed an epoch, else 0."),
		started:   counter("remus_sessions_started_total", "Protection sessions with the backup (connected and checkpointing)."),
		ended: f.NewCounterVec(prometheus.CounterOpts{Name: "remus_sessions_ended_total",
			Help: "Protection sessions ended, by reason: stopped, peer_lost, peer_rejected, failed_over, handed_over, switched_over, other."},
			[]string{"reason"}),
	}
	pause := f.NewHistogramVec(prometheus.HistogramOpts{Name: "remus_checkpoint_pause_seconds",
		Help:    "The guest's pause per epoch, by step (stop, cut, harvest, copy, save, cont) and in total.",
		Buckets: pauseBuckets}, []string{"step"})
	for i, step := range pauseSteps {
		m.pause[i] = pause.WithLabelValues(step)
	}
	for _, r := range sessionEndReasons {
		m.ended.WithLabelValues(r)
	}
	if relay {
		m.heldBytes = gauge("remus_output_held_bytes", "Guest network output held for a commit, as of the last commit.")
		m.peakBytes = gauge("remus_output_peak_held_bytes", "The most guest network output the relay ever held.")
	}
	if witness {
		m.leaseTrust = gauge("remus_witness_lease_trusted", "1 while the witness lease is trusted, else 0.")
		m.guestStopped = gauge("remus_witness_guest_stopped",
			"1 while the guest is stopped for want of both the witness lease and the backup's acknowledgements, else 0.")
	}
	return m
}

func (m *primaryMetrics) handler() http.Handler { return metricsHandler(m.reg) }

// committed records an acknowledged epoch; relay is the relay's state then
// (nil without one).
func (m *primaryMetrics) committed(st checkpoint.EpochStats, relay *netbuffer.Status) {
	if m == nil {
		return
	}
	m.epochs.Inc()
	m.lastCommit.Set(float64(st.Acked.UnixNano()) / 1e9)
	p := st.Pause
	for i, d := range [...]time.Duration{p.Stop, p.Cut, p.Harvest, p.Copy, p.Save, p.Cont, p.Total()} {
		m.pause[i].Observe(d.Seconds())
	}
	m.dirty.Observe(float64(st.DirtyPages))
	m.dirtyPages.Add(float64(st.DirtyPages))
	m.rawBytes.Add(float64(epochRawBytes(st)))
	m.wireBytes.Add(float64(epochWireBytes(st)))
	m.ackLatency.Observe(st.AckLatency().Seconds())
	m.outFrames.Add(float64(st.Output.Frames))
	m.outBytes.Add(float64(st.Output.Bytes))
	m.protected.Set(1)
	if relay != nil && m.heldBytes != nil {
		m.heldBytes.Set(float64(relay.HeldBytes))
		m.peakBytes.Set(float64(relay.PeakBytes))
	}
}

// sessionStarted records a session that connected to the backup.
func (m *primaryMetrics) sessionStarted() {
	if m == nil {
		return
	}
	m.started.Inc()
}

// sessionEnded records how a session ended (Primary.Run's error).
func (m *primaryMetrics) sessionEnded(err error) {
	if m == nil {
		return
	}
	m.protected.Set(0)
	m.ended.WithLabelValues(sessionEndReason(err)).Inc()
}

// witness records the witness guard's view: whether the lease is trusted,
// whether the guest is stopped for want of it.
func (m *primaryMetrics) witness(trusted, stopped bool) {
	if m == nil || m.leaseTrust == nil {
		return
	}
	m.leaseTrust.Set(b2f(trusted))
	m.guestStopped.Set(b2f(stopped))
}

// sessionEndReason classifies a session's end. A backup that may not have
// heard the end (peer_lost, even after a goodbye it did not confirm) comes
// before the backup's refusal and the planned stop, as for the deadman.
func sessionEndReason(err error) string {
	switch {
	case errors.Is(err, checkpoint.ErrFailedOver):
		return "failed_over"
	case errors.Is(err, checkpoint.ErrSwitchedOver):
		return "switched_over"
	case errors.Is(err, checkpoint.ErrHandedOver):
		return "handed_over"
	case errors.Is(err, checkpoint.ErrPeerLost):
		return "peer_lost"
	case errors.Is(err, checkpoint.ErrPeerRejected):
		return "peer_rejected"
	case err == nil, errors.Is(err, checkpoint.ErrStopped), errors.Is(err, context.Canceled):
		return "stopped"
	}
	return "other"
}

// backupMetrics are remusd backup's. Its methods do nothing on a nil
// *backupMetrics.
type backupMetrics struct {
	reg          *prometheus.Registry
	applied      prometheus.Counter
	lastApplied  prometheus.Gauge
	failovers    *prometheus.CounterVec
	lastFailover *prometheus.GaugeVec
}

func newBackupMetrics(vm string) *backupMetrics {
	reg, r := newRegistry(vm)
	f := promauto.With(r)
	m := &backupMetrics{reg: reg,
		applied:     f.NewCounter(prometheus.CounterOpts{Name: "remus_backup_epochs_applied_total", Help: "Epochs applied to the RAM image and device state."}),
		lastApplied: f.NewGauge(prometheus.GaugeOpts{Name: "remus_backup_last_apply_timestamp_seconds", Help: "When the newest epoch was applied (unix time; 0: none yet)."}),
		failovers: f.NewCounterVec(prometheus.CounterOpts{Name: "remus_backup_failovers_total",
			Help: "Failovers, by result: ok (the guest runs here) or failed."}, []string{"result"}),
		lastFailover: f.NewGaugeVec(prometheus.GaugeOpts{Name: "remus_backup_last_failover_seconds",
			Help: "The last failover that resumed the guest, by phase: detection (last frame heard to declared dead), " +
				"clear (to witness claimed or primary fenced), restore (to the guest running), load (the device state load)."},
			[]string{"phase"}),
	}
	m.failovers.WithLabelValues("ok")
	m.failovers.WithLabelValues("failed")
	return m
}

func (m *backupMetrics) handler() http.Handler { return metricsHandler(m.reg) }

// epochApplied records an epoch applied at t.
func (m *backupMetrics) epochApplied(t time.Time) {
	if m == nil {
		return
	}
	m.applied.Inc()
	m.lastApplied.Set(float64(t.UnixNano()) / 1e9)
}

// failedOver records a failover: its report, and err when it failed.
func (m *backupMetrics) failedOver(r *FailoverReport, err error) {
	if m == nil {
		return
	}
	if err != nil || r == nil {
		m.failovers.WithLabelValues("failed").Inc()
		return
	}
	m.failovers.WithLabelValues("ok").Inc()
	for phase, ms := range map[string]float64{"detection": r.DetectionMS, "clear": r.ClearMS, "restore": r.RestoreMS, "load": r.LoadMS} {
		m.lastFailover.WithLabelValues(phase).Set(ms / 1000)
	}
}

// serveMetrics serves h at MetricsPath on a TCP listener at addr until
// the returned function is called; it returns the listener's address.
func serveMetrics(ctx context.Context, addr string, h http.Handler, log *slog.Logger) (net.Addr, func(), error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("metrics listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+MetricsPath, h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	go srv.Serve(ln)
	log.Info("serving metrics", "url", "http://"+ln.Addr().String()+MetricsPath)
	return ln.Addr(), func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}, nil
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

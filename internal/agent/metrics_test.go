package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/netbuffer"
)

// scrape parses a text exposition into sample → value ("name{labels}",
// labels as the exposition writes them).
func scrape(t *testing.T, body io.Reader) map[string]float64 {
	t.Helper()
	samples := map[string]float64{}
	sc := bufio.NewScanner(body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("exposition line %q: %v", line, err)
		}
		samples[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return samples
}

// scrapeHandler scrapes h as Prometheus would.
func scrapeHandler(t *testing.T, h http.Handler) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, MetricsPath, nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", MetricsPath, rec.Code, rec.Body)
	}
	return scrape(t, rec.Body)
}

// expect checks samples against want (a missing sample reads as NaN).
func expect(t *testing.T, samples map[string]float64, want map[string]float64) {
	t.Helper()
	for name, w := range want {
		got, ok := samples[name]
		if !ok {
			got = math.NaN()
		}
		if !(math.Abs(got-w) <= 1e-9*math.Max(1, math.Abs(w))) {
			t.Errorf("%s = %v, want %v", name, got, w)
		}
	}
}

func TestPrimaryMetrics(t *testing.T) {
	m := newPrimaryMetrics("web1", true, true)
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	first := checkpoint.EpochStats{Epoch: 1, Start: t0, Acked: t0.Add(40 * time.Millisecond),
		Pause: checkpoint.PauseStats{Stop: time.Millisecond, Cut: 100 * time.Microsecond, Harvest: 2 * time.Millisecond,
			Copy: 3 * time.Millisecond, Save: 4 * time.Millisecond, Cont: 500 * time.Microsecond},
		DirtyPages: 100, DeviceBytes: 1000, DiskBytes: 512, WireBytes: 50_000,
		Output:   netbuffer.Release{Epoch: 1, Frames: 3, Bytes: 300},
		LiveSync: checkpoint.LiveSyncStats{Rounds: 2, Pages: 10, WireBytes: 7000}}
	second := checkpoint.EpochStats{Epoch: 2, Start: t0.Add(100 * time.Millisecond), Acked: t0.Add(120 * time.Millisecond),
		Pause:      checkpoint.PauseStats{Stop: time.Millisecond, Harvest: time.Millisecond, Copy: time.Millisecond, Save: time.Millisecond, Cont: time.Millisecond},
		DirtyPages: 200, DeviceBytes: 1000, WireBytes: 20_000, Output: netbuffer.Release{Epoch: 2, Frames: 1, Bytes: 60}}

	m.sessionStarted()
	m.witness(true, false)
	m.committed(first, &netbuffer.Status{HeldBytes: 4096, PeakBytes: 9000})
	samples := scrapeHandler(t, m.handler())
	expect(t, samples, map[string]float64{
		`remus_protected{vm="web1"}`:                     1,
		`remus_epochs_committed_total{vm="web1"}`:        1,
		`remus_sessions_started_total{vm="web1"}`:        1,
		`remus_witness_lease_trusted{vm="web1"}`:         1,
		`remus_witness_guest_stopped{vm="web1"}`:         0,
		`remus_output_held_bytes{vm="web1"}`:             4096,
		`remus_output_peak_held_bytes{vm="web1"}`:        9000,
		`remus_last_commit_timestamp_seconds{vm="web1"}`: float64(t0.Unix()) + 0.04,
	})

	m.committed(second, &netbuffer.Status{HeldBytes: 0, PeakBytes: 9000})
	m.witness(false, true)
	m.sessionEnded(fmt.Errorf("%w: no frame from the backup for 500ms", checkpoint.ErrPeerLost))
	m.sessionStarted()
	m.sessionEnded(fmt.Errorf("%w: epoch 7", checkpoint.ErrSwitchedOver))

	samples = scrapeHandler(t, m.handler())
	expect(t, samples, map[string]float64{
		`remus_epochs_committed_total{vm="web1"}`:                                  2,
		`remus_last_commit_timestamp_seconds{vm="web1"}`:                           float64(t0.Unix()) + 0.12,
		`remus_checkpoint_pause_seconds_count{step="total",vm="web1"}`:             2,
		`remus_checkpoint_pause_seconds_sum{step="total",vm="web1"}`:               0.0106 + 0.005,
		`remus_checkpoint_pause_seconds_sum{step="stop",vm="web1"}`:                0.002,
		`remus_checkpoint_pause_seconds_sum{step="cut",vm="web1"}`:                 0.0001,
		`remus_checkpoint_pause_seconds_sum{step="harvest",vm="web1"}`:             0.003,
		`remus_checkpoint_pause_seconds_sum{step="copy",vm="web1"}`:                0.004,
		`remus_checkpoint_pause_seconds_sum{step="save",vm="web1"}`:                0.005,
		`remus_checkpoint_pause_seconds_sum{step="cont",vm="web1"}`:                0.0015,
		`remus_checkpoint_pause_seconds_bucket{step="save",vm="web1",le="0.0032"}`: 1,
		`remus_epoch_dirty_pages_count{vm="web1"}`:                                 2,
		`remus_epoch_dirty_pages_bucket{vm="web1",le="64"}`:                        0,
		`remus_epoch_dirty_pages_bucket{vm="web1",le="256"}`:                       2,
		`remus_dirty_pages_total{vm="web1"}`:                                       300,
		`remus_checkpoint_raw_bytes_total{vm="web1"}`:                              (100+10)*4096 + 1000 + 512 + 200*4096 + 1000,
		`remus_checkpoint_wire_bytes_total{vm="web1"}`:                             50_000 + 7000 + 20_000,
		`remus_ack_latency_seconds_count{vm="web1"}`:                               2,
		`remus_ack_latency_seconds_sum{vm="web1"}`:                                 0.06,
		`remus_output_released_frames_total{vm="web1"}`:                            4,
		`remus_output_released_bytes_total{vm="web1"}`:                             360,
		`remus_output_held_bytes{vm="web1"}`:                                       0,
		`remus_protected{vm="web1"}`:                                               0,
		`remus_witness_lease_trusted{vm="web1"}`:                                   0,
		`remus_witness_guest_stopped{vm="web1"}`:                                   1,
		`remus_sessions_started_total{vm="web1"}`:                                  2,
		`remus_sessions_ended_total{reason="peer_lost",vm="web1"}`:                 1,
		`remus_sessions_ended_total{reason="switched_over",vm="web1"}`:             1,
		`remus_sessions_ended_total{reason="stopped",vm="web1"}`:                   0,
		`remus_sessions_ended_total{reason="other",vm="web1"}`:                     0,
	})
	// The process's own metrics come along, without the vm label.
	if _, ok := samples["go_goroutines"]; !ok {
		t.Error("no go_goroutines in the scrape")
	}
}

// TestPrimaryMetricsWithoutRelayOrWitness: the relay's and the witness's
// metrics exist only where the agent has them.
func TestPrimaryMetricsWithoutRelayOrWitness(t *testing.T) {
	m := newPrimaryMetrics("web1", false, false)
	m.witness(true, false)
	m.committed(checkpoint.EpochStats{Epoch: 1}, nil)
	samples := scrapeHandler(t, m.handler())
	for name := range samples {
		if strings.HasPrefix(name, "remus_witness_") || strings.HasPrefix(name, "remus_output_held") || strings.HasPrefix(name, "remus_output_peak") {
			t.Errorf("%s exported without a relay or a witness", name)
		}
	}
	expect(t, samples, map[string]float64{`remus_epochs_committed_total{vm="web1"}`: 1})
	var nilMetrics *primaryMetrics
	nilMetrics.committed(checkpoint.EpochStats{}, nil) // no panic
	nilMetrics.sessionEnded(nil)
}

func TestSessionEndReason(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, "stopped"},
		{fmt.Errorf("%w: shutdown", checkpoint.ErrStopped), "stopped"},
		{context.Canceled, "stopped"},
		// A goodbye the backup did not confirm: it may still resume.
		{fmt.Errorf("%w; the backup did not confirm the end: %w", fmt.Errorf("%w: shutdown", checkpoint.ErrStopped), checkpoint.ErrPeerLost), "peer_lost"},
		{fmt.Errorf("%w: no frame from the backup for 500ms", checkpoint.ErrPeerLost), "peer_lost"},
		{fmt.Errorf("%w: epoch 3: corrupt", checkpoint.ErrPeerRejected), "peer_rejected"},
		{fmt.Errorf("%w: the guest runs on the backup", checkpoint.ErrFailedOver), "failed_over"},
		{fmt.Errorf("%w: stop: deadline exceeded", checkpoint.ErrHandedOver), "handed_over"},
		{fmt.Errorf("%w: epoch 9", checkpoint.ErrSwitchedOver), "switched_over"},
		{errors.New("harvest dirty pages: EIO"), "other"},
	} {
		if got := sessionEndReason(tc.err); got != tc.want {
			t.Errorf("sessionEndReason(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

func TestBackupMetrics(t *testing.T) {
	m := newBackupMetrics("web1")
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	m.epochApplied(t0)
	m.epochApplied(t0.Add(250 * time.Millisecond))
	m.failedOver(&FailoverReport{VM: "web1"}, errors.New("QEMU did not start"))
	m.failedOver(&FailoverReport{VM: "web1", DetectionMS: 510, ClearMS: 2100, RestoreMS: 290, LoadMS: 120}, nil)
	expect(t, scrapeHandler(t, m.handler()), map[string]float64{
		`remus_backup_epochs_applied_total{vm="web1"}`:                    2,
		`remus_backup_last_apply_timestamp_seconds{vm="web1"}`:            float64(t0.Unix()) + 0.25,
		`remus_backup_failovers_total{result="ok",vm="web1"}`:             1,
		`remus_backup_failovers_total{result="failed",vm="web1"}`:         1,
		`remus_backup_last_failover_seconds{phase="detection",vm="web1"}`: 0.51,
		`remus_backup_last_failover_seconds{phase="clear",vm="web1"}`:     2.1,
		`remus_backup_last_failover_seconds{phase="restore",vm="web1"}`:   0.29,
		`remus_backup_last_failover_seconds{phase="load",vm="web1"}`:      0.12,
	})
}

// TestControlSocketServesMetrics: GET /metrics on the primary's control
// socket answers its metrics, beside GET /status.
func TestControlSocketServesMetrics(t *testing.T) {
	ctx := t.Context()
	s := &primarySession{cfg: PrimaryConfig{VM: "web1"}, log: slog.New(slog.DiscardHandler),
		metrics: newPrimaryMetrics("web1", false, false)}
	sock := filepath.Join(t.TempDir(), "remusd.sock")
	stop, err := s.serveControl(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	s.metrics.sessionStarted()
	s.metrics.committed(checkpoint.EpochStats{Epoch: 1, DirtyPages: 7}, nil)

	cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://remusd"+MetricsPath, nil)
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("GET %s: %s, Content-Type %q", MetricsPath, resp.Status, resp.Header.Get("Content-Type"))
	}
	expect(t, scrape(t, resp.Body), map[string]float64{
		`remus_epochs_committed_total{vm="web1"}`: 1,
		`remus_dirty_pages_total{vm="web1"}`:      7,
		`remus_protected{vm="web1"}`:              1,
	})

	var st PrimaryStatus
	if err := CallControl(ctx, sock, http.MethodGet, ControlStatusPath, 5*time.Second, &st); err != nil || st.VM != "web1" {
		t.Fatalf("GET %s: %+v, %v", ControlStatusPath, st, err)
	}
}

// TestMetricsListener: --metrics serves the same registry over TCP.
func TestMetricsListener(t *testing.T) {
	m := newBackupMetrics("web1")
	m.epochApplied(time.Unix(1_700_000_000, 0))
	addr, stop, err := serveMetrics(t.Context(), "127.0.0.1:0", m.handler(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	resp, err := http.Get("http://" + addr.String() + MetricsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", MetricsPath, resp.Status)
	}
	expect(t, scrape(t, resp.Body), map[string]float64{
		`remus_backup_epochs_applied_total{vm="web1"}`:         1,
		`remus_backup_last_apply_timestamp_seconds{vm="web1"}`: 1_700_000_000,
	})
}

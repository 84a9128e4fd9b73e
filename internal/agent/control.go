package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
)

// The control socket: each agent serves a small HTTP API on a unix socket
// (mode 0600: root, or the user running remusd) for remusctl. Both answer
//
//	GET  /status      PrimaryStatus or BackupStatus as JSON (see Role)
//	GET  /metrics     the agent's Prometheus metrics (see metrics.go)
//
// and remusd primary also
//
//	POST /switchover  move the guest to the backup; answers once done
//	                  (200, SwitchoverResult) or refused/abandoned (409,
//	                  {"error": ...})
//	POST /unprotect   end protection as SIGTERM does (the session says
//	                  goodbye, the mirror job and its node go, the
//	                  capabilities remusd changed are restored, output
//	                  passes) and exit; answers once the session ended
//	                  (200, UnprotectResult)
const (
	ControlStatusPath     = "/status"
	ControlSwitchoverPath = "/switchover"
	ControlUnprotectPath  = "/unprotect"
)

// UnprotectResult is what POST /unprotect answers.
type UnprotectResult struct {
	// Confirmed: the backup confirmed that it will not resume the guest,
	// which runs on here, unprotected. Otherwise the backup (unreachable)
	// may resume it: the deadman stops the guest here as the agent exits.
	Confirmed bool   `json:"backup_confirmed"`
	Result    string `json:"result"`
}

// DefaultControlSocket is the control socket of an agent whose state
// directory is stateDir.
func DefaultControlSocket(stateDir string) string { return stateDir + "/remusd.sock" }

// PrimaryStatus is what GET /status answers on the primary.
type PrimaryStatus struct {
	VM   string `json:"vm"`
	Role string `json:"role"`
	// State: syncing (a session copies guest RAM to the backup while the
	// guest runs: Sync says how far; nothing is resumable yet),
	// protecting (a session with the backup committed epochs),
	// unprotected (no backup answers; the guest runs on alone), or
	// stopped (the guest is stopped here: no witness lease and no
	// acknowledging backup).
	State          string      `json:"state"`
	Why            string      `json:"why,omitempty"`
	Sync           *SyncStatus `json:"sync,omitempty"`
	CommittedEpoch uint64      `json:"committed_epoch"`
	CommittedAt    time.Time   `json:"committed_at,omitzero"`
	Witness        string      `json:"witness_id,omitempty"`
	LeaseLeftMS    float64     `json:"lease_trusted_for_ms,omitempty"`
	// What the witness says now: the guest's owner and the side holding
	// a live lease (WitnessError when it could not be read).
	WitnessOwner  string `json:"witness_owner,omitempty"`
	WitnessActive string `json:"witness_active,omitempty"`
	WitnessError  string `json:"witness_error,omitempty"`
	// Peer is the backup's address (--peer).
	Peer string `json:"peer,omitempty"`
	// Recent describes the epochs committed in the last RecentWindow;
	// absent before the first commit.
	Recent *RecentStats `json:"recent,omitempty"`
}

// BackupStatus is what GET /status answers on the backup.
type BackupStatus struct {
	VM   string `json:"vm"`
	Role string `json:"role"`
	// State: waiting (nothing to resume: no epoch committed yet, or the
	// primary started a new session or ended its own), standby (holds a
	// committed epoch: the guest resumes from it if the primary is lost),
	// failing-over (the primary went silent: fencing its host, claiming
	// the witness, or resuming the guest here), failed-over (the guest
	// runs here) or failover-failed (Why says what failed): the
	// Backup* constants.
	State string `json:"state"`
	Why   string `json:"why,omitempty"`
	// The newest epoch this agent committed, and when; resumable in the
	// standby state only.
	CommittedEpoch uint64    `json:"committed_epoch"`
	CommittedAt    time.Time `json:"committed_at,omitzero"`
	// Primary is the address the current or last primary session came
	// from.
	Primary string `json:"primary,omitempty"`
	// Failover is the failover's report, once one ended (the failed one's
	// as far as it got).
	Failover *FailoverReport `json:"failover,omitempty"`
}

// SyncStatus is the progress of a session's initial copy of guest RAM.
type SyncStatus struct {
	Round    int     `json:"round"`     // rounds of the live sync: the first sends all of RAM, each later one what was written since
	Pages    int     `json:"pages"`     // pages sent so far
	RAMPages int     `json:"ram_pages"` // pages of guest RAM
	Percent  float64 `json:"percent"`   // of RAM sent at least once
}

// SwitchoverResult is what a completed POST /switchover answers.
type SwitchoverResult struct {
	Result string  `json:"result"`
	TookMS float64 `json:"took_ms"`
}

// UnixHTTPClient is an HTTP client that sends every request to the unix
// socket socket (a control socket), whatever the URL's host; timeout
// bounds each request (0: no bound).
func UnixHTTPClient(socket string, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}}}
}

// CallControl makes one request on the control socket and decodes the
// JSON answer into out (or, when out is a *[]byte, stores it as it came),
// or returns the agent's error.
func CallControl(ctx context.Context, socket, method, path string, timeout time.Duration, out any) error {
	cl := UnixHTTPClient(socket, timeout)
	req, err := http.NewRequestWithContext(ctx, method, "http://remusd"+path, nil)
	if err != nil {
		return err
	}
	resp, err := cl.Do(req)
	if err != nil {
		return fmt.Errorf("control socket %s (is remusd running?): %w", socket, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("control socket %s: %w", socket, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e controlError
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("control socket %s: %s: %s", socket, resp.Status, strings.TrimSpace(string(body)))
	}
	if raw, ok := out.(*[]byte); ok {
		*raw = body
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("control socket %s: answer: %w", socket, err)
	}
	return nil
}

type controlError struct {
	Error string `json:"error"`
}

// serveSocket serves mux on a unix socket at path (mode 0600) until the
// returned function is called; that function lets answers under way go
// out (for up to 3 s) and removes the socket.
func serveSocket(ctx context.Context, path string, mux *http.ServeMux, log *slog.Logger) (func(), error) {
	os.Remove(path)
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	go srv.Serve(ln)
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		os.Remove(path)
	}, nil
}

// serveBackupControl serves the backup's control socket (GET /status, GET
// /metrics) until the returned function is called.
func serveBackupControl(ctx context.Context, path string, st *backupState, m *backupMetrics, log *slog.Logger) (func(), error) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ControlStatusPath, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, st.status())
	})
	mux.Handle("GET "+MetricsPath, m.handler())
	return serveSocket(ctx, path, mux, log)
}

// serveControl serves the primary's control socket until the returned
// function is called; it lets a switchover's answer go out first.
func (s *primarySession) serveControl(ctx context.Context, path string) (func(), error) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ControlStatusPath, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.status(r.Context()))
	})
	mux.Handle("GET "+MetricsPath, s.metrics.handler())
	mux.HandleFunc("POST "+ControlSwitchoverPath, func(w http.ResponseWriter, r *http.Request) {
		p := s.current.Load()
		if p == nil {
			writeJSON(w, http.StatusConflict, controlError{"switchover refused: the guest is not protected now (no session with a backup)"})
			return
		}
		start := time.Now()
		sctx, cancel := context.WithTimeout(r.Context(), checkpoint.DefaultSwitchoverTimeout+5*time.Second)
		defer cancel()
		s.log.Info("switchover requested")
		err := p.Switchover(sctx)
		if !errors.Is(err, checkpoint.ErrSwitchedOver) {
			writeJSON(w, http.StatusConflict, controlError{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, SwitchoverResult{Result: err.Error(), TookMS: ms(time.Since(start))})
	})
	mux.HandleFunc("POST "+ControlUnprotectPath, func(w http.ResponseWriter, r *http.Request) {
		s.log.Info("protection ends: asked on the control socket")
		s.unprotect()
		select {
		case <-s.looped:
		case <-r.Context().Done():
			return
		}
		res := UnprotectResult{Confirmed: s.backupWillNotResume()}
		if res.Confirmed {
			res.Result = "unprotected: the backup confirmed it will not resume the guest; the guest runs on here; this agent exits"
		} else {
			res.Result = "the backup did not confirm the end (unreachable?) and may resume the guest: the deadman stops it here as this agent exits"
		}
		writeJSON(w, http.StatusOK, res)
	})
	return serveSocket(ctx, path, mux, s.log)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// status describes the primary now.
func (s *primarySession) status(ctx context.Context) PrimaryStatus {
	st := PrimaryStatus{VM: s.cfg.VM, Role: "primary", State: "unprotected", Why: "no session with a backup has committed an epoch", Peer: s.cfg.Peer}
	if last := s.lastCommit.Load(); last != nil {
		st.CommittedEpoch, st.CommittedAt = last.Epoch, last.Acked
	}
	if r, ok := s.recent.stats(time.Now()); ok {
		st.Recent = &r
	}
	if cur := s.current.Load(); cur != nil && s.protected.Load() {
		st.State, st.Why = "protecting", ""
	} else if cur != nil {
		if sp := cur.SyncProgress(); sp.Syncing {
			st.State, st.Why = "syncing", "copying guest RAM to the backup while the guest runs; nothing is resumable before the first epoch commits"
			st.Sync = &SyncStatus{Round: sp.Round, Pages: sp.Pages, RAMPages: sp.RAMPages}
			if sp.RAMPages > 0 {
				st.Sync.Percent = 100 * float64(min(sp.Pages, sp.RAMPages)) / float64(sp.RAMPages)
			}
		}
	}
	if s.guard != nil {
		st.Witness = s.guard.w.ID()
		g := s.guard.snapshot()
		st.LeaseLeftMS = ms(max(g.trustedFor, 0))
		if g.frozen {
			st.State, st.Why = "stopped", g.why
		}
		wctx, cancel := context.WithTimeout(ctx, time.Second)
		ws, err := s.guard.w.Status(wctx)
		cancel()
		if err != nil {
			st.WitnessError = err.Error()
		}
		st.WitnessOwner, st.WitnessActive = ws.Owner, ws.Active
	}
	return st
}

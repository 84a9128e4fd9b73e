package daemon

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// controlMux serves remusctl's API (api.go).
func (d *Daemon) controlMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+pathVMs, func(w http.ResponseWriter, r *http.Request) {
		out := []VMStatus{}
		for _, v := range d.list() {
			out = append(out, d.status(r.Context(), v))
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET "+pathVMs+"/{name}", func(w http.ResponseWriter, r *http.Request) {
		v := d.get(r.PathValue("name"))
		if v == nil {
			writeError(w, errorf(http.StatusNotFound, "%s: not protected by this host's remusd (neither primary nor backup here)", r.PathValue("name")))
			return
		}
		writeJSON(w, http.StatusOK, d.status(r.Context(), v))
	})
	mux.HandleFunc("POST "+pathVMs+"/{name}/protect", func(w http.ResponseWriter, r *http.Request) {
		var req ProtectRequest
		if err := readJSON(r.Body, &req); err != nil {
			writeError(w, err)
			return
		}
		st, err := d.Protect(r.Context(), r.PathValue("name"), req)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("POST "+pathVMs+"/{name}/unprotect", func(w http.ResponseWriter, r *http.Request) {
		res, err := d.Unprotect(r.Context(), r.PathValue("name"))
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("POST "+pathVMs+"/{name}/switchover", func(w http.ResponseWriter, r *http.Request) {
		res, err := d.Switchover(r.Context(), r.PathValue("name"))
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("POST "+pathHook, func(w http.ResponseWriter, r *http.Request) {
		var ev HookEvent
		if err := readJSON(r.Body, &ev); err != nil {
			writeError(w, err)
			return
		}
		msg := d.Hook(ev)
		writeJSON(w, http.StatusAccepted, Result{Result: msg})
	})
	mux.Handle("GET "+pathMetrics, d.metricsHandler())
	return mux
}

// metricsHandler serves the daemon's and its agents' metrics.
func (d *Daemon) metricsHandler() http.Handler {
	return promhttp.HandlerFor(d.gatherer(), promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// peerMux serves the peer daemon's API, every request authenticated.
func (d *Daemon) peerMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+pathHello, func(w http.ResponseWriter, r *http.Request) {
		h, err := d.hello(r.Context())
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, h)
	})
	mux.HandleFunc("POST "+pathStandby, func(w http.ResponseWriter, r *http.Request) {
		var req StandbyRequest
		if err := readJSON(r.Body, &req); err != nil {
			writeError(w, err)
			return
		}
		rep, err := d.Standby(r.Context(), req)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, rep)
	})
	mux.HandleFunc("POST "+pathRelease, func(w http.ResponseWriter, r *http.Request) {
		var req ReleaseRequest
		if err := readJSON(r.Body, &req); err != nil {
			writeError(w, err)
			return
		}
		res, err := d.Release(r.Context(), req.VM)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("GET "+pathPeerVMs+"/{name}", func(w http.ResponseWriter, r *http.Request) {
		v := d.get(r.PathValue("name"))
		if v == nil {
			writeError(w, errorf(http.StatusNotFound, "%s: not protected by remusd on %s", r.PathValue("name"), d.cfg.Host))
			return
		}
		writeJSON(w, http.StatusOK, d.status(r.Context(), v))
	})
	return d.authenticate(mux)
}

// authenticate refuses peer requests without a valid AuthHeader.
func (d *Daemon) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
		if err != nil {
			writeError(w, errorf(http.StatusBadRequest, "request: %v", err))
			return
		}
		if err := VerifyRequest(d.cfg.Key, r.Header.Get(AuthHeader), r.Method, r.URL.Path, d.clock(), body); err != nil {
			d.log.Warn("peer request refused", "from", r.RemoteAddr, "path", r.URL.Path, "err", err)
			writeError(w, errorf(http.StatusUnauthorized, "%v", err))
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		next.ServeHTTP(w, r)
	})
}

func (d *Daemon) hello(ctx context.Context) (Hello, error) {
	hv, lib, err := d.hv.versions(ctx)
	if err != nil {
		return Hello{}, errorf(http.StatusServiceUnavailable, "libvirt on %s: %v", d.cfg.Host, err)
	}
	return Hello{Host: d.cfg.Host, API: APIVersion, HypervisorVersion: hv, LibvirtVersion: lib}, nil
}

// agentTimeout bounds a call on an agent's control socket for status.
const agentTimeout = 2 * time.Second

func sortVMs(vs []*vm) {
	slices.SortFunc(vs, func(a, b *vm) int { return strings.Compare(a.snapshot().Name, b.snapshot().Name) })
}

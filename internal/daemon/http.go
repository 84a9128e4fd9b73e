package daemon

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/url"
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
		st := d.status(r.Context(), v)
		d.peerView(r.Context(), &st)
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("POST "+pathVMs+"/{name}/protect", handle(func(r *http.Request, req ProtectRequest) (any, error) {
		return d.Protect(r.Context(), r.PathValue("name"), req)
	}))
	mux.HandleFunc("POST "+pathVMs+"/{name}/unprotect", handle(func(r *http.Request, _ struct{}) (any, error) {
		return d.Unprotect(r.Context(), r.PathValue("name"))
	}))
	mux.HandleFunc("POST "+pathVMs+"/{name}/switchover", handle(func(r *http.Request, _ struct{}) (any, error) {
		return d.Switchover(r.Context(), r.PathValue("name"))
	}))
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
	mux.HandleFunc("POST "+pathStandby, handle(func(r *http.Request, req StandbyRequest) (any, error) {
		return d.Standby(r.Context(), req)
	}))
	mux.HandleFunc("POST "+pathRelease, handle(func(r *http.Request, req ReleaseRequest) (any, error) {
		return d.Release(r.Context(), req.VM)
	}))
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

// peerView adds the peer daemon's view of the VM to st.
func (d *Daemon) peerView(ctx context.Context, st *VMStatus) {
	if st.Peer == "" {
		return
	}
	p, err := d.peer(st.Peer)
	if err == nil {
		ctx, cancel := context.WithTimeout(ctx, agentTimeout)
		defer cancel()
		var pv VMStatus
		if err = p.call(ctx, http.MethodGet, pathPeerVMs+"/"+url.PathEscape(st.Name), nil, &pv); err == nil {
			st.PeerView = &pv
			return
		}
	}
	st.PeerError = err.Error()
}

// handle serves a POST whose JSON body is a Req with f's answer (200) or
// error.
func handle[Req any](f func(*http.Request, Req) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if r.ContentLength != 0 {
			if err := readJSON(r.Body, &req); err != nil {
				writeError(w, err)
				return
			}
		}
		out, err := f(r, req)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, out)
	}
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

package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/libvirtdom"
)

func TestSplitPeer(t *testing.T) {
	for _, tc := range []struct {
		addr string
		host string
		port int
		err  string // "" when addr is accepted
	}{
		{"hostb", "hostb", DefaultPeerPort, ""},
		{"hostb.example.org", "hostb.example.org", DefaultPeerPort, ""},
		{"hostb:7791", "hostb", 7791, ""},
		{"10.0.0.2", "10.0.0.2", DefaultPeerPort, ""},
		{"10.0.0.2:1", "10.0.0.2", 1, ""},
		{"hostb:65535", "hostb", 65535, ""},
		{"[::1]:7791", "::1", 7791, ""},
		{"[fd00::2]", "fd00::2", DefaultPeerPort, ""},
		{"fd00::2", "fd00::2", DefaultPeerPort, ""},
		{"::1", "::1", DefaultPeerPort, ""},
		{":7790", "", 0, "no host"},
		{"", "", 0, "empty"},
		{"hostb:0", "", 0, `port "0"`},
		{"hostb:65536", "", 0, `port "65536"`},
		{"hostb:-1", "", 0, `port "-1"`},
		{"hostb:http", "", 0, `port "http"`},
		{"hostb:", "", 0, `port ""`},
		{"a:b:c", "", 0, "too many colons"},
		{"[::1]:x", "", 0, `port "x"`},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			host, port, err := splitPeer(tc.addr)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("splitPeer(%q) = %q, %d, %v; want an error saying %q", tc.addr, host, port, err, tc.err)
				}
				return
			}
			if err != nil || host != tc.host || port != tc.port {
				t.Fatalf("splitPeer(%q) = %q, %d, %v; want %q, %d", tc.addr, host, port, err, tc.host, tc.port)
			}
		})
	}
}

// peerServer serves d's peer API on a test server.
func peerServer(t *testing.T, d *Daemon) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(d.peerMux())
	t.Cleanup(srv.Close)
	return srv
}

// peerOf returns a client of srv as d's peer: what Daemon.peer makes.
func peerOf(t *testing.T, d *Daemon, srv *httptest.Server) *peerClient {
	t.Helper()
	p, err := d.peer(srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func readError(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	var e apiError
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("error answer %q: not {\"error\": ...}: %v", b, err)
	}
	return e.Error
}

func TestPeerAPIAuthentication(t *testing.T) {
	d := newTestDaemon(t)
	srv := peerServer(t, d)
	ctx := context.Background()

	t.Run("no header", func(t *testing.T) {
		for _, path := range []string{pathHello, pathPeerVMs + "/web"} {
			resp, err := http.Get(srv.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			msg := readError(t, resp)
			if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(msg, "no "+AuthHeader+" header") {
				t.Errorf("GET %s without %s: %s %q", path, AuthHeader, resp.Status, msg)
			}
		}
	})

	t.Run("right key", func(t *testing.T) {
		// Authenticated, hello asks libvirt, which does not answer here.
		var h Hello
		err := peerOf(t, d, srv).call(ctx, http.MethodGet, pathHello, nil, &h)
		if err == nil {
			t.Fatalf("hello without libvirt: %+v", h)
		}
		if strings.Contains(err.Error(), ErrUnauthenticated.Error()) || strings.Contains(err.Error(), "MAC") {
			t.Fatalf("hello with the right key refused as unauthenticated: %v", err)
		}
		if !strings.Contains(err.Error(), "libvirt on hosta") || !strings.Contains(err.Error(), "peer remusd at ") {
			t.Errorf("hello without libvirt: %v; want the peer and libvirt named", err)
		}
	})

	t.Run("other key", func(t *testing.T) {
		other := newTestDaemon(t, func(c *Config) { c.Key = []byte("another key of 32 bytes.........") })
		var h Hello
		err := peerOf(t, other, srv).call(ctx, http.MethodGet, pathHello, nil, &h)
		if err == nil || !strings.Contains(err.Error(), "wrong MAC") {
			t.Fatalf("hello with another key: %v; want wrong MAC", err)
		}
	})

	t.Run("other clock", func(t *testing.T) {
		late := newTestDaemon(t, func(c *Config) { c.Clock = func() time.Time { return testClock.Add(5 * time.Minute) } })
		err := peerOf(t, late, srv).call(ctx, http.MethodGet, pathPeerVMs+"/web", nil, &VMStatus{})
		if err == nil || !strings.Contains(err.Error(), "from this host's clock") {
			t.Fatalf("a request 5 minutes ahead: %v; want refused for its time", err)
		}
	})

	t.Run("body not the signed one", func(t *testing.T) {
		signed, sent := []byte(`{"vm":"web"}`), []byte(`{"vm":"db"}`)
		req, err := http.NewRequest(http.MethodPost, srv.URL+pathRelease, bytes.NewReader(sent))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set(AuthHeader, SignRequest(testKey, http.MethodPost, pathRelease, testClock, signed))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		msg := readError(t, resp)
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(msg, "wrong MAC") {
			t.Errorf("POST with a body other than the signed one: %s %q", resp.Status, msg)
		}
	})
}

// TestPeerAPIWithoutLibvirt covers the peer requests answered from the
// daemon's records alone: the body of an authenticated request reaches
// its handler.
func TestPeerAPIWithoutLibvirt(t *testing.T) {
	d := newTestDaemon(t)
	addVM(d, record{Name: "web", Role: RolePrimary, Domain: "web", Peer: "hostb", Restarts: 1,
		Ended: "agent exit status 1", EndState: StateFailed})
	srv := peerServer(t, d)
	p := peerOf(t, d, srv)
	ctx := context.Background()

	var st VMStatus
	if err := p.call(ctx, http.MethodGet, pathPeerVMs+"/web", nil, &st); err != nil {
		t.Fatal(err)
	}
	want := VMStatus{Name: "web", Role: RolePrimary, Domain: "web", Peer: "hostb", Restarts: 1, State: StateFailed, Why: "agent exit status 1"}
	if st.Name != want.Name || st.Role != want.Role || st.Domain != want.Domain || st.Peer != want.Peer ||
		st.Restarts != want.Restarts || st.State != want.State || st.Why != want.Why || st.AgentPID != 0 || st.Agent != nil {
		t.Errorf("peer status of web: %+v, want %+v", st, want)
	}

	err := p.call(ctx, http.MethodGet, pathPeerVMs+"/ghost", nil, &st)
	if err == nil || !strings.Contains(err.Error(), "ghost: not protected by remusd on hosta") {
		t.Errorf("peer status of an unknown VM: %v", err)
	}

	var res Result
	if err := p.call(ctx, http.MethodPost, pathRelease, ReleaseRequest{VM: "ghost"}, &res); err != nil {
		t.Fatal(err)
	}
	if !res.Complete || res.Result != "ghost: hosta does not stand by for it" {
		t.Errorf("release of a VM not stood by for: %+v", res)
	}

	err = p.call(ctx, http.MethodPost, pathRelease, ReleaseRequest{VM: "web"}, &res)
	if err == nil || !strings.Contains(err.Error(), "web runs on hosta as primary") {
		t.Errorf("release of a primary VM: %v", err)
	}

	err = p.call(ctx, http.MethodPost, pathStandby, StandbyRequest{VM: "a/b"}, &StandbyReply{})
	if err == nil || !strings.Contains(err.Error(), `VM name "a/b"`) {
		t.Errorf("standby of a VM named a/b: %v", err)
	}
	// A primary whose agent ended may become the backup (its guest runs
	// on the other host now: libvirt, unreachable here, is asked next);
	// one whose agent runs may not.
	err = p.call(ctx, http.MethodPost, pathStandby, StandbyRequest{VM: "web"}, &StandbyReply{})
	if err == nil || !strings.Contains(err.Error(), "libvirt on hosta") {
		t.Errorf("standby for a VM whose primary agent ended here: %v", err)
	}
	d.mu.Lock()
	d.vms["web"] = &vm{rec: record{Name: "web", Role: RolePrimary, Domain: "web"}, exited: make(chan struct{})}
	d.mu.Unlock()
	err = p.call(ctx, http.MethodPost, pathStandby, StandbyRequest{VM: "web"}, &StandbyReply{})
	if err == nil || !strings.Contains(err.Error(), "web runs on hosta as primary") {
		t.Errorf("standby for a VM that is primary here: %v", err)
	}
}

func TestPeerRefusesBadAddress(t *testing.T) {
	d := newTestDaemon(t)
	_, err := d.peer("hostb:99999")
	var he *httpError
	if !errors.As(err, &he) || he.code != http.StatusBadRequest || !strings.Contains(err.Error(), `peer "hostb:99999"`) {
		t.Fatalf("peer(hostb:99999): %v; want a 400 naming the peer", err)
	}
	p, err := d.peer("hostb")
	if err != nil || p.addr != "hostb:7790" {
		t.Fatalf("peer(hostb): %+v, %v; want hostb:7790", p, err)
	}
	if p, err := d.peer("[fd00::2]:7791"); err != nil || p.addr != "[fd00::2]:7791" {
		t.Fatalf("peer([fd00::2]:7791): %+v, %v", p, err)
	}
}

// answer serves one fixed answer to every request.
func answer(t *testing.T, code int, contentType, body string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.WriteHeader(code)
		io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestClientErrors(t *testing.T) {
	ctx := context.Background()
	t.Run("refusal with problems", func(t *testing.T) {
		ref := Refusal{Error: "domain web cannot be protected", Problems: []libvirtdom.Problem{{
			Code: libvirtdom.CodeRAMNotShared, Severity: libvirtdom.Error, Message: "guest RAM is not shared",
			Fix: libvirtdom.Fix{Op: libvirtdom.FixSet, In: "domain", XML: "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"},
		}}}
		b, err := json.Marshal(ref)
		if err != nil {
			t.Fatal(err)
		}
		srv := answer(t, http.StatusConflict, "application/json", string(b))
		err = do(ctx, srv.Client(), srv.URL, http.MethodPost, pathVMs+"/web/protect", ProtectRequest{Peer: "hostb"}, &VMStatus{}, nil)
		var re *RefusedError
		if !errors.As(err, &re) {
			t.Fatalf("409 Refusal with problems: %T %v; want *RefusedError", err, err)
		}
		if re.Error() != ref.Error || len(re.Problems) != 1 || re.Problems[0].Code != libvirtdom.CodeRAMNotShared ||
			re.Problems[0].Severity != libvirtdom.Error || re.Problems[0].Fix.XML != ref.Problems[0].Fix.XML {
			t.Errorf("refusal: %+v, want %+v", re.Refusal, ref)
		}
	})
	t.Run("error", func(t *testing.T) {
		srv := answer(t, http.StatusConflict, "application/json", `{"error":"x"}`)
		err := do(ctx, srv.Client(), srv.URL, http.MethodGet, pathVMs, nil, nil, nil)
		var re *RefusedError
		if err == nil || err.Error() != "x" || errors.As(err, &re) {
			t.Fatalf(`409 {"error":"x"}: %T %v; want the plain error "x"`, err, err)
		}
	})
	t.Run("not JSON", func(t *testing.T) {
		srv := answer(t, http.StatusInternalServerError, "text/plain", "boom\n")
		err := do(ctx, srv.Client(), srv.URL, http.MethodGet, pathVMs, nil, nil, nil)
		if err == nil || err.Error() != "500 Internal Server Error: boom" {
			t.Fatalf("500 text: %v; want the status and the body", err)
		}
	})
	t.Run("JSON without error", func(t *testing.T) {
		srv := answer(t, http.StatusBadGateway, "application/json", `{"problems":[]}`)
		err := do(ctx, srv.Client(), srv.URL, http.MethodGet, pathVMs, nil, nil, nil)
		if err == nil || !strings.HasPrefix(err.Error(), "502 Bad Gateway: ") {
			t.Fatalf("502 JSON without an error: %v; want the status", err)
		}
	})
	t.Run("unreadable answer", func(t *testing.T) {
		srv := answer(t, http.StatusOK, "application/json", `[1,`)
		err := do(ctx, srv.Client(), srv.URL, http.MethodGet, pathVMs, nil, &[]VMStatus{}, nil)
		if err == nil || !strings.Contains(err.Error(), "answer to GET /v1/vms") {
			t.Fatalf("200 with broken JSON: %v", err)
		}
	})
	t.Run("answer and request", func(t *testing.T) {
		var got ProtectRequest
		var ctype string
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ctype = r.Header.Get("Content-Type")
			if err := json.NewDecoder(r.Body).Decode(&got); err != nil || r.Method != http.MethodPost || r.URL.Path != pathVMs+"/web/protect" {
				writeError(w, errorf(http.StatusBadRequest, "%s %s: %v", r.Method, r.URL.Path, err))
				return
			}
			writeJSON(w, http.StatusOK, VMStatus{Name: "web", State: StateSyncing})
		}))
		t.Cleanup(srv.Close)
		var st VMStatus
		req := ProtectRequest{Peer: "hostb", Epoch: 50 * time.Millisecond, Tap: "tap0"}
		if err := do(ctx, srv.Client(), srv.URL, http.MethodPost, pathVMs+"/web/protect", req, &st, nil); err != nil {
			t.Fatal(err)
		}
		if got != req || ctype != "application/json" || st.Name != "web" || st.State != StateSyncing {
			t.Errorf("sent %+v as %q, got %+v; want %+v as application/json, answered web syncing", got, ctype, st, req)
		}
	})
}

// TestClientNoDaemon: a client whose socket has no daemon says so.
func TestClientNoDaemon(t *testing.T) {
	c := NewClient(t.TempDir() + "/remusd.sock")
	_, err := c.List(context.Background())
	if err == nil || !strings.Contains(err.Error(), "is remusd daemon running?") {
		t.Fatalf("List without a daemon: %v", err)
	}
}

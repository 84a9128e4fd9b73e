package daemon

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/remus-kvm/remus/internal/agent"
)

func TestAgentState(t *testing.T) {
	for _, tc := range []struct {
		raw, state, why string
	}{
		{`{"state":"protecting"}`, StateProtected, ""},
		{`{"state":"protecting","why":"x"}`, StateProtected, "x"},
		{`{"state":"syncing","why":"copying guest RAM"}`, StateSyncing, "copying guest RAM"},
		{`{"state":"unprotected","why":"no session"}`, StateUnprotected, "no session"},
		{`{"state":"stopped","why":"lease lost"}`, StateStopped, "lease lost"},
		{`{"state":"failover-failed","why":"resume: boom"}`, StateFailed, "resume: boom"},
		{`{"state":"waiting"}`, StateWaiting, ""},
		{`{"state":"standby","epoch":42}`, StateStandby, ""},
		{`{"state":"failing-over"}`, StateFailingOver, ""},
		{`{"state":"failed-over","why":"primary lost"}`, StateFailedOver, "primary lost"},
	} {
		if state, why := agentState([]byte(tc.raw)); state != tc.state || why != tc.why {
			t.Errorf("agentState(%s) = %q, %q; want %q, %q", tc.raw, state, why, tc.state, tc.why)
		}
	}
	for _, raw := range []string{``, `not json`, `{"state":`, `{"state":7}`} {
		state, why := agentState([]byte(raw))
		if state != StateStarting || !strings.HasPrefix(why, "the agent's status is unreadable: ") {
			t.Errorf("agentState(%q) = %q, %q; want starting, unreadable", raw, state, why)
		}
	}
}

// fakeAgent serves an agent's control socket: GET /status answers
// status, GET /metrics metrics.
func fakeAgent(t *testing.T, status, metrics string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "a.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+agent.ControlStatusPath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, status)
	})
	mux.HandleFunc("GET "+agent.MetricsPath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		io.WriteString(w, metrics)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// running marks v's agent as running, without a process.
func running(v *vm) *vm {
	v.exited = make(chan struct{})
	return v
}

func TestStatus(t *testing.T) {
	d := newTestDaemon(t)
	ctx := context.Background()
	sock := fakeAgent(t, `{"vm":"web","role":"primary","state":"protecting","peer":"hostb:17901"}`, "")

	web := running(addVM(d, record{Name: "web", Role: RolePrimary, Domain: "web", Peer: "hostb", PID: 1234,
		Since: testClock, Restarts: 2, Control: sock}))
	st := d.status(ctx, web)
	if st.State != StateProtected || st.AgentPID != 1234 || !st.Since.Equal(testClock) || st.Restarts != 2 ||
		!strings.Contains(string(st.Agent), `"peer":"hostb:17901"`) {
		t.Errorf("status of a protecting agent: %+v (agent %s)", st, st.Agent)
	}

	mute := running(addVM(d, record{Name: "mute", Role: RoleBackup, PID: 1235, Control: filepath.Join(t.TempDir(), "none.sock")}))
	if st := d.status(ctx, mute); st.State != StateStarting || !strings.Contains(st.Why, "does not answer on its control socket") || st.Agent != nil {
		t.Errorf("status of an agent that does not answer: %+v", st)
	}

	relay := running(addVM(d, record{Name: "relay", Role: RolePrimary, PID: 1236, Relay: true, Ended: "unprotected"}))
	if st := d.status(ctx, relay); st.State != StateUnprotected || !strings.HasPrefix(st.Why, "unprotected: remusd relays") {
		t.Errorf("status of a relay: %+v", st)
	}

	gone := addVM(d, record{Name: "gone", Role: RolePrimary, PID: 1237, Ended: "agent exit status 1"})
	if st := d.status(ctx, gone); st.State != StateEnded || st.Why != "agent exit status 1" || st.AgentPID != 0 {
		t.Errorf("status of an agent that ended: %+v", st)
	}

	var names []string
	for _, v := range d.list() {
		names = append(names, v.snapshot().Name)
	}
	if strings.Join(names, " ") != "gone mute relay web" {
		t.Errorf("list: %v, want by name", names)
	}
}

func TestDaemonMetrics(t *testing.T) {
	d := newTestDaemon(t)
	running(addVM(d, record{Name: "web", Role: RolePrimary, Restarts: 3, Control: filepath.Join(t.TempDir(), "none.sock")}))
	addVM(d, record{Name: "db", Role: RoleBackup})
	const want = `
# HELP remus_daemon_agent_restarts_total Times the daemon started the VM's agent again after it died.
# TYPE remus_daemon_agent_restarts_total counter
remus_daemon_agent_restarts_total{role="backup",vm="db"} 0
remus_daemon_agent_restarts_total{role="primary",vm="web"} 3
# HELP remus_daemon_agent_up 1 while the VM's agent process runs, else 0.
# TYPE remus_daemon_agent_up gauge
remus_daemon_agent_up{role="backup",vm="db"} 0
remus_daemon_agent_up{role="primary",vm="web"} 1
`
	if got := gatherText(t, d.reg, "remus_daemon_agent_up", "remus_daemon_agent_restarts_total"); got != want[1:] {
		t.Errorf("daemon metrics:\n%s\nwant\n%s", got, want[1:])
	}
	// The collector on its own, as a pedantic registry checks it.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(daemonCollector{d})
	if got := gatherText(t, reg); got != want[1:] {
		t.Errorf("daemonCollector:\n%s\nwant\n%s", got, want[1:])
	}
	empty := prometheus.NewPedanticRegistry()
	empty.MustRegister(daemonCollector{newTestDaemon(t)})
	if got := gatherText(t, empty); got != "" {
		t.Errorf("a daemon without VMs:\n%s", got)
	}
}

// TestMetricsMergeAgents: the daemon's gatherer adds a running agent's
// remus_* metrics, not its others, and leaves out an agent that does not
// answer without losing the rest.
func TestMetricsMergeAgents(t *testing.T) {
	d := newTestDaemon(t)
	sock := fakeAgent(t, `{}`, `# TYPE remus_epochs_committed_total counter
remus_epochs_committed_total{vm="web"} 17
# TYPE go_agent_only gauge
go_agent_only 1
`)
	running(addVM(d, record{Name: "web", Role: RolePrimary, Control: sock}))
	running(addVM(d, record{Name: "mute", Role: RolePrimary, Control: filepath.Join(t.TempDir(), "none.sock")}))
	fams, err := d.gatherer().Gather()
	if err == nil || !strings.Contains(err.Error(), "agent metrics at ") {
		t.Errorf("gather with an agent that does not answer: %v; want its error", err)
	}
	got := map[string]bool{}
	for _, f := range fams {
		got[f.GetName()] = true
		if f.GetName() != "remus_epochs_committed_total" {
			continue
		}
		if len(f.Metric) != 1 || f.Metric[0].GetCounter().GetValue() != 17 ||
			len(f.Metric[0].Label) != 1 || f.Metric[0].Label[0].GetValue() != "web" {
			t.Errorf("merged agent metric: %v", f)
		}
	}
	for _, name := range []string{"remus_epochs_committed_total", "remus_daemon_agent_up", "go_goroutines"} {
		if !got[name] {
			t.Errorf("gathered metrics lack %s", name)
		}
	}
	if got["go_agent_only"] {
		t.Error("an agent's metric other than remus_* was merged")
	}
}

// gatherText gathers g's metric families (only those named, if any) in
// the text format. (prometheus/testutil needs a module go.mod does not
// list.)
func gatherText(t *testing.T, g prometheus.Gatherer, names ...string) string {
	t.Helper()
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, f := range fams {
		if len(names) > 0 && !slices.Contains(names, f.GetName()) {
			continue
		}
		if err := enc.Encode(f); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

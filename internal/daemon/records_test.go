package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

// testClock is the time of a test daemon.
var testClock = time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC)

// newTestDaemon returns a daemon as Run would leave it before serving:
// its context set and STATE-DIR/vms made. Its libvirt URI names a socket
// that does not exist, so every libvirt call fails at once.
func newTestDaemon(t *testing.T, mods ...func(*Config)) *Daemon {
	t.Helper()
	dir := t.TempDir()
	cfg := Config{
		Key:        testKey,
		AgentPorts: [2]int{17900, 17910},
		Remusd:     "/bin/true",
		StateDir:   filepath.Join(dir, "state"),
		RunDir:     filepath.Join(dir, "run"),
		Connect:    "qemu+unix:///system?socket=" + filepath.Join(dir, "no-libvirtd.sock"),
		Host:       "hosta",
		Clock:      func() time.Time { return testClock },
	}
	for _, m := range mods {
		m(&cfg)
	}
	// Goroutines of the daemon may log after a test ends: not to t.Log.
	d, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	d.ctx = ctx
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "vms"), 0o700); err != nil {
		t.Fatal(err)
	}
	return d
}

// addVM puts a VM with record r in the daemon's table.
func addVM(d *Daemon, r record) *vm {
	v := &vm{rec: r}
	d.mu.Lock()
	d.vms[r.Name] = v
	d.mu.Unlock()
	return v
}

// waitRecord waits for the saved record of name to satisfy ok.
func waitRecord(t *testing.T, d *Daemon, name string, ok func(record) bool) record {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	var r record
	for {
		b, err := os.ReadFile(d.recordPath(name))
		if err == nil {
			r = record{}
			if json.Unmarshal(b, &r) == nil && ok(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("record of %s: not as expected within 5 s: %+v (read error: %v)", name, r, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitExec waits for process pid's command line to be the one it
// execs: for a moment after exec the kernel shows an empty one.
func waitExec(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && len(b) > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d: no command line within 5 s (%v)", pid, err)
		}
		time.Sleep(time.Millisecond)
	}
}

func waitClosed(t *testing.T, ch chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: not closed within 5 s", what)
	}
}

func TestNewChecksConfig(t *testing.T) {
	good := Config{Key: testKey, AgentPorts: [2]int{17900, 17910}, Remusd: "/bin/true"}
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"no key", func(c *Config) { c.Key = nil }, "key file is required"},
		{"no ports", func(c *Config) { c.AgentPorts = [2]int{} }, "agent ports 0-0"},
		{"reversed ports", func(c *Config) { c.AgentPorts = [2]int{17910, 17900} }, "agent ports 17910-17900"},
		{"port beyond 65535", func(c *Config) { c.AgentPorts = [2]int{65530, 65536} }, "want a range of TCP ports"},
		{"no remusd", func(c *Config) { c.Remusd = "" }, "no remusd binary"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.mod(&cfg)
			d, err := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, %v; want an error saying %q", d, err, tc.want)
			}
		})
	}
	d, err := New(good, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if d.cfg.StandbyName != "{name}" || d.clock == nil || d.cfg.Host == "" {
		t.Fatalf("defaults: standby name %q, clock set %v, host %q", d.cfg.StandbyName, d.clock != nil, d.cfg.Host)
	}
}

func TestRecordsRoundTrip(t *testing.T) {
	d := newTestDaemon(t)
	want := record{
		Name: "web", Role: RoleBackup, Domain: "web-standby", Peer: "hosta:7790",
		Args:    []string{"backup", "--vm", "web", "--listen", ":17901"},
		Control: "/run/remus/.agents/web/remusd.sock", StateDir: "/run/remus/.agents/web",
		NetArgs: []string{"--net-tap", "tap0"}, AgentPort: 17901, PID: 4242,
		Since: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Restarts: 2, Wanted: true,
		Ended: "agent exit status 1", EndState: StateFailed,
	}
	if err := d.save(&vm{rec: want}); err != nil {
		t.Fatal(err)
	}
	relay := record{Name: "db", Role: RolePrimary, Relay: true, Args: []string{"relay"}}
	if err := d.save(&vm{rec: relay}); err != nil {
		t.Fatal(err)
	}
	// Saving again replaces the record.
	want.Restarts = 3
	if err := d.save(&vm{rec: want}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(d.recordPath("web"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("record mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := os.Stat(d.recordPath("web") + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary file left behind: %v", err)
	}

	// What is not a record, or not a readable one, is skipped.
	vms := filepath.Join(d.cfg.StateDir, "vms")
	for name, content := range map[string]string{
		"corrupt.json": `{"name": "corrupt", "args": [`,
		"noname.json":  `{"role": "primary"}`,
		"web.log":      "--- agent log",
		"x.json.tmp":   `{"name": "half-written"}`,
	} {
		if err := os.WriteFile(filepath.Join(vms, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	recs, err := d.loadRecords()
	if err != nil {
		t.Fatalf("loadRecords: %v", err)
	}
	got := map[string]record{}
	for _, r := range recs {
		got[r.Name] = r
	}
	if len(recs) != 2 || len(got) != 2 {
		t.Fatalf("loadRecords: %d records %v, want web and db", len(recs), got)
	}
	if !reflect.DeepEqual(got["web"], want) {
		t.Errorf("web: got\n%+v\nwant\n%+v", got["web"], want)
	}
	if !reflect.DeepEqual(got["db"], relay) {
		t.Errorf("db: got\n%+v\nwant\n%+v", got["db"], relay)
	}

	d.forget("web")
	if _, err := os.Stat(d.recordPath("web")); !os.IsNotExist(err) {
		t.Errorf("forget left the record: %v", err)
	}
}

func TestLoadRecordsWithoutDirectory(t *testing.T) {
	d := newTestDaemon(t)
	if err := os.RemoveAll(filepath.Join(d.cfg.StateDir, "vms")); err != nil {
		t.Fatal(err)
	}
	if recs, err := d.loadRecords(); err == nil || !strings.Contains(err.Error(), "read records") {
		t.Fatalf("loadRecords without STATE-DIR/vms: %v, %v; want an error", recs, err)
	}
}

// TestStartAgent starts /bin/sleep as an agent: it runs in a session of
// its own, its command line is logged, and once it dies an agent that is
// not wanted is recorded as ended.
func TestStartAgent(t *testing.T) {
	d := newTestDaemon(t, func(c *Config) { c.Remusd = "/bin/sleep" })
	v := addVM(d, record{Name: "web", Role: RolePrimary, Domain: "web", Args: []string{"30"},
		StateDir: filepath.Join(d.cfg.RunDir, ".agents", "web")})
	if v.alive() {
		t.Fatal("alive before the agent started")
	}
	if err := d.startAgent(v); err != nil {
		t.Fatal(err)
	}
	r := v.snapshot()
	t.Cleanup(func() {
		if v.alive() {
			syscall.Kill(r.PID, syscall.SIGKILL)
			<-v.exited
		}
	})
	if r.PID <= 0 || !r.Since.Equal(testClock) || r.Ended != "" || r.EndState != "" {
		t.Fatalf("record after start: pid %d, since %v, ended %q/%q", r.PID, r.Since, r.Ended, r.EndState)
	}
	if !v.alive() {
		t.Fatal("not alive after start")
	}
	if fi, err := os.Stat(r.StateDir); err != nil || !fi.IsDir() {
		t.Errorf("agent state directory: %v", err)
	}
	if sid, err := unix.Getsid(r.PID); err != nil || sid != r.PID {
		t.Errorf("agent's session %d (%v), want a session of its own (%d)", sid, err, r.PID)
	}
	log, err := os.ReadFile(d.logPath("web"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "--- " + testClock.Format(time.RFC3339) + ": remusd 30\n"; string(log) != want {
		t.Errorf("log %q, want %q", log, want)
	}

	waitExec(t, r.PID)
	if !sameCommand(r.PID, []string{"30"}) {
		t.Error("sameCommand(pid, [30]) = false for /bin/sleep 30")
	}
	for _, args := range [][]string{{"31"}, {}, {"30", "x"}, {"/bin/sleep", "30"}} {
		if sameCommand(r.PID, args) {
			t.Errorf("sameCommand(pid, %q) = true for /bin/sleep 30", args)
		}
	}

	exited := v.exited
	if err := syscall.Kill(r.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, exited, "exited of a killed agent")
	if v.alive() {
		t.Error("alive after the agent died")
	}
	got := waitRecord(t, d, "web", func(r record) bool { return r.Ended != "" })
	if got.EndState != StateEnded || !strings.Contains(got.Ended, "killed") || got.Wanted || got.Restarts != 0 {
		t.Errorf("record of an unwanted agent that was killed: ended %q, end state %q, wanted %v, restarts %d",
			got.Ended, got.EndState, got.Wanted, got.Restarts)
	}
	if sameCommand(r.PID, []string{"30"}) {
		t.Error("sameCommand true for a pid that exited")
	}
}

func TestStartAgentFails(t *testing.T) {
	d := newTestDaemon(t, func(c *Config) { c.Remusd = filepath.Join(t.TempDir(), "no-such-remusd") })
	v := addVM(d, record{Name: "web", Role: RolePrimary, Args: []string{"primary"}, PID: 77,
		StateDir: filepath.Join(d.cfg.RunDir, ".agents", "web")})
	err := d.startAgent(v)
	if err == nil || !strings.Contains(err.Error(), "start remusd primary for web") {
		t.Fatalf("startAgent with a missing binary: %v", err)
	}
	if r := v.snapshot(); r.PID != 77 || v.alive() {
		t.Errorf("after a failed start: pid %d (want the old 77), alive %v", r.PID, v.alive())
	}
}

// startSleep starts sleep 30 as the test's own child, killed and reaped
// when the test ends.
func startSleep(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	waitExec(t, cmd.Process.Pid)
	return cmd
}

func TestAdopt(t *testing.T) {
	d := newTestDaemon(t, func(c *Config) { c.Remusd = "/nonexistent/remusd" })
	cmd := startSleep(t)
	pid := cmd.Process.Pid
	v := addVM(d, record{Name: "web", Role: RolePrimary, Args: []string{"30"}, PID: pid})
	if !d.adopt(v) {
		t.Fatalf("adopt of pid %d running sleep 30: false", pid)
	}
	if !v.alive() {
		t.Fatal("adopted agent not alive")
	}
	exited := v.exited
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, exited, "exited of an adopted agent")
	got := waitRecord(t, d, "web", func(r record) bool { return r.Ended != "" })
	if got.EndState != StateEnded || !strings.Contains(got.Ended, "adopted") || got.PID != pid {
		t.Errorf("record of an unwanted adopted agent that exited: ended %q, end state %q, pid %d", got.Ended, got.EndState, got.PID)
	}
}

func TestAdoptRefuses(t *testing.T) {
	d := newTestDaemon(t)
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	other := startSleep(t)
	for _, tc := range []struct {
		name string
		rec  record
	}{
		{"no pid", record{Name: "a", Args: []string{"30"}}},
		{"dead pid", record{Name: "b", Args: []string{"30"}, PID: dead.Process.Pid}},
		{"other command", record{Name: "c", Args: []string{"31"}, PID: other.Process.Pid}},
		{"other arguments", record{Name: "d", Args: []string{"30", "--vm", "d"}, PID: other.Process.Pid}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := addVM(d, tc.rec)
			if d.adopt(v) {
				t.Fatalf("adopt of %+v: true", tc.rec)
			}
			if v.alive() || v.exited != nil {
				t.Error("a VM whose agent was not adopted is alive")
			}
		})
	}
}

// TestAgentExitedStale: the exit of a pid that is no longer the record's
// (an agent started again since) changes nothing.
func TestAgentExitedStale(t *testing.T) {
	d := newTestDaemon(t)
	v := addVM(d, record{Name: "web", Role: RolePrimary, PID: 100, Wanted: true})
	d.agentExited(v, 99, "agent exit status 1")
	if r := v.snapshot(); r.Ended != "" || r.EndState != "" || r.Restarts != 0 {
		t.Errorf("record after a stale exit: %+v", r)
	}
	if _, err := os.Stat(d.recordPath("web")); !os.IsNotExist(err) {
		t.Errorf("a stale exit saved the record: %v", err)
	}
}

// TestAgentExitedAfterShutdown: once the daemon's context ends, an agent
// that exits is recorded as ended, not started again, even when wanted.
func TestAgentExitedAfterShutdown(t *testing.T) {
	d := newTestDaemon(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	d.ctx = ctx
	v := addVM(d, record{Name: "web", Role: RolePrimary, PID: 100, Wanted: true})
	d.agentExited(v, 100, "agent exit status 1")
	got := waitRecord(t, d, "web", func(r record) bool { return r.Ended != "" })
	if got.Ended != "agent exit status 1" || got.EndState != StateEnded || got.Restarts != 0 || !got.Wanted {
		t.Errorf("record: %+v", got)
	}
}

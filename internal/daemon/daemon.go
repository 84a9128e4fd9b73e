// Package daemon is remusd's per-host daemon (remusd daemon): like
// libvirtd for its domains, one process per host protects any number of
// libvirt domains in either role. remusctl talks to it on a unix socket;
// the daemons of two hosts talk to each other over TCP, authenticated
// with the hosts' shared key (peerauth.go).
//
// The daemon does not checkpoint anything itself: for each VM it runs an
// agent, remusd primary beside a domain that runs, remusd backup beside
// its standby domain on the other host, each a process in a session of
// its own with its own control socket. The daemon starts, watches and
// restarts them, keeps a record of each in its state directory and, when
// it starts, adopts the agents an earlier daemon left running: a daemon
// restart (an upgrade, a crash) leaves protection as it was, with no
// failover and no new sync. Stopping the daemon does not stop protection;
// remusctl unprotect does.
//
// What the daemon adds to the agents is libvirt: it looks the domain up,
// checks that it can be protected (libvirtdom.Check), asks the peer to
// define and start the standby domain (libvirtdom.Standby) and its backup
// agent, starts the primary agent, and answers status, unprotect,
// switchover and the libvirt hook's events.
package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultHeal is remusd daemon's --heal.
const DefaultHeal = 30 * time.Second

// DefaultPeerPort is the peer API's TCP port.
const DefaultPeerPort = 7790

// Defaults of a daemon's paths.
const (
	DefaultControl  = "/run/remus/remusd.sock"
	DefaultStateDir = "/var/lib/remus"
	DefaultRunDir   = "/run/remus"
)

// Config is a daemon's configuration.
type Config struct {
	// Control is the unix socket of the control API, mode 0660, group
	// Group ("" leaves it root's).
	Control, Group string
	// Listen is the peer API's address (host:port).
	Listen string
	// StateDir keeps the VM records and agents' logs; RunDir (a tmpfs)
	// the agents' state and the domains' socket directories; ImagesDir
	// (default STATE-DIR/images) a backup's copies of the guests' disks.
	StateDir, RunDir, ImagesDir string
	// Connect is the libvirt URI of this host's libvirtd.
	Connect string
	// Key authenticates the peer API (the key file the agents get in
	// AgentArgs, which authenticates their link).
	Key []byte
	// AgentPorts is the range the backup agents' TCP ports come from.
	AgentPorts [2]int
	// StandbyName names a standby domain after its VM: "{name}" in it is
	// the VM's name; default "{name}", the same name on both hosts.
	StandbyName string
	// QEMUUser owns the socket directories the daemon makes for libvirt's
	// QEMU (libvirt's qemu.conf user; Debian: libvirt-qemu).
	QEMUUser string
	// Remusd is the binary the agents run.
	Remusd string
	// AgentArgs go to every agent (--key-file, --witness..., --heartbeat-*,
	// --log-level, --assume-fail-stop); BackupArgs to backup agents only
	// (--fence-command...).
	AgentArgs, BackupArgs []string
	// Host is this host's name as the peer knows it (default: the host
	// name).
	Host string
	// Metrics, when set, is a TCP address serving GET /metrics only (for
	// Prometheus; the control socket serves it too).
	Metrics string
	// Heal is how often the daemon looks for primaries left without a
	// backup (the backup host restarted) and has the peer stand by again
	// (0: never).
	Heal time.Duration
	// Clock is the time (default time.Now).
	Clock func() time.Time
}

// Daemon is a running per-host daemon.
type Daemon struct {
	cfg   Config
	log   *slog.Logger
	hv    hypervisor
	ctx   context.Context
	clock func() time.Time

	mu    sync.Mutex
	vms   map[string]*vm
	ports map[int]bool

	// ops serialises what changes protection (protect, standby, release,
	// unprotect, switchover).
	ops sync.Mutex

	reg *prometheus.Registry
}

// New checks cfg and returns a daemon to Run.
func New(cfg Config, log *slog.Logger) (*Daemon, error) {
	switch {
	case len(cfg.Key) == 0:
		return nil, errors.New("daemon: a key file is required: it authenticates the peer daemon and the agents' link")
	case cfg.AgentPorts[0] <= 0 || cfg.AgentPorts[1] < cfg.AgentPorts[0] || cfg.AgentPorts[1] > 65535:
		return nil, fmt.Errorf("daemon: agent ports %d-%d: want a range of TCP ports", cfg.AgentPorts[0], cfg.AgentPorts[1])
	case cfg.Remusd == "":
		return nil, errors.New("daemon: no remusd binary for the agents")
	}
	if cfg.StandbyName == "" {
		cfg.StandbyName = "{name}"
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.ImagesDir == "" {
		cfg.ImagesDir = filepath.Join(cfg.StateDir, "images")
	}
	if cfg.Host == "" {
		cfg.Host, _ = os.Hostname()
	}
	d := &Daemon{cfg: cfg, log: log, hv: hypervisor{uri: cfg.Connect}, clock: cfg.Clock,
		vms: map[string]*vm{}, ports: map[int]bool{}}
	d.reg = d.newRegistry()
	return d, nil
}

// Run serves until ctx ends. The agents go on running after it returns.
func (d *Daemon) Run(ctx context.Context) error {
	d.ctx = ctx
	// The run directory holds the standby domains' socket directories,
	// which libvirt's QEMU reaches: 0755; what else the daemon keeps is
	// root's.
	if err := os.MkdirAll(d.cfg.RunDir, 0o755); err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	// The state directory holds the backups' disk images (ImagesDir),
	// which QEMU opens: it must be able to pass through.
	if err := os.MkdirAll(d.cfg.StateDir, 0o711); err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	for _, dir := range []string{filepath.Join(d.cfg.StateDir, "vms"), filepath.Join(d.cfg.RunDir, ".agents")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("daemon: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(d.cfg.Control), 0o755); err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	recs, err := d.loadRecords()
	if err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	for _, r := range recs {
		v := &vm{rec: r}
		d.vms[r.Name] = v
		if r.AgentPort > 0 {
			d.ports[r.AgentPort] = true
		}
		if d.adopt(v) {
			d.log.Info("adopted a running agent", "vm", r.Name, "role", r.Role, "pid", r.PID)
			continue
		}
		if r.Wanted && r.Ended == "" {
			d.log.Warn("the agent of a protected VM does not run", "vm", r.Name, "role", r.Role, "pid", r.PID)
			go d.agentExited(v, r.PID, "agent not running when the daemon started")
		}
	}

	ctl, err := d.listenControl(ctx)
	if err != nil {
		return err
	}
	var lc net.ListenConfig
	peer, err := lc.Listen(ctx, "tcp", d.cfg.Listen)
	if err != nil {
		ctl.Close()
		return fmt.Errorf("daemon: peer API: %w", err)
	}
	srvs := []*http.Server{d.server(d.controlMux()), d.server(d.peerMux())}
	lns := []net.Listener{ctl, peer}
	if d.cfg.Metrics != "" {
		ml, err := lc.Listen(ctx, "tcp", d.cfg.Metrics)
		if err != nil {
			ctl.Close()
			peer.Close()
			return fmt.Errorf("daemon: metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET "+pathMetrics, d.metricsHandler())
		srvs, lns = append(srvs, d.server(mux)), append(lns, ml)
	}
	errs := make(chan error, len(srvs))
	for i, s := range srvs {
		go func() { errs <- s.Serve(lns[i]) }()
	}
	if d.cfg.Heal > 0 {
		go d.heal(ctx)
	}
	d.log.Info("remusd daemon running", "control", d.cfg.Control, "peer_api", peer.Addr().String(), "libvirt", d.cfg.Connect, "vms", len(recs))
	select {
	case <-ctx.Done():
	case err = <-errs:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, s := range srvs {
		s.Shutdown(sctx)
	}
	os.Remove(d.cfg.Control)
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("daemon: %w", err)
	}
	d.log.Info("remusd daemon stopped; the agents go on", "vms", len(d.list()))
	return nil
}

func (d *Daemon) server(h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn)}
}

// listenControl makes the control socket, mode 0660, group cfg.Group.
func (d *Daemon) listenControl(ctx context.Context) (net.Listener, error) {
	os.Remove(d.cfg.Control)
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "unix", d.cfg.Control)
	if err != nil {
		return nil, fmt.Errorf("daemon: control socket: %w", err)
	}
	gid := -1
	if d.cfg.Group != "" {
		g, err := user.LookupGroup(d.cfg.Group)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("daemon: control socket group: %w", err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	if err := os.Chown(d.cfg.Control, -1, gid); err != nil && gid >= 0 {
		ln.Close()
		return nil, fmt.Errorf("daemon: control socket: %w", err)
	}
	if err := os.Chmod(d.cfg.Control, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("daemon: control socket: %w", err)
	}
	return ln, nil
}

// list returns the VMs, by name.
func (d *Daemon) list() []*vm {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]*vm, 0, len(d.vms))
	for _, name := range slices.Sorted(maps.Keys(d.vms)) {
		out = append(out, d.vms[name])
	}
	return out
}

func (d *Daemon) get(name string) *vm {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.vms[name]
}

// httpError is an error with its HTTP status.
type httpError struct {
	code int
	err  error
	body any // answered instead of {"error": ...} when set
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

func errorf(code int, format string, args ...any) error {
	return &httpError{code: code, err: fmt.Errorf(format, args...)}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	var he *httpError
	if errors.As(err, &he) {
		code = he.code
		if he.body != nil {
			writeJSON(w, code, he.body)
			return
		}
	}
	writeJSON(w, code, apiError{Error: err.Error()})
}

// readJSON decodes a request's body (at most 16 MiB) into v.
func readJSON(r io.Reader, v any) error {
	if err := json.NewDecoder(io.LimitReader(r, 16<<20)).Decode(v); err != nil {
		return errorf(http.StatusBadRequest, "request: %v", err)
	}
	return nil
}

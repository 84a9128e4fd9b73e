package witness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Local is a single-node etcd run for one machine (the demo, tests): the
// `etcd` binary (Debian's etcd-server package), its data in a directory of
// its own, serving clients on loopback. A production pair uses an existing
// etcd cluster on a third failure domain instead: a witness on one of the
// two hosts dies with it.
type Local struct {
	// Endpoint is its client URL.
	Endpoint string
	cmd      *exec.Cmd
	done     chan struct{}
	err      error
}

// LocalConfig configures StartLocal.
type LocalConfig struct {
	Binary string // default "etcd" from PATH
	Dir    string // data directory and log (etcd.log), required
	// Host to listen on (default 127.0.0.1); ClientPort and PeerPort
	// default to free ports.
	Host                 string
	ClientPort, PeerPort int
	// Netns, when set, is a network namespace path (/run/netns/NAME) to
	// run etcd in (with nsenter).
	Netns string
}

// StartLocal starts etcd and waits until it serves clients (up to 20 s or
// ctx). Stop ends it.
func StartLocal(ctx context.Context, cfg LocalConfig) (*Local, error) {
	if cfg.Dir == "" {
		return nil, errors.New("witness: local etcd needs a directory")
	}
	bin := cfg.Binary
	if bin == "" {
		bin = "etcd"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("witness: %s not found (Debian: apt install etcd-server; `make setup` installs it): %w", bin, err)
	}
	host := cfg.Host
	if host == "" {
		host = "127.0.0.1"
	}
	for _, p := range []*int{&cfg.ClientPort, &cfg.PeerPort} {
		if *p == 0 {
			if *p, err = freePort(host); err != nil {
				return nil, err
			}
		}
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	hp := func(port int) string { return "http://" + net.JoinHostPort(host, strconv.Itoa(port)) }
	args := []string{path, "--name", "witness", "--data-dir", filepath.Join(cfg.Dir, "data"),
		"--listen-client-urls", hp(cfg.ClientPort), "--advertise-client-urls", hp(cfg.ClientPort),
		"--listen-peer-urls", hp(cfg.PeerPort), "--initial-advertise-peer-urls", hp(cfg.PeerPort),
		"--initial-cluster", "witness=" + hp(cfg.PeerPort), "--initial-cluster-state", "new",
		// Writes of leases and keys are few: keep the disk quiet.
		"--snapshot-count", "10000", "--quota-backend-bytes", strconv.Itoa(64 << 20)}
	if cfg.Netns != "" {
		args = append([]string{"nsenter", "--net=" + cfg.Netns, "--"}, args...)
	}
	log, err := os.OpenFile(filepath.Join(cfg.Dir, "etcd.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	defer log.Close()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	// Debian's etcd 3.4 on amd64 needs no ETCD_UNSUPPORTED_ARCH; its
	// environment variables (ETCD_*) would override the flags: drop them.
	for _, e := range os.Environ() {
		if len(e) < 5 || e[:5] != "ETCD_" {
			cmd.Env = append(cmd.Env, e)
		}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("witness: start etcd: %w", err)
	}
	l := &Local{Endpoint: hp(cfg.ClientPort), cmd: cmd, done: make(chan struct{})}
	go func() { l.err = cmd.Wait(); close(l.done) }()
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	// One client, asked until etcd answers a read.
	probe, err := Open(Config{Endpoints: []string{l.Endpoint}, DialTimeout: time.Second}, "ping", "ping")
	if err != nil {
		l.Stop()
		return nil, err
	}
	defer probe.Close()
	for {
		pctx, cancel := context.WithTimeout(wctx, time.Second)
		_, err := probe.Status(pctx)
		cancel()
		if err == nil {
			return l, nil
		}
		select {
		case <-l.done:
			return nil, fmt.Errorf("witness: etcd exited (%v); its log: %s", l.err, filepath.Join(cfg.Dir, "etcd.log"))
		case <-wctx.Done():
			l.Stop()
			return nil, fmt.Errorf("witness: etcd at %s not serving: %w (log: %s)", l.Endpoint, wctx.Err(), filepath.Join(cfg.Dir, "etcd.log"))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Pause stops etcd's process (SIGSTOP): the witness is unreachable, as if
// its host were cut off, until Resume.
func (l *Local) Pause() error { return syscall.Kill(-l.cmd.Process.Pid, syscall.SIGSTOP) }

// Resume continues a paused etcd.
func (l *Local) Resume() error { return syscall.Kill(-l.cmd.Process.Pid, syscall.SIGCONT) }

// Stop kills etcd and waits for it.
func (l *Local) Stop() {
	syscall.Kill(-l.cmd.Process.Pid, syscall.SIGCONT)
	syscall.Kill(-l.cmd.Process.Pid, syscall.SIGKILL)
	<-l.done
}

func freePort(host string) (int, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("witness: find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Package e2e holds the end-to-end tests: a real test guest under QEMU,
// protected by two remusd processes on loopback, reached over a real network
// (a tap device in a network namespace made by the test), with the primary
// killed at chosen points of the epoch cycle.
package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/internal/testguest"
	"github.com/remus-kvm/remus/internal/testnet"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/testvm"
)

var (
	remusdOnce sync.Once
	remusdPath string
	remusdErr  error
)

// remusd builds cmd/remusd once per test binary.
func remusd(t *testing.T) string {
	t.Helper()
	remusdOnce.Do(func() {
		dir, err := os.MkdirTemp("", "remus-e2e-")
		if err != nil {
			remusdErr = err
			return
		}
		remusdPath = filepath.Join(dir, "remusd")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		root, err := testvm.RepoRoot()
		if err != nil {
			remusdErr = err
			return
		}
		cmd := exec.CommandContext(ctx, "go", "build", "-o", remusdPath, "./cmd/remusd")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			remusdErr = fmt.Errorf("build remusd: %w\n%s", err, out)
		}
	})
	if remusdErr != nil {
		t.Fatal(remusdErr)
	}
	return remusdPath
}

// proc is a process the test started, with its stderr kept and scanned.
type proc struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	out   strings.Builder
	lines chan string
	done  chan struct{}
}

func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(name, args...), lines: make(chan string, 1000), done: make(chan struct{})}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout = p.cmd.Stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.out.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("%s %s output:\n%s", filepath.Base(name), args[0], p.output())
		}
	})
	return p
}

func (p *proc) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// waitLine waits for an output line containing s.
func (p *proc) waitLine(ctx context.Context, s string) (string, error) {
	for {
		select {
		case l := <-p.lines:
			if strings.Contains(l, s) {
				return l, nil
			}
		case <-p.done:
			return "", fmt.Errorf("process exited before printing %q", s)
		case <-ctx.Done():
			return "", fmt.Errorf("waiting for %q: %w", s, ctx.Err())
		}
	}
}

// keepOpen lets a relay end without closing the tap: the outside network
// stays up across a failover, and the backup's relay takes the tap over.
type keepOpen struct{ *netbuffer.Tap }

func (keepOpen) Close() error { return nil }

// network is the outside world of the protected guest: a tap in a network
// namespace made for the test, with the client's address on it.
type network struct {
	ns  *testnet.Namespace
	tap *netbuffer.Tap
}

const (
	clientAddr = "10.213.9.1/24"
	guestAddr  = "10.213.9.2/24"
	guestSvc   = "10.213.9.2:7000"
)

func newNetwork(t *testing.T) *network {
	t.Helper()
	testenv.RequireTun(t)
	ns := testnet.New(t)
	name := fmt.Sprintf("rke%d", os.Getpid()%100000)
	tap, err := netbuffer.OpenTap(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tap.Close() })
	ns.MoveLink(t, name)
	ns.AddAddr(t, name, clientAddr)
	ns.IP(t, "link", "set", name, "up")
	return &network{ns: ns, tap: tap}
}

// attach accepts a guest NIC on ln and relays it to the tap until the
// guest goes away.
func (n *network) attach(t *testing.T, ctx context.Context, ln net.Listener) {
	t.Helper()
	conn, err := netbuffer.AcceptGuest(ctx, ln)
	if err != nil {
		t.Fatalf("guest NIC did not connect: %v", err)
	}
	r := netbuffer.NewRelay(conn, keepOpen{n.tap}, nil)
	rctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(rctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// guestConfig is the protected guest: 256 MiB, page dirtier on, NIC on a
// stream socket, RAM in a file under dir.
func guestConfig(t *testing.T, dir, role string, dirtyPerSec int) testvm.Config {
	c := testguest.Config(t)
	c.Name = "remus-e2e"
	c.RAMPath = filepath.Join(dir, role+".ram")
	c.QMP = []string{filepath.Join(dir, role+"-test.qmp"), filepath.Join(dir, role+"-remusd.qmp")}
	c.SerialLog = filepath.Join(dir, role+"-console.log")
	c.NIC = testvm.NIC{Mode: testvm.NICStream, Path: filepath.Join(dir, role+"-net.sock")}
	c.Guest.IP = netip.MustParsePrefix(guestAddr)
	c.Guest.DirtyPerSec = dirtyPerSec
	return c
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func readEpochLog(t *testing.T, path string) []agent.EpochRecord {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		t.Fatal(err)
	}
	defer f.Close()
	var out []agent.EpochRecord
	dec := json.NewDecoder(f)
	for {
		var r agent.EpochRecord
		if err := dec.Decode(&r); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("epoch log: %v", err)
			}
			return out
		}
		out = append(out, r)
	}
}

func waitReport(ctx context.Context, path string, backup *proc) (failover.Restored, *agent.FailoverReport, error) {
	for {
		if b, err := os.ReadFile(path); err == nil {
			var r agent.FailoverReport
			if err := json.Unmarshal(b, &r); err == nil {
				return failover.Restored{}, &r, nil
			}
		}
		select {
		case <-ctx.Done():
			return failover.Restored{}, nil, fmt.Errorf("no failover report: %w", ctx.Err())
		case <-backup.done:
			if b, err := os.ReadFile(path); err == nil {
				var r agent.FailoverReport
				if json.Unmarshal(b, &r) == nil {
					return failover.Restored{}, &r, nil
				}
			}
			return failover.Restored{}, nil, errors.New("backup remusd exited without a failover report")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

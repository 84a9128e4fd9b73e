package agent

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/transport"
)

// TestBackupState: the status follows the sessions' hellos, commits and
// goodbyes until the failover, and the failover's result after.
func TestBackupState(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	b := newBackupState("web1")
	l1 := &primaryLink{addr: "10.0.0.1:4000", st: b}
	l2 := &primaryLink{addr: "10.0.0.1:4001", st: b}
	check := func(step, state string, epoch uint64, primary, why string) {
		t.Helper()
		st := b.status()
		if st.VM != "web1" || st.Role != "backup" || st.State != state || st.CommittedEpoch != epoch || st.Primary != primary || !strings.Contains(st.Why, why) {
			t.Errorf("%s: %+v; want state %s, epoch %d, primary %q, why with %q", step, st, state, epoch, primary, why)
		}
	}
	check("start", BackupWaiting, 0, "", "waiting for a primary's first epoch")
	b.hello(l1)
	check("hello", BackupWaiting, 0, l1.addr, "started a session")
	b.commitFrom.Store(l1)
	b.committed(1, t0)
	check("first commit", BackupStandby, 1, l1.addr, "resumes here")
	if at := b.status().CommittedAt; !at.Equal(t0) {
		t.Errorf("committed at %v, want %v", at, t0)
	}
	b.goodbye(l1)
	check("goodbye", BackupWaiting, 1, l1.addr, "ended its session")
	b.committed(2, t0.Add(time.Second)) // sent before the goodbye
	check("commit after the goodbye", BackupWaiting, 2, l1.addr, "ended its session")

	b.hello(l2)
	b.commitFrom.Store(l2)
	b.committed(5, t0.Add(2*time.Second))
	check("new session", BackupStandby, 5, l2.addr, "resumes here")
	b.goodbye(l1) // an old connection's goodbye
	check("old goodbye", BackupStandby, 5, l2.addr, "resumes here")

	claim := b.claim(func(context.Context) (bool, error) { return true, nil })
	claim(t.Context())
	check("claiming", BackupFailingOver, 5, l2.addr, "claiming the witness")
	b.hello(l2) // the primary is back
	check("hello while claiming", BackupWaiting, 5, l2.addr, "started a session")
	b.committed(6, t0.Add(3*time.Second))
	fence := b.fence(func(context.Context, string) error { return nil })
	fence(t.Context(), "10.0.0.1")
	check("fencing", BackupFailingOver, 6, l2.addr, "fencing the primary's host 10.0.0.1")

	b.failingOver(&checkpoint.PrimaryLost{Committed: checkpoint.Committed{Epoch: 6}, Cause: errors.New("silent for 1s")})
	check("failing over", BackupFailingOver, 6, l2.addr, "resuming epoch 6")
	b.hello(l2)
	check("hello while resuming", BackupFailingOver, 6, l2.addr, "resuming epoch 6")
	r := &FailoverReport{VM: "web1", Epoch: 6, QEMUPID: 42}
	b.failedOver(r, nil)
	check("failed over", BackupFailedOver, 6, l2.addr, "the guest runs here")
	if st := b.status(); st.Failover != r {
		t.Errorf("failover report %+v, want %+v", st.Failover, r)
	}

	b = newBackupState("web1")
	b.failingOver(&checkpoint.PrimaryLost{Cause: errors.New("connection reset")})
	b.failedOver(&FailoverReport{VM: "web1"}, errors.New("QEMU did not start"))
	check("failover failed", BackupFailoverFailed, 0, "", "QEMU did not start")
}

// TestPrimaryLink: what a primary sends on its connection reaches the
// status: its hello, its commits, its goodbye.
func TestPrimaryLink(t *testing.T) {
	ctx := t.Context()
	a, c := net.Pipe()
	b := newBackupState("web1")
	l := &primaryLink{Conn: transport.NewConn(a), addr: "10.0.0.1:4000", st: b}
	prim := transport.NewConn(c)
	defer l.Close()
	defer prim.Close()
	send := func(epoch uint64, m transport.Message) {
		t.Helper()
		errc := make(chan error, 1)
		go func() { errc <- prim.SendMessage(ctx, epoch, m) }()
		if _, err := l.Recv(ctx); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	send(0, transport.Hello{Version: transport.Version, Role: transport.RolePrimary, VMName: "web1", RAMSize: 16 * transport.PageSize, PageSize: transport.PageSize})
	if st := b.status(); st.Primary != l.addr || st.State != BackupWaiting {
		t.Errorf("after the hello: %+v", st)
	}
	send(1, transport.Commit{})
	if b.commitFrom.Load() != l {
		t.Error("a commit frame does not name its connection")
	}
	b.committed(1, time.Now())
	if st := b.status(); st.State != BackupStandby {
		t.Errorf("after the commit: %+v", st)
	}
	send(0, transport.Error{Code: transport.CodeGoodbye, Message: "stopping"})
	if st := b.status(); st.State != BackupWaiting || !l.ended.Load() {
		t.Errorf("after the goodbye: %+v", st)
	}
}

// TestBackupControlSocket runs the backup agent and reads its control
// socket: GET /status says it waits, then names a primary that says hello;
// GET /metrics answers the backup's metrics; the socket goes as the agent
// exits.
func TestBackupControlSocket(t *testing.T) {
	dir := t.TempDir()
	ram := filepath.Join(dir, "guest.ram")
	sock := filepath.Join(dir, "ctl.sock")
	lnAddr := freeAddr(t)
	cfg := BackupConfig{VM: "web1", Listen: lnAddr, RAMImage: ram, StateDir: filepath.Join(dir, "state"),
		QEMU: []string{"/bin/true", "-object", "memory-backend-file,id=ram,size=64K,mem-path=" + ram}, QMPSocket: filepath.Join(dir, "qmp.sock"),
		AssumeFailStop: true, Control: sock, Heartbeat: failover.DetectorConfig{Interval: 50 * time.Millisecond, Timeout: time.Minute}}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := RunBackup(ctx, cfg, slog.New(slog.DiscardHandler))
		done <- err
	}()

	var st BackupStatus
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := CallControl(ctx, sock, http.MethodGet, ControlStatusPath, 5*time.Second, &st)
		if err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("RunBackup ended: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", ControlStatusPath, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st.VM != "web1" || st.Role != "backup" || st.State != BackupWaiting || st.CommittedEpoch != 0 || st.Failover != nil {
		t.Errorf("GET %s: %+v", ControlStatusPath, st)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket: %v, %v", fi, err)
	}

	var metrics []byte
	if err := CallControl(ctx, sock, http.MethodGet, MetricsPath, 5*time.Second, &metrics); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(metrics), `remus_backup_epochs_applied_total{vm="web1"} 0`) {
		t.Errorf("GET %s lacks the backup's metrics:\n%s", MetricsPath, metrics)
	}

	// A primary says hello: the status names it.
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", lnAddr)
	if err != nil {
		t.Fatal(err)
	}
	prim := transport.NewConn(nc)
	defer prim.Close()
	if err := prim.SendMessage(ctx, 0, transport.Hello{Version: transport.Version, Role: transport.RolePrimary, VMName: "web1",
		RAMSize: 16 * transport.PageSize, PageSize: transport.PageSize}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if err := CallControl(ctx, sock, http.MethodGet, ControlStatusPath, 5*time.Second, &st); err != nil {
			t.Fatal(err)
		}
		if st.Primary == nc.LocalAddr().String() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the status does not name the primary %s: %+v", nc.LocalAddr(), st)
		}
	}
	if st.State != BackupWaiting || !strings.Contains(st.Why, "started a session") {
		t.Errorf("after the primary's hello: %+v", st)
	}

	cancel()
	if err := <-done; err != nil {
		t.Errorf("RunBackup: %v", err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
}

// freeAddr is a loopback address no one listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

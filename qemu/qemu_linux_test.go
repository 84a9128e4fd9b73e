package qemu

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remus-kvm/remus/diskmirror"
	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/qmp"
)

// startQEMU starts QEMU under TCG with 64 MiB of shared guest RAM (ram0,
// a memfd), a 1 MiB null block node (disk0) and no devices, and connects
// to its QMP socket, with the extra arguments. QEMU is killed at cleanup.
func startQEMU(t *testing.T, ctx context.Context, extra ...string) *qmp.Client {
	t.Helper()
	bin := testenv.RequireQEMU(t)
	dir, err := os.MkdirTemp("", "qemu") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	var out bytes.Buffer
	cmd := exec.Command(bin, append([]string{"-nodefaults", "-no-user-config", "-display", "none", "-accel", "tcg",
		"-machine", "q35,memory-backend=ram0", "-object", "memory-backend-memfd,id=ram0,size=64M,share=on",
		"-blockdev", "driver=null-co,node-name=disk0,size=1048576",
		"-qmp", "unix:" + sock + ",server=on,wait=off"}, extra...)...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("QEMU (%s %v): %s\n%s", bin, extra, cmd.ProcessState, &out)
		}
	})
	for {
		c, err := qmp.Dial(ctx, sock)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		select {
		case <-ctx.Done():
			t.Fatalf("QEMU's QMP socket: %v\n%s", err, &out)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestRealQEMU runs the commands against QEMU itself: their arguments are
// what QEMU accepts, their results what it returns.
func TestRealQEMU(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	mon := startQEMU(t, ctx)

	ram, err := FindRAMBackend(ctx, mon)
	if err != nil || ram.ID != "ram0" || ram.Type != "memory-backend-memfd" || ram.Size != 64<<20 {
		t.Errorf("FindRAMBackend = %+v, %v", ram, err)
	}
	if size, err := NodeSize(ctx, mon, "disk0"); err != nil || size != 1<<20 {
		t.Errorf("NodeSize(disk0) = %d, %v", size, err)
	}
	t.Run("mirror", func(t *testing.T) { testMirror(t, ctx, mon) })

	if err := Stop(ctx, mon); err != nil {
		t.Fatal(err)
	}
	if st, err := Status(ctx, mon); err != nil || st != "paused" {
		t.Errorf("after Stop: %q, %v", st, err)
	}
	dir := t.TempDir()
	hasXen, err := HasCommand(ctx, mon, "xen-save-devices-state")
	if err != nil {
		t.Fatal(err)
	}
	savers := []DeviceSaver{{Migrate: true, Version: mon.Version()}}
	if hasXen {
		savers = append([]DeviceSaver{{}}, savers...) // the migration ends in postmigrate: last
	}
	for _, s := range savers {
		path := filepath.Join(dir, s.String())
		if err := s.Save(ctx, mon, path); err != nil {
			t.Fatalf("%v: %v", s, err)
		}
		f, err := ReadStateFormat(path)
		if err != nil || f.Configuration != s.Migrate {
			t.Fatalf("%v wrote %+v, %v", s, f, err)
		}
		t.Run("load "+s.String(), func(t *testing.T) { testLoad(t, ctx, path, f) })
	}
}

// testLoad loads a saved device state into a second QEMU, as a failover
// does, and resumes it.
func testLoad(t *testing.T, ctx context.Context, path string, f StateFormat) {
	mon := startQEMU(t, ctx, RestoreArgs(f)...)
	if f.Configuration {
		if err := SetCapability(ctx, mon, IgnoreShared, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := MigrateIncoming(ctx, mon, IncomingURI(path, mon.Version())); err != nil {
		t.Fatal(err)
	}
	if err := WaitMigration(ctx, mon, 2*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	// Loaded, the guest waits for the caller (RestoreArgs' -S), although
	// the state says it was running.
	if st, err := Status(ctx, mon); err != nil || st == "running" {
		t.Errorf("after the load, before Cont: %q, %v; want it not running", st, err)
	}
	if err := Cont(ctx, mon); err != nil {
		t.Fatal(err)
	}
	if st, err := Status(ctx, mon); err != nil || st != "running" {
		t.Errorf("after the load and Cont: %q, %v", st, err)
	}
}

// testMirror mirrors disk0 to an NBD export until the job is ready, then
// cancels it and removes the target, as remusd's disk mirror does.
func testMirror(t *testing.T, ctx context.Context, mon *qmp.Client) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go (&diskmirror.Server{Size: 1 << 20, Sink: discard{}}).Serve(ctx, ln)
	if err := AddNBDNode(ctx, mon, NBDNode{NodeName: "target", Export: diskmirror.ExportName, Socket: sock}); err != nil {
		t.Fatal(err)
	}
	if err := StartMirror(ctx, mon, Mirror{JobID: "m", Device: "disk0", Target: "target", Sync: "full", CopyMode: "write-blocking"}); err != nil {
		t.Fatal(err)
	}
	err = PollBlockJob(ctx, mon, "m", 10*time.Millisecond, func(j *BlockJob) (bool, error) {
		if j == nil {
			return false, errors.New("the job ended before it was ready")
		}
		return j.Ready, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := CancelBlockJob(ctx, mon, "m", true); err != nil {
		t.Fatal(err)
	}
	if err := PollBlockJob(ctx, mon, "m", 10*time.Millisecond, func(j *BlockJob) (bool, error) { return j == nil, nil }); err != nil {
		t.Fatal(err)
	}
	if err := DelNode(ctx, mon, "target"); err != nil {
		t.Fatal(err)
	}
}

// discard is a diskmirror.Sink that keeps nothing.
type discard struct{}

func (discard) Write(context.Context, diskmirror.Write) error { return nil }

// TestWaitStreamConnected: a netdev stream server socket shows as
// connected in QEMU only once QEMU accepted the client, which
// WaitStreamConnected waits for; before, it times out.
func TestWaitStreamConnected(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "net")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "nic.sock")
	mon := startQEMU(t, ctx, "-S", "-netdev", "stream,id=n0,server=on,addr.type=unix,addr.path="+sock, "-device", "virtio-net-pci,netdev=n0")
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	err = WaitStreamConnected(short, mon, sock, 10*time.Millisecond)
	cancelShort()
	if err == nil {
		t.Fatal("connected before anything connected")
	}
	var c net.Conn
	for c == nil {
		if c, err = net.Dial("unix", sock); err != nil {
			if ctx.Err() != nil {
				t.Fatal(err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	defer c.Close()
	if err := WaitStreamConnected(ctx, mon, sock, 5*time.Millisecond); err != nil {
		t.Fatal(err)
	}
}

// TestUntrackedWritesWithQEMU: a balloon is named, plain devices are not.
func TestUntrackedWritesWithQEMU(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	plain := startQEMU(t, ctx, "-S", "-device", "virtio-rng-pci")
	if got, err := UntrackedWrites(ctx, plain); err != nil || len(got) != 0 {
		t.Fatalf("plain guest: %q, %v", got, err)
	}
	balloon := startQEMU(t, ctx, "-S", "-device", "virtio-balloon-pci")
	if got, err := UntrackedWrites(ctx, balloon); err != nil || len(got) != 1 || !strings.HasPrefix(got[0], "virtio-balloon") {
		t.Fatalf("guest with a balloon: %q, %v", got, err)
	}
}

// TestStateFDWithQEMU saves a paused guest's device state through a
// descriptor set (AddStateFD) twice: each save replaces the file's content
// (not appended), and a set an earlier agent left is removed by the next
// AddStateFD; Close removes the set.
func TestStateFDWithQEMU(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	mon := startQEMU(t, ctx)
	if !hasXenSave(t, ctx, mon) {
		t.Skip("this QEMU has no xen-save-devices-state")
	}
	// QEMU closes the descriptors of a removed set only while the guest
	// runs (not during an incoming migration, say): the sets are made and
	// removed with it running.
	dir := t.TempDir()
	path := filepath.Join(dir, "devices.state")
	stale, err := AddStateFD(ctx, mon, filepath.Join(dir, "stale.state"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := AddStateFD(ctx, mon, path)
	if err != nil {
		t.Fatal(err)
	}
	var sets []struct {
		ID int `json:"fdset-id"`
	}
	if err := mon.Execute(ctx, "query-fdsets", nil, &sets); err != nil || len(sets) != 1 || sets[0].ID != f.ID {
		t.Fatalf("fd sets %+v (%v): want only the new one (%d), the earlier agent's (%d) removed", sets, err, f.ID, stale.ID)
	}
	if err := Stop(ctx, mon); err != nil {
		t.Fatal(err)
	}
	saver := DeviceSaver{FDSet: f}
	var sizes []int64
	for range 2 {
		if err := saver.Save(ctx, mon, path); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		sizes = append(sizes, st.Size())
		if format, err := ReadStateFormat(path); err != nil || format.Configuration {
			t.Fatalf("saved state: %+v, %v", format, err)
		}
	}
	if sizes[0] == 0 || sizes[1] != sizes[0] {
		t.Fatalf("device state sizes %v: each save must replace the last", sizes)
	}
	if err := Cont(ctx, mon); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(ctx, mon); err != nil {
		t.Fatal(err)
	}
	if err := mon.Execute(ctx, "query-fdsets", nil, &sets); err != nil || len(sets) != 0 {
		t.Fatalf("fd sets %+v (%v) after Close, want none", sets, err)
	}
}

// hasXenSave reports whether QEMU has xen-save-devices-state.
func hasXenSave(t *testing.T, ctx context.Context, mon *qmp.Client) bool {
	t.Helper()
	ok, err := HasCommand(ctx, mon, "xen-save-devices-state")
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

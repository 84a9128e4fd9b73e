package dirtypages

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/internal/testenv"
	"github.com/remus-kvm/remus/internal/testguest"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/testvm"
)

// qemuGuest is the test guest running under a QEMU that is no child of
// the test, with its RAM in a memfd.
type qemuGuest struct {
	pid int
	mon *qmp.Client
	m   Mapping // QEMU's mapping of guest RAM
	ram []byte  // the test's mapping of it
}

// startQEMUGuest boots the test guest with guest RAM in a shared memfd
// and the guest dirtying memory, under a QEMU started through the launcher
// (see launch), and waits for its ready line. Cleanup kills QEMU.
func startQEMUGuest(t *testing.T, guest testvm.Guest, extra ...string) *qemuGuest {
	t.Helper()
	if testing.Short() {
		t.Skip("boots the test guest; skipped in -short mode")
	}
	cfg := testguest.Config(t) // skips without QEMU or the guest kernel
	cfg.RAM, cfg.RAMPath = testvm.RAMMemfd, ""
	cfg.Guest = guest
	cfg.Extra = append(cfg.Extra, extra...)
	args, err := cfg.Args()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg.SerialLog, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(t.TempDir(), "qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	g := &qemuGuest{}
	g.pid, _ = launch(t, append([]string{cfg.QEMU}, args...), nil, nil, logf, logf, nil)
	t.Cleanup(func() {
		if t.Failed() {
			console, _ := os.ReadFile(cfg.SerialLog)
			out, _ := os.ReadFile(logf.Name())
			t.Logf("guest console:\n%s\nQEMU:\n%s", console, out)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), testguest.BootTimeout)
	defer cancel()
	for {
		console, _ := os.ReadFile(cfg.SerialLog)
		if bytes.Contains(console, []byte(testvm.ReadyPrefix)) {
			break
		}
		if unix.Kill(g.pid, 0) != nil {
			t.Fatal("QEMU exited before the guest was ready")
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the guest was not ready within %v", testguest.BootTimeout)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if g.mon, err = qmp.Dial(ctx, cfg.QMP[0]); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.mon.Close() })
	if g.m, err = FindMapping(g.pid, "memory-backend-memfd"); err != nil {
		t.Fatal(err)
	}
	g.ram = mapQEMUMemfd(t, g.pid, g.m)
	return g
}

// mapQEMUMemfd maps, read-only, the memfd that QEMU process pid maps at
// m, through QEMU's descriptor of it in /proc, as the agent does.
func mapQEMUMemfd(t *testing.T, pid int, m Mapping) []byte {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if l, err := os.Readlink(p); err != nil || !strings.HasPrefix(l, strings.TrimSuffix(m.Path, deletedSuffix)) {
			continue
		}
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil || st.Ino != m.Inode || st.Size != int64(m.Len()) {
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		mem, err := unix.Mmap(int(f.Fd()), 0, int(m.Len()), unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(mem) })
		return mem
	}
	t.Fatalf("no descriptor of %s among QEMU's", m.Path)
	return nil
}

// run executes a QMP command that returns nothing.
func (g *qemuGuest) run(t testing.TB, ctx context.Context, cmd string) time.Duration {
	t.Helper()
	start := time.Now()
	if err := g.mon.Execute(ctx, cmd, nil, nil); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	return time.Since(start)
}

// TestUffdQEMU tracks the test guest's RAM under real QEMU with the uffd
// tracker while the guest dirties memory and runs a compile-like load,
// through many Remus epochs (stop, harvest, copy the reported pages into
// a private image, cont), then stops the guest and compares the image with
// guest RAM byte for byte: no page may differ. Afterwards, with the
// tracker closed, the guest runs on.
func TestUffdQEMU(t *testing.T) {
	requireUffd(t)
	g := startQEMUGuest(t, testvm.Guest{DirtyPerSec: 50000, DirtyMiB: 64, Work: "compress"})
	trackExactly(t, g, 150)
}

// libvirtSandbox is the -sandbox option libvirt gives every QEMU.
const libvirtSandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// TestUffdQEMUSandboxed is TestUffdQEMU for a QEMU under libvirt's
// seccomp sandbox: the tracker reads QEMU's filters, finds that they allow
// the calls it injects, and tracks exactly; QEMU survives the injection.
func TestUffdQEMUSandboxed(t *testing.T) {
	requireUffd(t)
	testenv.RequireRoot(t) // PTRACE_SECCOMP_GET_FILTER needs CAP_SYS_ADMIN
	g := startQEMUGuest(t, testvm.Guest{DirtyPerSec: 50000, DirtyMiB: 64}, "-sandbox", libvirtSandbox)
	if mode, err := seccompMode(g.pid); err != nil || mode != 2 {
		t.Fatalf("QEMU with -sandbox %s: seccomp mode %d (%v), want 2 (filters)", libvirtSandbox, mode, err)
	}
	trackExactly(t, g, 60)
}

// trackExactly runs epochs Remus epochs over g with a new uffd tracker
// (stop, harvest, copy the reported pages into a private image, cont),
// compares the image with guest RAM byte for byte at the end, then closes
// the tracker and checks that the guest runs on.
func trackExactly(t *testing.T, g *qemuGuest, epochs int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	u, err := NewUffd(g.pid, g.m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	t.Logf("QEMU's main thread stopped %v to make the userfaultfd; first write-protection of %d MiB: %v (guest running)",
		u.Held(), g.m.Len()>>20, u.Protected())

	image := make([]byte, len(g.ram))
	copyPages := func(set *Set) {
		for first, n := range set.Runs() {
			copy(image[first*PageSize:(first+n)*PageSize], g.ram[first*PageSize:(first+n)*PageSize])
		}
	}
	var stops, harvests, copies, conts []time.Duration
	var dirty []int
	for e := 0; e <= epochs; e++ {
		if e > 0 {
			time.Sleep(20 * time.Millisecond) // the guest runs for an epoch
		}
		stops = append(stops, g.run(t, ctx, "stop"))
		start := time.Now()
		set, err := u.Harvest(ctx)
		if err != nil {
			t.Fatalf("epoch %d: %v", e, err)
		}
		harvests = append(harvests, time.Since(start))
		start = time.Now()
		copyPages(set)
		copies = append(copies, time.Since(start))
		if e == 0 {
			if set.Count() != u.Pages() {
				t.Fatalf("first harvest reported %v, want every page", set)
			}
		} else {
			dirty = append(dirty, set.Count())
		}
		if e == epochs {
			break // compare while stopped
		}
		conts = append(conts, g.run(t, ctx, "cont"))
	}

	mismatch := 0
	var first []int
	for p := 0; p < u.Pages(); p++ {
		if !bytes.Equal(image[p*PageSize:(p+1)*PageSize], g.ram[p*PageSize:(p+1)*PageSize]) {
			mismatch++
			if len(first) < 10 {
				first = append(first, p)
			}
		}
	}
	total := 0
	for _, d := range dirty {
		total += d
	}
	t.Logf("%d epochs of 20 ms, pages reported per epoch: median %d, max %d, total %d", epochs, median(dirty), slices.Max(dirty), total)
	t.Logf("median (max) per epoch: stop %v (%v), harvest %v (%v), copy %v (%v), cont %v (%v)",
		median(stops), slices.Max(stops), median(harvests[1:]), slices.Max(harvests[1:]), median(copies[1:]), slices.Max(copies[1:]), median(conts), slices.Max(conts))
	if mismatch != 0 {
		t.Fatalf("%d of %d pages differ between guest RAM and the image built from the harvests (first: %v)", mismatch, u.Pages(), first)
	}
	t.Logf("image and guest RAM equal, all %d pages", u.Pages())
	if total < 10*epochs {
		t.Fatalf("the guest dirtied only %d pages in %d epochs: the test proves little", total, epochs)
	}

	// The tracker gone, the guest runs as before.
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	g.run(t, ctx, "cont")
	time.Sleep(200 * time.Millisecond)
	var status struct {
		Status string `json:"status"`
	}
	if err := g.mon.Execute(ctx, "query-status", nil, &status); err != nil || status.Status != "running" {
		t.Fatalf("after the tracker closed: status %q, %v", status.Status, err)
	}
}

// median returns the middle value of xs (which it sorts a copy of).
func median[T int | time.Duration](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

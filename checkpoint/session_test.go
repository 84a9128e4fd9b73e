package checkpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remus-kvm/remus/dirtypages"
	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/transport"
)

// hb is a heartbeat timing loose enough for a loaded test machine: these
// tests are about epochs, not failure detection.
var hb = failover.DetectorConfig{Interval: 100 * time.Millisecond, Timeout: 10 * time.Second}

// fakeGuest plays QEMU for the epoch loop: "cont" lets the guest run, which
// here means writing a few pages of RAM; "stop" snapshots RAM as the
// checkpoint must see it; the device state names the epoch.
type fakeGuest struct {
	mu      sync.Mutex
	ram     []byte
	running bool
	stops   int
	snaps   map[int][]byte // stop number -> RAM at that stop
	devs    map[int]string
	failOn  string
	// failFrom: failOn fails only from this stop on (0: always).
	failFrom int
}

func newFakeGuest(pages int) *fakeGuest {
	g := &fakeGuest{ram: make([]byte, pages*transport.PageSize), running: true, snaps: map[int][]byte{}, devs: map[int]string{}}
	for i := range g.ram {
		g.ram[i] = byte(i / transport.PageSize)
	}
	return g
}

func (g *fakeGuest) Execute(ctx context.Context, cmd string, args, result any) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if cmd == g.failOn && g.stops >= g.failFrom {
		return fmt.Errorf("fake: %s failed", cmd)
	}
	switch cmd {
	case "stop":
		g.running = false
		g.stops++
		g.snaps[g.stops] = bytes.Clone(g.ram)
	case "cont":
		g.running = true
		// The guest runs: it writes page (3*stops) mod N and page 0.
		pages := len(g.ram) / transport.PageSize
		for _, p := range []int{0, (3 * g.stops) % pages} {
			off := p * transport.PageSize
			g.ram[off+g.stops%transport.PageSize] ^= byte(g.stops)
			g.ram[off] = byte(g.stops)
		}
	case "xen-save-devices-state":
		var a struct {
			Filename string `json:"filename"`
		}
		if b, err := json.Marshal(args); err != nil || json.Unmarshal(b, &a) != nil {
			return fmt.Errorf("fake: %s: arguments %v", cmd, args)
		}
		dev := fmt.Sprintf("QEVM devices at stop %d", g.stops)
		g.devs[g.stops] = dev
		return os.WriteFile(a.Filename, []byte(dev), 0o600)
	default:
		return fmt.Errorf("fake: unexpected command %s", cmd)
	}
	return nil
}

func (g *fakeGuest) isRunning() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.running
}

type committedEpoch struct {
	epoch uint64
	ram   []byte
	dev   []byte
}

// TestPrimaryBackupCommitWholeEpochs runs a primary and a backup over a
// loopback TCP connection, with and without compression, with and without
// the live first sync, until the backup has committed 20 epochs, checking
// each committed image against the primary's RAM at the matching stop.
func TestPrimaryBackupCommitWholeEpochs(t *testing.T) {
	for _, tc := range []struct {
		compress   bool
		cachePages int // compressor's memory of pages sent (0: all)
		live       bool
		stagePages int // backup's staging memory in pages (0: unbounded)
	}{{false, 0, false, 0}, {false, 0, true, 0}, {true, 0, false, 0}, {true, 0, true, 0}, {true, 8, true, 0}, {true, 0, false, 5}, {false, 0, true, 1}} {
		t.Run(fmt.Sprintf("compress=%v,cache=%d,live=%v,stage=%d", tc.compress, tc.cachePages, tc.live, tc.stagePages), func(t *testing.T) {
			g := newFakeGuest(64)
			tracker, err := dirtypages.NewCompare(g.ram, dirtypages.Options{})
			if err != nil {
				t.Fatal(err)
			}
			var tr dirtypages.Tracker = tracker
			if tc.live {
				tr = &writingTracker{Compare: tracker, g: g}
			}
			commitWholeEpochs(t, g, tr, PrimaryConfig{Compress: tc.compress, DeltaCachePages: tc.cachePages,
				LiveSync: LiveSyncConfig{Off: !tc.live, TargetPages: 1}}, int64(tc.stagePages)*transport.PageSize)
		})
	}
}

// commitWholeEpochs runs the test with cfg's compression and live sync,
// and the backup's staging memory bounded to stageMemory bytes.
func commitWholeEpochs(t *testing.T, g *fakeGuest, tracker dirtypages.Tracker, cfg PrimaryConfig, stageMemory int64) {
	live := cfg.LiveSync
	pages := len(g.ram) / transport.PageSize
	dir := t.TempDir()
	var err error
	commits := make(chan committedEpoch, 100)
	var backupCommitted atomic.Uint64
	var b *Backup
	b, err = NewBackup(BackupConfig{VMName: "vm1", RAMImage: filepath.Join(dir, "backup.ram"), StateFile: filepath.Join(dir, "backup.state"), Heartbeat: hb,
		StageMemory: stageMemory,
		OnCommit: func(epoch uint64, _ int) {
			dev, _ := os.ReadFile(filepath.Join(dir, "backup.state"))
			commits <- committedEpoch{epoch: epoch, ram: bytes.Clone(b.ram), dev: dev}
			backupCommitted.Store(epoch)
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var stats []EpochStats
	var statsMu sync.Mutex
	out := &fakeOutput{g: g, backup: backupCommitted.Load}
	p, err := NewPrimary(PrimaryConfig{VMName: "vm1", KillGuest: noKill, StateDir: dir, Heartbeat: hb, Pipeline: PipelineConfig{Interval: 5 * time.Millisecond},
		Output: out, Compress: cfg.Compress, DeltaCachePages: cfg.DeltaCachePages, LiveSync: live,
		OnEpoch: func(s EpochStats) { statsMu.Lock(); stats = append(stats, s); statsMu.Unlock() }}, g, g.ram, tracker)
	if err != nil {
		t.Fatal(err)
	}
	pl, bl := tcpPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	primaryDone := make(chan error, 1)
	backupDone := make(chan error, 1)
	// The backup runs on until the primary's goodbye is through: cancelled
	// together, it could close the link before the goodbye, and the primary
	// would rightly see a lost peer.
	bctx, bcancel := context.WithCancel(context.Background())
	defer bcancel()
	go func() { backupDone <- b.Serve(bctx, bl) }()
	go func() { primaryDone <- p.Run(ctx, pl) }()

	for want := uint64(1); want <= 20; want++ {
		select {
		case c := <-commits:
			if c.epoch != want {
				t.Fatalf("committed epoch %d, want %d", c.epoch, want)
			}
			g.mu.Lock()
			snap, dev := g.snaps[int(want)], g.devs[int(want)]
			g.mu.Unlock()
			if !bytes.Equal(c.ram, snap) {
				t.Fatalf("epoch %d: backup RAM image differs from the primary's RAM at that pause", want)
			}
			if string(c.dev) != dev {
				t.Fatalf("epoch %d: device state %q, want %q", want, c.dev, dev)
			}
		case err := <-primaryDone:
			bcancel()
			t.Fatalf("primary stopped: %v (backup: %v)", err, <-backupDone)
		case err := <-backupDone:
			t.Fatalf("backup stopped: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatalf("epoch %d never committed", want)
		}
	}
	cancel()
	if err := <-primaryDone; !errors.Is(err, ErrStopped) {
		t.Fatalf("primary: %v, want a planned stop", err)
	}
	bcancel()
	<-backupDone
	if !g.isRunning() {
		t.Fatal("guest left paused")
	}
	out.check(t, 19)
	statsMu.Lock()
	defer statsMu.Unlock()
	switch {
	case len(stats) < 19:
		t.Fatalf("got %d epoch stats; want ≥19", len(stats))
	case live.Off && stats[0].DirtyPages != pages:
		t.Fatalf("first epoch with %d dirty pages; want all %d", stats[0].DirtyPages, pages)
	case !live.Off && (stats[0].DirtyPages > 2 || stats[0].LiveSync.Rounds < 2 || stats[0].LiveSync.Pages < pages):
		t.Fatalf("first epoch with %d dirty pages after a live sync of %+v; want at most the 2 written since its last round, after 2 rounds or more that sent all %d pages",
			stats[0].DirtyPages, stats[0].LiveSync, pages)
	}
	for _, s := range stats[1:] {
		if s.DirtyPages == 0 || s.DirtyPages > 2 || s.WireBytes == 0 || s.AckLatency() <= 0 {
			t.Fatalf("epoch stats %+v: want 1-2 dirty pages, bytes sent, an ack after the start", s)
		}
	}
}

// fakeOutput records how the epoch loop drives output commit.
type fakeOutput struct {
	g      *fakeGuest
	backup func() uint64 // the backup's committed epoch

	mu       sync.Mutex
	events   []string
	problems []string
}

func (o *fakeOutput) note(format string, args ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = append(o.events, fmt.Sprintf(format, args...))
}

func (o *fakeOutput) problem(format string, args ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.problems = append(o.problems, fmt.Sprintf(format, args...))
}

func (o *fakeOutput) Hold() error { o.note("hold"); return nil }

func (o *fakeOutput) Cut(ctx context.Context, epoch uint64) error {
	if o.g.isRunning() {
		o.problem("cut %d while the guest runs", epoch)
	}
	o.note("cut %d", epoch)
	return nil
}

func (o *fakeOutput) Commit(epoch uint64) netbuffer.Release {
	if c := o.backup(); c < epoch {
		o.problem("output of epoch %d released with the backup at epoch %d", epoch, c)
	}
	o.note("commit %d", epoch)
	return netbuffer.Release{Epoch: epoch, Frames: 1}
}

func (o *fakeOutput) PassThrough() { o.note("pass") }

// check asserts the order: cut 1 and hold (output from before the first
// pause is in every state the backup can resume), then cuts and commits
// (epoch N's commit after its cut, commits in order), then pass (with no
// commit after it), with at least n commits.
func (o *fakeOutput) check(t *testing.T, n int) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, p := range o.problems {
		t.Error(p)
	}
	ev := o.events
	// The backup's hello lets out what the guest sent before the session.
	if len(ev) > 0 && ev[0] == "pass" {
		ev = ev[1:]
	}
	if len(ev) < 3 || ev[0] != "cut 1" || ev[1] != "hold" || ev[len(ev)-1] != "pass" {
		t.Fatalf("output events %v: want cut 1 and hold first, pass last", ev)
	}
	var cut, committed uint64 = 1, 0
	commits := 0
	passed := false
	for _, e := range ev[2 : len(ev)-1] {
		var k uint64
		if e == "pass" {
			// The goodbye lets output go; a checkpoint still under way
			// may cut once more, and the end lets go again what it cut.
			passed = true
			continue
		}
		if _, err := fmt.Sscanf(e, "cut %d", &k); err == nil {
			if k != cut+1 {
				t.Fatalf("cut %d after cut %d", k, cut)
			}
			cut = k
		} else {
			if _, err := fmt.Sscanf(e, "commit %d", &k); err != nil || passed || k != committed+1 || k > cut {
				t.Fatalf("output event %q after cut %d and commit %d (all: %v)", e, cut, committed, ev)
			}
			committed = k
			commits++
		}
	}
	if commits < n {
		t.Fatalf("%d commits released output, want at least %d", commits, n)
	}
}

func TestPrimaryResumesGuestWhenSaveFails(t *testing.T) {
	g := newFakeGuest(8)
	g.failOn = "xen-save-devices-state"
	tracker, _ := dirtypages.NewCompare(g.ram, dirtypages.Options{})
	dir := t.TempDir()
	b, _ := NewBackup(BackupConfig{VMName: "vm1", RAMImage: filepath.Join(dir, "r"), StateFile: filepath.Join(dir, "s"), Heartbeat: hb})
	defer b.Close()
	p, err := NewPrimary(PrimaryConfig{VMName: "vm1", KillGuest: noKill, StateDir: dir}, g, g.ram, tracker)
	if err != nil {
		t.Fatal(err)
	}
	pl, bl := tcpPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go b.Serve(ctx, bl)
	err = p.Run(ctx, pl)
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("save device state")) {
		t.Fatalf("Run = %v, want the save failure", err)
	}
	if !g.isRunning() {
		t.Fatal("guest left paused after a failed checkpoint")
	}
}

// newTestBackup is a backup with its files in dir.
func newTestBackup(t *testing.T, dir string) *Backup {
	t.Helper()
	b, _ := newCountingBackup(t, dir)
	return b
}

// newCountingBackup is newTestBackup with its committed epoch readable from
// any goroutine.
func newCountingBackup(t *testing.T, dir string) (*Backup, *atomic.Uint64) {
	t.Helper()
	var committed atomic.Uint64
	b, err := NewBackup(BackupConfig{VMName: "vm1", RAMImage: filepath.Join(dir, "r"), StateFile: filepath.Join(dir, "s"), Heartbeat: hb,
		OnCommit: func(epoch uint64, _ int) { committed.Store(epoch) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, &committed
}

// runPair runs p and b over loopback TCP until the primary's Run returns,
// then waits for the backup's session to end, and returns both results.
func runPair(t *testing.T, ctx context.Context, p *Primary, b *Backup) (perr, berr error) {
	t.Helper()
	pl, bl := tcpPair(t)
	backupDone := make(chan error, 1)
	go func() { backupDone <- b.Serve(ctx, bl) }()
	perr = p.Run(ctx, pl)
	return perr, <-backupDone
}

// unholdable is an output commit whose hold fails, as a kernel buffer
// (sch_plug) whose BUFFER command is refused.
type unholdable struct{ fakeOutput }

func (o *unholdable) Hold() error { return errors.New("sch_plug: BUFFER: operation not supported") }

// TestPrimaryEndsWhenOutputCannotBeHeld: output that cannot be held must
// not leave unheld for the whole session: the checkpoint fails, the guest
// runs on (not paused), the backup is told goodbye and never resumes.
func TestPrimaryEndsWhenOutputCannotBeHeld(t *testing.T) {
	g := newFakeGuest(8)
	tracker, _ := dirtypages.NewCompare(g.ram, dirtypages.Options{})
	dir := t.TempDir()
	b := newTestBackup(t, dir)
	out := &unholdable{fakeOutput{g: g, backup: func() uint64 { return 0 }}}
	p, err := NewPrimary(PrimaryConfig{VMName: "vm1", KillGuest: noKill, StateDir: dir, Heartbeat: hb, Output: out}, g, g.ram, tracker)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err, berr := runPair(t, ctx, p, b)
	if err == nil || !strings.Contains(err.Error(), "hold network output") {
		t.Fatalf("Run = %v, want the failed hold", err)
	}
	if errors.Is(berr, ErrPeerLost) || b.Committed().Epoch != 0 {
		t.Fatalf("backup: %v, committed %d: want a goodbye and nothing to resume", berr, b.Committed().Epoch)
	}
	if !g.isRunning() {
		t.Fatal("guest left paused")
	}
	out.mu.Lock()
	defer out.mu.Unlock()
	for _, e := range out.events {
		if strings.HasPrefix(e, "commit") {
			t.Fatalf("output released after a failed hold: %v", out.events)
		}
	}
}

// TestStuckGuestHandedOverOnlyWhenKilled: a guest that cannot be resumed
// (cont fails, also on the retry) after epochs committed is handed over:
// killed, then the backup resumes it. If it cannot be killed, the backup is
// told not to resume it: no guest rather than two.
func TestStuckGuestHandedOverOnlyWhenKilled(t *testing.T) {
	for _, killErr := range []error{nil, errors.New("QEMU pid 42 still there 5s after SIGKILL")} {
		t.Run(fmt.Sprintf("kill error %v", killErr), func(t *testing.T) {
			g := newFakeGuest(8)
			g.failOn, g.failFrom = "cont", 4
			tracker, _ := dirtypages.NewCompare(g.ram, dirtypages.Options{})
			dir := t.TempDir()
			b, committed := newCountingBackup(t, dir)
			killed := 0
			kill := func(context.Context, string) error { killed++; return killErr }
			out := &fakeOutput{g: g, backup: committed.Load}
			p, err := NewPrimary(PrimaryConfig{VMName: "vm1", KillGuest: kill, StateDir: dir, Heartbeat: hb, Output: out,
				Pipeline: PipelineConfig{Interval: 5 * time.Millisecond, MaxInFlight: 1}}, g, g.ram, tracker)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			perr, berr := runPair(t, ctx, p, b)
			if !errors.Is(perr, ErrHandedOver) || killed != 1 {
				t.Fatalf("primary: %v (killed %d times), want a handover after one kill", perr, killed)
			}
			var lost *PrimaryLost
			if killErr == nil && (!errors.As(berr, &lost) || lost.Committed.Epoch < 2 || !strings.Contains(lost.Cause.Error(), "handed the guest over")) {
				t.Fatalf("backup: %v, want a failover to the last committed epoch on the handover", berr)
			}
			if killErr != nil && (errors.Is(berr, ErrPeerLost) || b.Committed().Epoch != 0) {
				t.Fatalf("backup: %v (committed %d): the guest could not be killed, yet the backup may resume it", berr, b.Committed().Epoch)
			}
			// Output held for epochs the backup never committed must
			// never leave: the resumed guest did not send it.
			out.mu.Lock()
			defer out.mu.Unlock()
			held := false
			for _, e := range out.events {
				if e == "hold" {
					held = true
				}
				if e == "pass" && held {
					t.Fatalf("output let go after the first hold: %v", out.events)
				}
			}
		})
	}
}

func TestBackupRejectsCorruptFrameAndKeepsCommittedImage(t *testing.T) {
	const pages = 16
	g := newFakeGuest(pages)
	dir := t.TempDir()
	tracker, _ := dirtypages.NewCompare(g.ram, dirtypages.Options{})
	b, _ := NewBackup(BackupConfig{VMName: "vm1", RAMImage: filepath.Join(dir, "r"), StateFile: filepath.Join(dir, "s"), Heartbeat: hb})
	defer b.Close()
	p, _ := NewPrimary(PrimaryConfig{VMName: "vm1", KillGuest: noKill, StateDir: dir, Heartbeat: hb, Pipeline: PipelineConfig{Interval: 5 * time.Millisecond}}, g, g.ram, tracker)

	// A proxy that flips one byte of the payload of the first RAMPages
	// frame of epoch 3.
	pl, bl := corruptingPair(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	backupDone := make(chan error, 1)
	go func() { backupDone <- b.Serve(ctx, bl) }()
	perr := p.Run(ctx, pl)
	berr := <-backupDone
	if !errors.Is(perr, ErrPeerRejected) {
		t.Fatalf("primary: %v, want ErrPeerRejected", perr)
	}
	if !errors.Is(berr, transport.ErrCorrupt) || errors.Is(berr, ErrPeerLost) {
		t.Fatalf("backup: %v, want a corrupt-frame error (and no failover)", berr)
	}
	if c := b.Committed(); c.Epoch != 0 {
		t.Fatalf("backup may resume epoch %d after the session ended; want none (the primary runs on unprotected)", c.Epoch)
	}
	g.mu.Lock()
	snap := g.snaps[2]
	g.mu.Unlock()
	if !bytes.Equal(b.ram, snap) {
		t.Fatal("backup RAM image is not epoch 2's after the corrupt epoch 3: the corrupt epoch touched it")
	}
	if !g.isRunning() {
		t.Fatal("guest left paused")
	}
}

// noKill is a KillGuest for sessions that must never kill the guest.
func noKill(_ context.Context, reason string) error {
	panic("the session killed the guest: " + reason)
}

func tcpPair(t *testing.T) (*transport.Conn, *transport.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c1, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c2, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c1.Close(); c2.Close() })
	return transport.NewConn(c1), transport.NewConn(c2)
}

// corruptingPair relays primary->backup frames through a goroutine that
// flips a payload byte of the first RAMPages frame of the given epoch.
func corruptingPair(t *testing.T, epoch uint64) (*transport.Conn, *transport.Conn) {
	t.Helper()
	pRaw, mid1 := net.Pipe()
	mid2, bRaw := net.Pipe()
	t.Cleanup(func() { pRaw.Close(); mid1.Close(); mid2.Close(); bRaw.Close() })
	go func() { // backup -> primary untouched
		buf := make([]byte, 64<<10)
		for {
			n, err := mid2.Read(buf)
			if err != nil {
				mid1.Close()
				return
			}
			if _, err := mid1.Write(buf[:n]); err != nil {
				return
			}
		}
	}()
	go func() {
		r := transport.NewReader(mid1)
		done := false
		for {
			f, err := r.Next()
			if err != nil {
				mid2.Close()
				return
			}
			b := transport.AppendFrame(nil, f)
			if !done && f.Epoch == epoch && f.Type == transport.TypeRAMPages {
				b[transport.HeaderSize+20] ^= 0x01
				done = true
			}
			if _, err := mid2.Write(b); err != nil {
				return
			}
		}
	}()
	return transport.NewConn(pRaw), transport.NewConn(bRaw)
}

// fakeDisk plays both disk ends: the primary's recorder (one write per
// epoch, at offset = the number of cuts so far) and the backup's journal.
type fakeDisk struct {
	mu      sync.Mutex
	cuts    uint64
	direct  []uint64
	held    []uint64
	applied []uint64
}

func (d *fakeDisk) BeginCut() {}

func (d *fakeDisk) Cut() ([]transport.DiskWrite, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cuts++
	return []transport.DiskWrite{{Offset: d.cuts, Length: 1, Data: []byte{byte(d.cuts)}}}, nil
}

func (d *fakeDisk) Direct(w transport.DiskWrite) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.direct = append(d.direct, w.Offset)
	return nil
}

func (d *fakeDisk) Add(w transport.DiskWrite) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.held = append(d.held, w.Offset)
	return nil
}

func (d *fakeDisk) Commit() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.applied = append(d.applied, d.held...)
	d.held = nil
	return nil
}

func (d *fakeDisk) Discard() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.held = nil
}

// TestDiskWritesCommitWithTheirEpoch: the initial copy is applied at once
// before the first epoch; each epoch's writes are applied exactly when it
// commits; the writes of an epoch that does not commit never are.
func TestDiskWritesCommitWithTheirEpoch(t *testing.T) {
	g := newFakeGuest(16)
	dir := t.TempDir()
	tracker, err := dirtypages.NewCompare(g.ram, dirtypages.Options{})
	if err != nil {
		t.Fatal(err)
	}
	disk := &fakeDisk{}
	var committed atomic.Uint64
	b, err := NewBackup(BackupConfig{VMName: "vm1", RAMImage: filepath.Join(dir, "backup.ram"), StateFile: filepath.Join(dir, "backup.state"),
		Heartbeat: hb, Disk: disk, OnCommit: func(epoch uint64, _ int) { committed.Store(epoch) }})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	p, err := NewPrimary(PrimaryConfig{VMName: "vm1", KillGuest: noKill, StateDir: dir, Heartbeat: hb, Pipeline: PipelineConfig{Interval: 5 * time.Millisecond},
		Disk: disk,
		Prepare: func(ctx context.Context, link Link) error {
			for off := uint64(100); off < 103; off++ {
				f, err := transport.NewFrame(0, transport.DiskWrite{Offset: off, Length: 1, Data: []byte{1}})
				if err != nil {
					return err
				}
				if err := link.Send(ctx, f); err != nil {
					return err
				}
			}
			return nil
		}}, g, g.ram, tracker)
	if err != nil {
		t.Fatal(err)
	}
	// Epoch 8 is damaged on the link: it and what follows never commit.
	pl, bl := corruptingPair(t, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	backupDone := make(chan error, 1)
	go func() { backupDone <- b.Serve(ctx, bl) }()
	primaryErr := p.Run(ctx, pl)
	if err := <-backupDone; err == nil {
		t.Fatal("the backup accepted the damaged epoch")
	}
	disk.mu.Lock()
	defer disk.mu.Unlock()
	if fmt.Sprint(disk.direct) != "[100 101 102]" {
		t.Fatalf("initial copy applied: %v", disk.direct)
	}
	c := committed.Load()
	var want []uint64
	for e := uint64(1); e <= c; e++ {
		want = append(want, e)
	}
	if c != 7 || fmt.Sprint(disk.applied) != fmt.Sprint(want) || len(disk.held) != 0 {
		t.Fatalf("committed %d epochs; disk writes applied %v, want %v; held %v (primary: %v)", c, disk.applied, want, disk.held, primaryErr)
	}
}

// TestSwitchoverHandsTheFinalEpochOver: a switchover over loopback TCP
// ends with the backup resuming the final epoch, taken with the guest
// paused, byte for byte; the guest here is left paused and killed; no
// output of it leaves unacknowledged.
func TestSwitchoverHandsTheFinalEpochOver(t *testing.T) {
	const pages = 32
	g := newFakeGuest(pages)
	dir := t.TempDir()
	tracker, err := dirtypages.NewCompare(g.ram, dirtypages.Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, committed := newCountingBackup(t, dir)
	killed := 0
	kill := func(context.Context, string) error { killed++; return nil }
	out := &fakeOutput{g: g, backup: committed.Load}
	p, err := NewPrimary(PrimaryConfig{VMName: "vm1", KillGuest: kill, StateDir: dir, Heartbeat: hb, Output: out,
		Pipeline: PipelineConfig{Interval: 5 * time.Millisecond}}, g, g.ram, tracker)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Switchover(withTimeout(t, 50*time.Millisecond)); err == nil {
		t.Fatal("switchover without a session accepted")
	}
	pl, bl := tcpPair(t)
	backupDone := make(chan error, 1)
	primaryDone := make(chan error, 1)
	go func() { backupDone <- b.Serve(ctx, bl) }()
	go func() { primaryDone <- p.Run(ctx, pl) }()
	for committed.Load() < 5 {
		time.Sleep(5 * time.Millisecond)
	}
	serr := p.Switchover(ctx)
	perr := <-primaryDone
	berr := <-backupDone
	if !errors.Is(serr, ErrSwitchedOver) || !errors.Is(perr, ErrSwitchedOver) {
		t.Fatalf("switchover: %v, Run: %v; want both switched over", serr, perr)
	}
	var lost *PrimaryLost
	if !errors.As(berr, &lost) || !strings.Contains(lost.Cause.Error(), "switchover") {
		t.Fatalf("backup: %v, want it to resume on the switchover", berr)
	}
	if killed != 1 || g.isRunning() {
		t.Fatalf("guest killed %d times, running %v: want killed once, left paused", killed, g.isRunning())
	}
	g.mu.Lock()
	final := len(g.snaps) // stops are numbered from 1
	snap := g.snaps[final]
	g.mu.Unlock()
	if lost.Committed.Epoch != uint64(final) {
		t.Fatalf("backup resumes epoch %d; the final epoch taken was %d", lost.Committed.Epoch, final)
	}
	if !bytes.Equal(b.ram, snap) {
		t.Fatal("the backup's image differs from the guest's RAM at the final pause")
	}
	out.mu.Lock()
	defer out.mu.Unlock()
	held := false
	for _, e := range out.events {
		held = held || e == "hold"
		if e == "pass" && held {
			t.Fatalf("output let go unacknowledged: %v", out.events)
		}
	}
	for _, p := range out.problems {
		t.Error(p)
	}
}

func withTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

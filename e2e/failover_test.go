package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/testguest"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/testvm/counter"
)

// seen is one reply the client received, and when.
type seen struct {
	counter.Reply
	at time.Time
}

// TestFailoverResumesLastCommittedCheckpoint protects the test guest with
// two remusd processes, lets the counter service and the page dirtier run
// under protection for 5 s at the default 25 ms epoch, then kills the
// primary QEMU and the primary remusd together at one point of the epoch
// cycle. The backup must resume the same boot (same boot id, uptime not
// reset) with the counter at or above the last value the client received
// before the last acknowledged epoch began, within 1 s of detection.
func TestFailoverResumesLastCommittedCheckpoint(t *testing.T) {
	for _, point := range []string{"paused", "resumed", "shipping", "shipped", "acked"} {
		t.Run(point, func(t *testing.T) { failoverAt(t, point) })
	}
}

func failoverAt(t *testing.T, point string) {
	bin := remusd(t)
	net0 := newNetwork(t)
	dir, err := os.MkdirTemp("/dev/shm", "remus-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	// 1,000 pages per 25 ms epoch.
	prim := guestConfig(t, dir, "primary", 40000)
	back := guestConfig(t, dir, "backup", 40000)
	back.RAMPath = filepath.Join(dir, "backup-image.ram")
	backupArgs, err := back.Args()
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	primLn, err := netbuffer.ListenUnix(prim.NIC.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer primLn.Close()
	backLn, err := netbuffer.ListenUnix(back.NIC.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer backLn.Close()

	vm := testguest.Launch(t, prim)
	net0.attach(t, ctx, primLn)
	ready := testguest.WaitReady(t, vm)

	peer := freePort(t)
	report := filepath.Join(dir, "failover.json")
	// A heartbeat timeout of 1 s keeps a loaded test machine from declaring
	// a live primary dead; detection time is reported, not asserted.
	hbTimeout := "1s"
	backup := start(t, bin, append([]string{"backup", "--vm", "e2e", "--listen", peer, "--state-dir", filepath.Join(dir, "backup-state"),
		"--ram-image", back.RAMPath, "--qmp", back.QMP[1], "--report", report, "--heartbeat-timeout", hbTimeout, "--",
		back.QEMU}, backupArgs...)...)
	t.Cleanup(func() {
		// The restored QEMU outlives remusd by design; end it here.
		if r, _, err := readReport(report); err == nil && r.QEMUPID > 0 {
			syscall.Kill(r.QEMUPID, syscall.SIGKILL)
		}
	})
	epochLog := filepath.Join(dir, "epochs.jsonl")
	trigger := filepath.Join(dir, "kill-now")
	primary := start(t, bin, "primary", "--vm", "e2e", "--qmp", prim.QMP[1], "--peer", peer, "--state-dir", filepath.Join(dir, "primary-state"),
		"--epoch-log", epochLog, "--heartbeat-timeout", hbTimeout, "--fault", point+":1", "--fault-trigger", trigger)

	conn, err := net0.ns.DialContext(ctx, "tcp", guestSvc)
	if err != nil {
		t.Fatalf("connect to the guest: %v", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Minute))
	cl := counter.NewClient(conn)

	// Wait for the first (full) checkpoint to commit, then run protected
	// for 5 s, incrementing all the while.
	var got []seen
	inc := func() {
		r, err := cl.Inc()
		if err != nil {
			t.Fatalf("INC: %v", err)
		}
		got = append(got, seen{r, time.Now()})
	}
	for len(readEpochLog(t, epochLog)) == 0 {
		inc()
		if ctx.Err() != nil {
			t.Fatal("no epoch committed")
		}
	}
	protectedFrom := time.Now()
	for time.Since(protectedFrom) < 5*time.Second {
		inc()
	}

	// Arm the fault; keep the client busy until the primary stops at it.
	if err := os.WriteFile(trigger, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	faultLine := make(chan error, 1)
	go func() {
		_, err := primary.waitLine(ctx, agent.FaultReachedPrefix)
		faultLine <- err
	}()
	// At "paused" the guest stops answering; elsewhere it answers on.
	conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
waitFault:
	for {
		select {
		case err := <-faultLine:
			if err != nil {
				t.Fatal(err)
			}
			break waitFault
		default:
		}
		if r, err := cl.Inc(); err == nil {
			got = append(got, seen{r, time.Now()})
			conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
		} else {
			// A request may be in flight unanswered; keep waiting for
			// the fault line only.
			if err := <-faultLine; err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	vm.Kill()
	primary.kill()
	killedAt := time.Now()
	conn.Close()

	epochs := readEpochLog(t, epochLog)
	last := epochs[len(epochs)-1]
	t.Logf("killed at %s after %d replies; primary logged %d committed epochs, last %d (start %s)",
		point, len(got), len(epochs), last.Epoch, last.Start.Format("15:04:05.000"))

	_, r, err := waitReport(ctx, report, backup)
	if err != nil {
		t.Fatalf("%v\nbackup output:\n%s", err, backup.output())
	}
	t.Logf("failover: resumed epoch %d; detection %.0f ms, restore %.0f ms (load %.1f ms); %.0f ms after the kill",
		r.Epoch, r.DetectionMS, r.RestoreMS, r.LoadMS, float64(r.Running.Sub(killedAt).Microseconds())/1000)
	if r.Epoch < last.Epoch {
		t.Errorf("backup resumed epoch %d, older than epoch %d the primary saw acknowledged", r.Epoch, last.Epoch)
	}
	if r.RestoreMS >= 1000 {
		t.Errorf("restore took %.0f ms after detection, want < 1 s", r.RestoreMS)
	}

	// The backup's guest comes up on the same outside network.
	net0.attach(t, ctx, backLn)
	conn2, err := net0.ns.DialContext(ctx, "tcp", guestSvc)
	if err != nil {
		t.Fatalf("connect to the resumed guest: %v\nbackup console:\n%s", err, readFile(back.SerialLog))
	}
	defer conn2.Close()
	conn2.SetDeadline(time.Now().Add(time.Minute))
	now, err := counter.NewClient(conn2).Get()
	if err != nil {
		t.Fatalf("GET from the resumed guest: %v", err)
	}

	// The same boot, not a reboot.
	if now.BootID != ready.BootID {
		t.Fatalf("resumed guest has boot id %s, want %s: it rebooted", now.BootID, ready.BootID)
	}
	// The counter is at or above the last value received before the last
	// acknowledged epoch began, and at most one past the last value seen
	// (the client has one request in flight at most).
	var floor seen
	for _, s := range got {
		if s.at.Before(last.Start) {
			floor = s
		}
	}
	maxSeen := got[len(got)-1].Value
	if now.Value < floor.Value || now.Value > maxSeen+1 {
		t.Fatalf("resumed counter %d; want between %d (last reply before epoch %d began) and %d", now.Value, floor.Value, last.Epoch, maxSeen+1)
	}
	// Uptime did not reset: it is past that of the floor reply.
	if now.Uptime < floor.Uptime {
		t.Fatalf("resumed guest uptime %v is below %v seen before: it rebooted", now.Uptime, floor.Uptime)
	}
	t.Logf("resumed counter %d (floor %d, last seen %d), uptime %v", now.Value, floor.Value, maxSeen, now.Uptime)
}

func readReport(path string) (*agent.FailoverReport, []byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	var r agent.FailoverReport
	err = json.Unmarshal(b, &r)
	return &r, b, err
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}


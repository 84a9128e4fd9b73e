package e2e

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/lab"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/testvm/counter"
)

// seen is one reply the client received, and when.
type seen struct {
	counter.Reply
	at time.Time
}

// heartbeatTimeout keeps a loaded test machine from declaring a live primary
// dead; detection time is reported, not asserted.
const heartbeatTimeout = time.Second

// TestFailoverResumesLastCommittedCheckpoint protects the test guest with
// two remusd processes, lets the counter service and the page dirtier (1,000
// pages per epoch) run under protection for 5 s at the default 25 ms epoch,
// then kills the primary QEMU and the primary remusd together at one point
// of the epoch cycle. The backup must resume the same boot (same boot id,
// uptime not reset) with the counter at or above the last value the client
// received before the last acknowledged epoch began, within 1 s of
// detection.
func TestFailoverResumesLastCommittedCheckpoint(t *testing.T) {
	for _, point := range []string{"paused", "resumed", "shipping", "shipped", "acked"} {
		t.Run(point, func(t *testing.T) { failoverAt(t, point) })
	}
}

// TestFailoverWithMigrationSavedDeviceState is the same cycle with the
// fallback saver that QEMU builds without xen-save-devices-state use: a
// migration skipping shared RAM.
func TestFailoverWithMigrationSavedDeviceState(t *testing.T) {
	failoverAt(t, "shipped", "--device-state", "migrate")
}

func failoverAt(t *testing.T, point string, primaryArgs ...string) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	g := bootPrimary(t, l, ctx, 40000)
	vm, ready := g.vm, g.ready

	p, conn, trigger := protectWithFault(t, ctx, l, g, point, lab.ProtectOptions{PrimaryArgs: primaryArgs})
	conn.SetDeadline(time.Now().Add(time.Minute))
	cl := counter.NewClient(conn)
	var got []seen
	inc := func() error {
		r, err := cl.Inc()
		if err == nil {
			got = append(got, seen{r, time.Now()})
		}
		return err
	}

	// Run protected for 5 s, incrementing all the while.
	for from := time.Now(); time.Since(from) < 5*time.Second; {
		if err := inc(); err != nil {
			t.Fatalf("INC: %v", err)
		}
	}

	// Arm the fault and keep the client busy until the primary stops at
	// it. At "paused" the guest stops answering: a request may then stay
	// unanswered, and only the fault line is awaited.
	faulted := make(chan error, 1)
	go func() {
		_, err := p.Primary.WaitLine(ctx, agent.FaultReachedPrefix)
		faulted <- err
	}()
	if err := touch(trigger); err != nil {
		t.Fatal(err)
	}
	for waiting := true; waiting; {
		select {
		case err := <-faulted:
			if err != nil {
				t.Fatal(err)
			}
			waiting = false
		default:
			conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
			if inc() != nil {
				if err := <-faulted; err != nil {
					t.Fatal(err)
				}
				waiting = false
			}
		}
	}
	vm.Kill()
	p.Primary.Kill()
	killedAt := time.Now()
	conn.Close()

	last := lastEpoch(t, p)
	t.Logf("killed at %s after %d replies; the primary saw epoch %d (started %s) acknowledged last",
		point, len(got), last.Epoch, last.Start.Format("15:04:05.000"))

	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("failover: resumed epoch %d; detection %.0f ms, restore %.0f ms (device state load %.1f ms); guest running %.0f ms after the kill",
		r.Epoch, r.DetectionMS, r.RestoreMS, r.LoadMS, float64(r.Running.Sub(killedAt).Microseconds())/1000)
	if r.Epoch < last.Epoch {
		t.Errorf("backup resumed epoch %d, older than epoch %d the primary saw acknowledged", r.Epoch, last.Epoch)
	}
	// How long the restore takes is a measurement (the demo and the
	// failover report give it), not something a loaded test machine can
	// promise.

	// The backup's guest comes up on the same outside network.
	conn2, err := l.Dial(ctx)
	if err != nil {
		t.Fatalf("connect to the resumed guest: %v", err)
	}
	defer conn2.Close()
	conn2.SetDeadline(time.Now().Add(time.Minute))
	cl2 := counter.NewClient(conn2)
	now, err := cl2.Get()
	if err != nil {
		t.Fatalf("GET from the resumed guest: %v", err)
	}
	checkGuestMemory(t, cl2)

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
	if now.Uptime < floor.Uptime {
		t.Fatalf("resumed guest uptime %v is below %v seen before: it rebooted", now.Uptime, floor.Uptime)
	}
	t.Logf("resumed counter %d (floor %d, last seen %d), uptime %v", now.Value, floor.Value, maxSeen, now.Uptime)

	// A device state loaded by migration turned x-ignore-shared on in the
	// resumed guest's QEMU; it must not stay on (a later save of the VM,
	// virsh save say, would leave RAM out of its image).
	mon, err := qmp.Dial(ctx, p.BackupConfig.QMP[0])
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	if on, err := qemu.CapabilityOn(ctx, mon, qemu.IgnoreShared); err != nil || on {
		t.Fatalf("x-ignore-shared in the resumed guest's QEMU: on %v (%v), want off", on, err)
	}
}

func touch(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	return f.Close()
}

// TestFailoverIntoStandby protects the guest with a standby QEMU that runs
// on the backup from the start, waiting for a device state (as libvirt's
// standby domain does), instead of a command line the backup starts on
// failover: committed epochs go straight into the standby's RAM, and when
// the primary's host dies the backup hands that QEMU the device state by
// descriptor and continues it. The client's counter on its connection
// carries on, the same boot, with memory consistent, in the standby QEMU.
func TestFailoverIntoStandby(t *testing.T) {
	l := newLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g, p, c := protectGuest(t, ctx, l, lab.ProtectOptions{Standby: true}, 3)
	if !strings.Contains(p.Backup.Output(), "standby QEMU found") {
		t.Fatalf("the backup did not take the standby QEMU:\n%s", p.Backup.Output())
	}
	c.incFor(time.Second)
	g.vm.Kill()
	p.Primary.Kill()
	r, err := p.WaitReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.QEMUPID != p.StandbyVM.PID() || !strings.HasPrefix(r.IncomingURI, "fd:") {
		t.Fatalf("resumed in QEMU pid %d from %s; want the standby (pid %d) from a descriptor", r.QEMUPID, r.IncomingURI, p.StandbyVM.PID())
	}
	c.incFor(time.Second)
	if c.last.BootID != g.ready.BootID {
		t.Fatalf("boot %s after the failover, want %s", c.last.BootID, g.ready.BootID)
	}
	checkGuestMemory(t, c.cl)
	t.Logf("resumed epoch %d in the standby QEMU (pid %d): restore %.0f ms, device state load %.1f ms; %d consecutive replies",
		r.Epoch, r.QEMUPID, r.RestoreMS, r.LoadMS, c.n)
}

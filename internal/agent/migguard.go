package agent

import (
	"context"
	"log/slog"
	"time"

	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
)

// Migrations of the protected guest that remusd did not start (libvirt's
// save, managedsave, migrate, a snapshot with memory) would break
// protection: the guest moves or stops behind the agent's back, and an
// image saved with remusd's settings may lack guest RAM. So while remusd
// protects a guest whose device state it saves without migrating
// (xen-save-devices-state, the default), it cancels every migration it
// sees start (QMP MIGRATION events, which the "events" capability turns
// on: libvirt keeps it on, remusd turns it on where it is off and back off
// when it is done) and says so in its log; libvirt's command then fails
// ("canceled by client") and the guest runs on, protected.

// eventsCapability turns on QMP MIGRATION events.
const eventsCapability qemu.Capability = "events"

// guardMigrations cancels foreign migrations of the guest until ctx ends.
// It returns once the guard is in place, with the function that removes
// it (restoring the events capability if it turned it on).
func guardMigrations(ctx context.Context, mon *qmp.Client, log *slog.Logger) (stop func(), err error) {
	on, err := qemu.CapabilityOn(ctx, mon, eventsCapability)
	if err != nil {
		return nil, err
	}
	sub := mon.Subscribe("MIGRATION")
	if !on {
		if err := qemu.SetCapability(ctx, mon, eventsCapability, true); err != nil {
			sub.Close()
			return nil, err
		}
	}
	gctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-gctx.Done():
				return
			case ev, ok := <-sub.Events():
				if !ok {
					return
				}
				var d struct {
					Status string `json:"status"`
				}
				if ev.DecodeData(&d) != nil || (d.Status != "setup" && d.Status != "active") {
					continue
				}
				log.Error("a migration of the protected guest started that remusd did not start (virsh save, managedsave, migrate or a snapshot with memory?): cancelling it; end protection first (stop remusd primary)", "status", d.Status)
				cctx, ccancel := context.WithTimeout(gctx, 5*time.Second)
				if err := mon.Execute(cctx, "migrate_cancel", nil, nil); err != nil {
					log.Error("cancel the migration", "err", err)
				}
				ccancel()
			}
		}
	}()
	return func() {
		cancel()
		<-done
		sub.Close()
		if !on {
			rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			qemu.SetCapability(rctx, mon, eventsCapability, false)
			rcancel()
		}
	}, nil
}

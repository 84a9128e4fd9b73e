package agent

import (
	"context"
	"log/slog"
	"sync"

	"github.com/remus-kvm/remus/qmp"
)

// A guest that is shut down on purpose (powered off from inside, virsh
// shutdown, virsh destroy, a host shutting its guests down) must stay
// down: to the backup, a primary whose guest vanished looks like a crash,
// and it would resume the last checkpoint. QEMU says why it shuts down
// (QMP SHUTDOWN, reason): on a deliberate reason the primary ends
// protection with a goodbye the backup confirms, as remusctl unprotect
// does, and a checkpoint that fails because QEMU went is not taken for a
// stuck guest. A crash (QEMU killed, the host gone) emits no event: the
// backup resumes the guest, as it should.
//
// "host-qmp-quit" does not count: remusd itself quits the guest's QEMU when
// it hands the guest over (switchover, a guest stuck in a checkpoint),
// and the backup must then resume it.
var deliberateShutdown = map[string]bool{
	"guest-shutdown": true, // the guest powered itself off (ACPI, virsh shutdown)
	"host-signal":    true, // SIGTERM, SIGINT, SIGHUP (virsh destroy, a host shutting down)
	"host-ui":        true, // the display's close button
}

// shutdownWatch follows the guest's SHUTDOWN events.
type shutdownWatch struct {
	mu     sync.Mutex
	sub    *qmp.Subscription // drained by reason, which must see an event published before QEMU's monitor closed
	react  *qmp.Subscription // the watcher's own
	reason string
	done   chan struct{}
	cancel context.CancelFunc
}

// watchShutdown calls onShutdown (once) when QEMU says the guest shuts
// down on purpose, until ctx ends or close is called.
func watchShutdown(ctx context.Context, mon *qmp.Client, log *slog.Logger, onShutdown func(reason string)) *shutdownWatch {
	ctx, cancel := context.WithCancel(ctx)
	w := &shutdownWatch{sub: mon.Subscribe("SHUTDOWN"), react: mon.Subscribe("SHUTDOWN"), done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-w.react.Events():
				if !ok {
					return
				}
				reason := shutdownReason(ev)
				log.Info("QEMU shuts the guest down", "reason", reason)
				if deliberateShutdown[reason] {
					log.Warn("the guest is shut down on purpose: protection ends, and the backup will not resume it", "reason", reason)
					onShutdown(reason)
					return
				}
			}
		}
	}()
	return w
}

func shutdownReason(ev qmp.Event) string {
	var d struct {
		Reason string `json:"reason"`
	}
	ev.DecodeData(&d)
	return d.Reason
}

// Reason returns the reason of a deliberate shutdown QEMU announced, ""
// when it announced none. A nil watch has none.
func (w *shutdownWatch) Reason() string {
	if w == nil {
		return ""
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for {
		select {
		case ev, ok := <-w.sub.Events():
			if !ok {
				return w.reason
			}
			if r := shutdownReason(ev); deliberateShutdown[r] {
				w.reason = r
			}
		default:
			return w.reason
		}
	}
}

// close stops the watch.
func (w *shutdownWatch) close() {
	w.cancel()
	<-w.done
	w.sub.Close()
	w.react.Close()
}

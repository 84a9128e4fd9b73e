package agent

import (
	"log/slog"
	"testing"
	"time"

	"github.com/remus-kvm/remus/qmp/qmptest"
)

// TestShutdownWatch: a deliberate shutdown (guest-shutdown, host-signal,
// host-ui) is reported once and ends protection; remusd's own quit
// (host-qmp-quit) and a reset are not; Reason sees an event QEMU sent
// just before its monitor closed.
func TestShutdownWatch(t *testing.T) {
	for _, tc := range []struct {
		reasons []string
		want    string
	}{
		{[]string{"guest-shutdown"}, "guest-shutdown"},
		{[]string{"host-signal"}, "host-signal"},
		{[]string{"host-ui"}, "host-ui"},
		{[]string{"host-qmp-quit"}, ""},
		{[]string{"guest-reset", "host-qmp-system-reset"}, ""},
		{[]string{"host-qmp-quit", "host-signal"}, "host-signal"},
	} {
		t.Run(tc.reasons[len(tc.reasons)-1], func(t *testing.T) {
			mon, srv := qmptest.NewClient(t)
			called := make(chan string, 2)
			w := watchShutdown(t.Context(), mon, slog.New(slog.DiscardHandler), func(r string) { called <- r })
			defer w.close()
			for _, r := range tc.reasons {
				if err := srv.Event("SHUTDOWN", map[string]any{"guest": r == "guest-shutdown", "reason": r}); err != nil {
					t.Fatal(err)
				}
			}
			// QEMU exits: its monitor closes right after the event, and
			// the client sees it closed only after the events before.
			srv.Close()
			select {
			case <-mon.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the client did not see the monitor close")
			}
			if got := w.Reason(); got != tc.want {
				t.Fatalf("Reason() = %q, want %q", got, tc.want)
			}
			wait := 2 * time.Second
			if tc.want == "" {
				wait = 200 * time.Millisecond
			}
			select {
			case r := <-called:
				if r != tc.want || tc.want == "" {
					t.Fatalf("onShutdown(%q), want %q", r, tc.want)
				}
			case <-time.After(wait):
				if tc.want != "" {
					t.Fatalf("onShutdown not called for %v", tc.reasons)
				}
			}
			if len(called) > 0 {
				t.Fatalf("onShutdown called more than once")
			}
		})
	}
	var none *shutdownWatch
	if none.Reason() != "" {
		t.Fatal("a nil watch has a reason")
	}
}

package main

import (
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
)

func TestPrintStatus(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	var b strings.Builder
	printStatus(&b, agent.PrimaryStatus{VM: "web1", Role: "primary", State: "stopped", Why: "no witness lease and no acknowledgement from the backup for 400ms",
		CommittedEpoch: 812, CommittedAt: now.Add(-1500 * time.Millisecond), Witness: "host-a", WitnessOwner: "host-a"}, now)
	for _, want := range []string{"state       stopped", "why         no witness lease", "epoch 812, 1.5s ago", `this host is "host-a"`, `owner "host-a", active ""`} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	printStatus(&b, agent.PrimaryStatus{VM: "web1", Role: "primary", State: "unprotected"}, now)
	if !strings.Contains(b.String(), "none (fail-stop assumed)") || strings.Contains(b.String(), "committed") || strings.Contains(b.String(), "sync") {
		t.Errorf("status without witness or commits:\n%s", b.String())
	}
	b.Reset()
	printStatus(&b, agent.PrimaryStatus{VM: "web1", Role: "primary", State: "syncing", Sync: &agent.SyncStatus{Round: 1, Pages: 16384, RAMPages: 65536, Percent: 25}}, now)
	if !strings.Contains(b.String(), "state       syncing") || !strings.Contains(b.String(), "sync        round 1, 25% of guest RAM sent (16384 of 65536 pages") {
		t.Errorf("status while syncing:\n%s", b.String())
	}
}

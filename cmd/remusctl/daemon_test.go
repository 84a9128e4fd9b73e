package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/daemon"
)

// TestPrintVMs: the daemon's table, a line per VM with what matters most
// for its state, and one VM with its agent's status below.
func TestPrintVMs(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	raw := func(v any) json.RawMessage {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	vms := []daemon.VMStatus{
		{Name: "db1", Role: daemon.RolePrimary, State: daemon.StateProtected, Peer: "hostb",
			Agent: raw(agent.PrimaryStatus{VM: "db1", Role: "primary", State: "protecting", CommittedEpoch: 812,
				Recent: &agent.RecentStats{EpochsPerS: 33.3, PauseP50MS: 4.25}})},
		{Name: "web", Role: daemon.RolePrimary, State: daemon.StateSyncing, Peer: "hostb",
			Agent: raw(agent.PrimaryStatus{VM: "web", Role: "primary", State: "syncing", Sync: &agent.SyncStatus{Round: 1, Percent: 42}})},
		{Name: "mail", Role: daemon.RoleBackup, State: daemon.StateStandby, Peer: "hosta",
			Agent: raw(agent.BackupStatus{VM: "mail", Role: "backup", State: "standby", CommittedEpoch: 77})},
		{Name: "old", Role: daemon.RolePrimary, State: daemon.StateEnded, Peer: "hostb", Why: "the domain was shut down"},
	}
	var b strings.Builder
	printVMs(&b, vms)
	for _, want := range []string{
		"VM                   ROLE     STATE          PEER                 DETAIL\n",
		"db1                  primary  protected      hostb                epoch 812, 33 epochs/s, pause p50 4.2 ms\n",
		"web                  primary  syncing        hostb                42% of RAM sent (round 1)\n",
		"mail                 backup   standby        hosta                epoch 77\n",
		"old                  primary  ended          hostb                the domain was shut down\n",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	printVMs(&b, nil)
	if b.String() != "no VM is protected on this host\n" {
		t.Errorf("empty table: %q", b.String())
	}

	b.Reset()
	v := vms[0]
	v.Domain, v.AgentPID, v.Since, v.Restarts = "db1", 4711, now.Add(-time.Hour), 2
	v.PeerView = &vms[2]
	v.PeerView.Domain = "mail-standby"
	printVM(&b, v, now)
	if want := "peer        standby on hostb (domain mail-standby): epoch 77\n"; !strings.Contains(b.String(), want) {
		t.Errorf("one VM lacks %q:\n%s", want, b.String())
	}
	b.Reset()
	v.PeerView, v.PeerError = nil, "peer remusd at hostb:7790: connection refused"
	printVM(&b, v, now)
	if want := "peer        hostb: peer remusd at hostb:7790: connection refused\n"; !strings.Contains(b.String(), want) {
		t.Errorf("one VM lacks %q:\n%s", want, b.String())
	}
	b.Reset()
	v.PeerError = ""
	printVM(&b, v, now)
	for _, want := range []string{"vm          db1\n", "role        primary (domain db1, peer hostb)\n", "state       protected\n",
		"agent       pid 4711 since 2026-12-01T11:00:00Z, started again 2 times\n", "--- agent\n", "state       protecting\n"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("one VM lacks %q:\n%s", want, b.String())
		}
	}
	if bar(42, 10) != "[####......]" || bar(-5, 4) != "[....]" || bar(150, 4) != "[####]" {
		t.Errorf("bar: %q %q %q", bar(42, 10), bar(-5, 4), bar(150, 4))
	}
}

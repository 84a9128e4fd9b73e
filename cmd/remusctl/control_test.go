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
	b.Reset()
	printStatus(&b, agent.PrimaryStatus{VM: "web1", Role: "primary", State: "protecting", Peer: "10.0.0.2:7070", CommittedEpoch: 9, CommittedAt: now,
		Recent: &agent.RecentStats{WindowS: 10, EpochsPerS: 33.3, PauseP50MS: 4.2, PauseP99MS: 17.85, RawBytesPerS: 12.5 * (1 << 20), WireBytesPerS: 3 << 20, HeldOutputBytes: 1536}}, now)
	for _, want := range []string{"backup      10.0.0.2:7070\n",
		"recent      33.3 epochs/s, pause p50 4.2 ms p99 17.9 ms, raw 12.5 MiB/s, wire 3.0 MiB/s, held 1.5 KiB\n"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	printStatus(&b, agent.PrimaryStatus{VM: "web1", Role: "primary", State: "protecting",
		Recent: &agent.RecentStats{WindowS: 0.45, EpochsPerS: 2000, HeldOutputBytes: 100}}, now)
	if want := "raw 0 B/s, wire 0 B/s, held 100 B (over the last 0.45s)\n"; !strings.Contains(b.String(), want) {
		t.Errorf("status output lacks %q:\n%s", want, b.String())
	}
}

func TestPrintBackupStatus(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	var b strings.Builder
	printBackupStatus(&b, agent.BackupStatus{VM: "web1", Role: "backup", State: agent.BackupWaiting, Why: "no epoch committed yet: waiting for a primary's first epoch"}, now)
	want := "vm          web1\nrole        backup\nstate       waiting\nwhy         no epoch committed yet: waiting for a primary's first epoch\n"
	if b.String() != want {
		t.Errorf("waiting backup:\n%s\nwant\n%s", b.String(), want)
	}
	b.Reset()
	printBackupStatus(&b, agent.BackupStatus{VM: "web1", Role: "backup", State: agent.BackupStandby, Why: "holds a committed epoch",
		CommittedEpoch: 812, CommittedAt: now.Add(-250 * time.Millisecond), Primary: "10.0.0.1:41000"}, now)
	for _, want := range []string{"state       standby\n", "committed   epoch 812, 250ms ago\n", "primary     10.0.0.1:41000\n"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("standby backup lacks %q:\n%s", want, b.String())
		}
	}
	if strings.Contains(b.String(), "failover") {
		t.Errorf("standby backup with a failover line:\n%s", b.String())
	}
	b.Reset()
	printBackupStatus(&b, agent.BackupStatus{VM: "web1", Role: "backup", State: agent.BackupFailedOver, Why: "the guest runs here", CommittedEpoch: 812,
		CommittedAt: now.Add(-time.Minute), Failover: &agent.FailoverReport{Epoch: 812, QEMUPID: 4242, Running: now.Add(-2 * time.Second),
			DetectionMS: 510, ClearMS: 1200, RestoreMS: 290, Cause: "primary silent for 500ms"}}, now)
	if want := "failover    epoch 812 resumed in QEMU pid 4242, 2s ago (detection 510 ms, clear 1200 ms, restore 290 ms; cause: primary silent for 500ms)\n"; !strings.Contains(b.String(), want) {
		t.Errorf("failed-over backup lacks %q:\n%s", want, b.String())
	}
	b.Reset()
	printBackupStatus(&b, agent.BackupStatus{VM: "web1", Role: "backup", State: agent.BackupFailoverFailed, Why: "the failover failed: QEMU did not start",
		Failover: &agent.FailoverReport{Epoch: 7, Cause: "connection reset"}}, now)
	if want := "failover    epoch 7 not resumed (cause: connection reset)\n"; !strings.Contains(b.String(), want) {
		t.Errorf("failed failover lacks %q:\n%s", want, b.String())
	}
}

func TestPrintAnswer(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		answer, want string
	}{
		{`{"vm":"web1","role":"primary","state":"protecting","committed_epoch":3,"peer":"10.0.0.2:7070"}`, "backup      10.0.0.2:7070\n"},
		{`{"vm":"web1","role":"backup","state":"standby","committed_epoch":3,"primary":"10.0.0.1:41000"}`, "primary     10.0.0.1:41000\n"},
	} {
		var b strings.Builder
		if err := printAnswer(&b, []byte(tc.answer), now); err != nil || !strings.Contains(b.String(), tc.want) {
			t.Errorf("printAnswer(%s): %v\n%s\nwant %q", tc.answer, err, b.String(), tc.want)
		}
	}
	var b strings.Builder
	if err := printAnswer(&b, []byte(`{"role":"witness"}`), now); err == nil {
		t.Errorf("an unknown role printed:\n%s", b.String())
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[float64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 3 << 20: "3.0 MiB", 5 << 30: "5.0 GiB", 2 << 40: "2.0 TiB", 4096 << 40: "4096.0 TiB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%v) = %q, want %q", n, got, want)
		}
	}
}

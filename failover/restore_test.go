package failover

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/remus-kvm/remus/qemu"
)

// fakeQEMU plays a QEMU started with -incoming defer: the load completes
// after a few polls, or fails with loadErr.
type fakeQEMU struct {
	calls   []string
	polls   int
	loadErr string
	status  string // after cont
}

func (q *fakeQEMU) Execute(ctx context.Context, command string, args, result any) error {
	q.calls = append(q.calls, command)
	switch command {
	case "query-migrate":
		m := result.(*qemu.Migration)
		q.polls++
		switch {
		case q.polls < 3:
			m.Status = "active"
		case q.loadErr != "":
			m.Status, m.ErrorDesc = "failed", q.loadErr
		default:
			m.Status = "completed"
		}
	case "query-status":
		st := result.(*struct {
			Status string `json:"status"`
		})
		st.Status = q.status
	}
	return nil
}

func TestRestore(t *testing.T) {
	for _, tc := range []struct {
		name   string
		format qemu.StateFormat
		q      fakeQEMU
		calls  []string
		err    string
	}{
		{"xen state", qemu.StateFormat{}, fakeQEMU{status: "running"},
			[]string{"migrate-incoming", "query-migrate", "query-migrate", "query-migrate", "cont", "query-status"}, ""},
		{"migration state skips shared RAM", qemu.StateFormat{Configuration: true}, fakeQEMU{status: "running"},
			[]string{"migrate-set-capabilities", "migrate-incoming", "query-migrate", "query-migrate", "query-migrate", "migrate-set-capabilities", "cont", "query-status"}, ""},
		{"load fails", qemu.StateFormat{}, fakeQEMU{loadErr: "bad section"},
			[]string{"migrate-incoming", "query-migrate", "query-migrate", "query-migrate"}, "loading the device state: migration failed: bad section"},
		{"guest not running", qemu.StateFormat{}, fakeQEMU{status: "paused"},
			[]string{"migrate-incoming", "query-migrate", "query-migrate", "query-migrate", "cont", "query-status"}, `guest is "paused" after cont`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(t.Context(), &tc.q, "file:/state", tc.format)
			if err == nil {
				_, err = Resume(t.Context(), &tc.q)
			}
			if tc.err == "" && err != nil || tc.err != "" && (!errors.Is(err, ErrRestore) || !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("Restore = %v, want %q", err, tc.err)
			}
			if !slices.Equal(tc.q.calls, tc.calls) {
				t.Errorf("sent %q, want %q", tc.q.calls, tc.calls)
			}
		})
	}
}

func TestStateFileSave(t *testing.T) {
	path := filepath.Join(t.TempDir(), "devices.state")
	s := StateFile{Path: path}
	for _, data := range []string{"QEVM first", "QEVM second"} {
		if err := s.Save([]byte(data)); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(path); err != nil || string(got) != data {
			t.Errorf("after Save(%q): %q, %v", data, got, err)
		}
	}
	if _, err := os.Stat(path + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the temporary file is left: %v", err)
	}
}

package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/qmp"
)

// fakeMonitor answers commands from a table and records them with their
// arguments as JSON, as QEMU would read them.
type fakeMonitor struct {
	calls []string                                  // "command {args}"
	reply map[string]func(args string) (any, error) // by command; nil reply: {}
}

func (m *fakeMonitor) Execute(ctx context.Context, command string, args, result any) error {
	a := ""
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return err
		}
		a = string(b)
	}
	m.calls = append(m.calls, strings.TrimSpace(command+" "+a))
	f := m.reply[command]
	if f == nil {
		return nil
	}
	v, err := f(a)
	if err != nil || result == nil {
		return err
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, result)
}

// sequence returns a reply function that answers each call with the next
// value, repeating the last.
func sequence(vs ...any) func(string) (any, error) {
	return func(string) (any, error) {
		v := vs[0]
		if len(vs) > 1 {
			vs = vs[1:]
		}
		return v, nil
	}
}

func TestParseStateFormat(t *testing.T) {
	for _, tc := range []struct {
		name   string
		head   []byte
		config bool
		ok     bool
	}{
		{"xen-save-devices-state", []byte("QEVM\x00\x00\x00\x03\x04"), false, true},
		{"migration with configuration", []byte("QEVM\x00\x00\x00\x03\x07"), true, true},
		{"wrong magic", []byte("QEMU\x00\x00\x00\x03\x04"), false, false},
		{"wrong version", []byte("QEVM\x00\x00\x00\x02\x04"), false, false},
		{"short", []byte("QEVM"), false, false},
	} {
		f, err := ParseStateFormat(tc.head)
		if (err == nil) != tc.ok || f.Configuration != tc.config {
			t.Errorf("%s: got %+v, %v", tc.name, f, err)
		}
	}
	if !slices.Contains(RestoreArgs(StateFormat{}), "migration.send-configuration=off") {
		t.Error("a state without configuration must be loaded with send-configuration=off")
	}
	if slices.Contains(RestoreArgs(StateFormat{Configuration: true}), "migration.send-configuration=off") {
		t.Error("a state with configuration must not be loaded with send-configuration=off")
	}
}

func TestReadStateFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "devices.state")
	if err := os.WriteFile(path, []byte("QEVM\x00\x00\x00\x03\x07rest"), 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := ReadStateFormat(path); err != nil || !f.Configuration {
		t.Errorf("ReadStateFormat = %+v, %v; want a configuration section", f, err)
	}
	if _, err := ReadStateFormat(path + ".missing"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a missing file: %v", err)
	}
}

func TestURIs(t *testing.T) {
	for _, tc := range []struct {
		major, minor int
		in, out      string
	}{
		{7, 2, "exec:cat '/tmp/a b'", "exec:cat > '/tmp/a b'"},
		{8, 1, "exec:cat '/tmp/a b'", "exec:cat > '/tmp/a b'"},
		{8, 2, "file:/tmp/a b", "file:/tmp/a b"},
		{10, 0, "file:/tmp/a b", "file:/tmp/a b"},
	} {
		v := qmp.Version{Major: tc.major, Minor: tc.minor}
		if got := IncomingURI("/tmp/a b", v); got != tc.in {
			t.Errorf("IncomingURI on %d.%d = %q, want %q", tc.major, tc.minor, got, tc.in)
		}
		if got := OutgoingURI("/tmp/a b", v); got != tc.out {
			t.Errorf("OutgoingURI on %d.%d = %q, want %q", tc.major, tc.minor, got, tc.out)
		}
	}
	if got := IncomingURI("/it's", qmp.Version{Major: 7, Minor: 2}); got != `exec:cat '/it'\''s'` {
		t.Errorf("quoting: %q", got)
	}
}

func TestWaitMigration(t *testing.T) {
	for _, tc := range []struct {
		name    string
		replies []any
		err     string // "" for success
	}{
		{"completes", []any{Migration{Status: "setup"}, Migration{Status: "active"}, Migration{Status: "completed"}}, ""},
		{"fails", []any{Migration{Status: "active"}, Migration{Status: "failed", ErrorDesc: "no space"}}, "migration failed: no space"},
		{"cancelled", []any{Migration{Status: "cancelled"}}, "migration cancelled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mon := &fakeMonitor{reply: map[string]func(string) (any, error){"query-migrate": sequence(tc.replies...)}}
			err := WaitMigration(t.Context(), mon, time.Microsecond)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || err.Error() != tc.err) {
				t.Errorf("WaitMigration = %v, want %q", err, tc.err)
			}
		})
	}
	t.Run("context", func(t *testing.T) {
		mon := &fakeMonitor{reply: map[string]func(string) (any, error){"query-migrate": sequence(Migration{Status: "active"})}}
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if err := WaitMigration(ctx, mon, time.Hour); !errors.Is(err, context.Canceled) {
			t.Errorf("WaitMigration after cancel = %v", err)
		}
	})
}

func TestDeviceSaver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "devices.state")
	completed := sequence(Migration{Status: "completed"})
	for _, tc := range []struct {
		saver DeviceSaver
		want  []string
	}{
		{DeviceSaver{}, []string{`xen-save-devices-state {"filename":"` + path + `","live":false}`}},
		{DeviceSaver{Migrate: true, Version: qmp.Version{Major: 7, Minor: 2}}, []string{
			`migrate-set-capabilities {"capabilities":[{"capability":"x-ignore-shared","state":true}]}`,
			`migrate {"uri":"exec:cat \u003e '` + path + `'"}`,
			`query-migrate`,
			// completed, but still in finish-migrate once: asked again
			`query-status`, `query-status`,
			// and the capability is not left on
			`migrate-set-capabilities {"capabilities":[{"capability":"x-ignore-shared","state":false}]}`,
		}},
		{DeviceSaver{Migrate: true, Version: qmp.Version{Major: 10}}, []string{
			`migrate-set-capabilities {"capabilities":[{"capability":"x-ignore-shared","state":true}]}`,
			`migrate {"uri":"file:` + path + `"}`,
			`query-migrate`,
			`query-status`, `query-status`,
			`migrate-set-capabilities {"capabilities":[{"capability":"x-ignore-shared","state":false}]}`,
		}},
	} {
		mon := &fakeMonitor{reply: map[string]func(string) (any, error){"query-migrate": completed,
			"query-status": sequence(map[string]string{"status": "finish-migrate"}, map[string]string{"status": "postmigrate"})}}
		if err := tc.saver.Save(t.Context(), mon, path); err != nil {
			t.Fatalf("%v: %v", tc.saver, err)
		}
		if !slices.Equal(mon.calls, tc.want) {
			t.Errorf("%v sent\n%q\nwant\n%q", tc.saver, mon.calls, tc.want)
		}
	}
}

func TestPollBlockJob(t *testing.T) {
	jobs := sequence(
		[]BlockJob{{Device: "other"}, {Device: "m", Len: 10}},
		[]BlockJob{{Device: "m", Offset: 10, Len: 10, Ready: true}},
		[]BlockJob{},
	)
	mon := &fakeMonitor{reply: map[string]func(string) (any, error){"query-block-jobs": jobs}}
	var seen []string
	err := PollBlockJob(t.Context(), mon, "m", time.Microsecond, func(j *BlockJob) (bool, error) {
		if j == nil {
			seen = append(seen, "gone")
			return true, nil
		}
		seen = append(seen, fmt.Sprintf("%d/%d ready=%v", j.Offset, j.Len, j.Ready))
		return false, nil
	})
	if want := []string{"0/10 ready=false", "10/10 ready=true", "gone"}; err != nil || !slices.Equal(seen, want) {
		t.Errorf("PollBlockJob = %v, saw %q, want %q", err, seen, want)
	}
	stop := errors.New("stop")
	if err := PollBlockJob(t.Context(), mon, "m", time.Microsecond, func(*BlockJob) (bool, error) { return false, stop }); err != stop {
		t.Errorf("PollBlockJob returned %v, want fn's error", err)
	}
}

func TestBlockCommands(t *testing.T) {
	mon := &fakeMonitor{reply: map[string]func(string) (any, error){
		"query-named-block-nodes": sequence([]map[string]any{{"node-name": "disk0", "image": map[string]any{"virtual-size": 1 << 20}}}),
	}}
	ctx := t.Context()
	if size, err := NodeSize(ctx, mon, "disk0"); err != nil || size != 1<<20 {
		t.Errorf("NodeSize = %d, %v", size, err)
	}
	if _, err := NodeSize(ctx, mon, "disk1"); err == nil || !strings.Contains(err.Error(), "[disk0]") {
		t.Errorf("NodeSize of a missing node = %v, want the nodes there are", err)
	}
	AddNBDNode(ctx, mon, NBDNode{NodeName: "t", Export: "e", Socket: "/s"})
	AddNBDNode(ctx, mon, NBDNode{NodeName: "t", Export: "e", FD: "remus-nbd"})
	StartMirror(ctx, mon, Mirror{JobID: "m", Device: "disk0", Target: "t", Sync: "full", CopyMode: "write-blocking"})
	CancelBlockJob(ctx, mon, "m", true)
	DelNode(ctx, mon, "t")
	want := []string{
		`query-named-block-nodes {"flat":true}`,
		`query-named-block-nodes {"flat":true}`,
		`blockdev-add {"driver":"nbd","node-name":"t","export":"e","server":{"type":"unix","path":"/s"}}`,
		`blockdev-add {"driver":"nbd","node-name":"t","export":"e","server":{"type":"fd","str":"remus-nbd"}}`,
		`blockdev-mirror {"job-id":"m","device":"disk0","target":"t","sync":"full","copy-mode":"write-blocking"}`,
		`block-job-cancel {"device":"m","force":true}`,
		`blockdev-del {"node-name":"t"}`,
	}
	if !slices.Equal(mon.calls, want) {
		t.Errorf("sent\n%q\nwant\n%q", mon.calls, want)
	}
}

func TestFindRAMBackend(t *testing.T) {
	objects := []map[string]string{{"name": "pc.ram", "type": "child<memory-region>"}, {"name": "ram0", "type": "child<memory-backend-file>"}}
	props := func(share bool) func(string) (any, error) {
		return func(args string) (any, error) {
			switch {
			case strings.Contains(args, `"share"`):
				return share, nil
			case strings.Contains(args, `"size"`):
				return 1 << 30, nil
			case strings.Contains(args, `"mem-path"`):
				return "/dev/shm/ram", nil
			}
			return nil, fmt.Errorf("unexpected qom-get %s", args)
		}
	}
	mon := &fakeMonitor{reply: map[string]func(string) (any, error){"qom-list": sequence(objects), "qom-get": props(true)}}
	b, err := FindRAMBackend(t.Context(), mon)
	if want := (RAMBackend{ID: "ram0", Type: "memory-backend-file", Path: "/dev/shm/ram", Size: 1 << 30}); err != nil || b != want {
		t.Errorf("FindRAMBackend = %+v, %v; want %+v", b, err, want)
	}
	mon = &fakeMonitor{reply: map[string]func(string) (any, error){"qom-list": sequence(objects), "qom-get": props(false)}}
	if _, err := FindRAMBackend(t.Context(), mon); !errors.Is(err, ErrNotShared) {
		t.Errorf("share=off: %v, want ErrNotShared", err)
	}
	mon = &fakeMonitor{reply: map[string]func(string) (any, error){"qom-list": sequence(objects[:1])}}
	if _, err := FindRAMBackend(t.Context(), mon); !errors.Is(err, ErrNotShared) {
		t.Errorf("no backend: %v, want ErrNotShared", err)
	}
}

func TestCommands(t *testing.T) {
	mon := &fakeMonitor{reply: map[string]func(string) (any, error){
		"query-status":   sequence(map[string]string{"status": "paused"}),
		"query-commands": sequence([]map[string]string{{"name": "stop"}, {"name": "xen-save-devices-state"}}),
	}}
	ctx := t.Context()
	Stop(ctx, mon)
	Cont(ctx, mon)
	Quit(ctx, mon)
	if st, err := Status(ctx, mon); err != nil || st != "paused" {
		t.Errorf("Status = %q, %v", st, err)
	}
	if ok, err := HasCommand(ctx, mon, "xen-save-devices-state"); err != nil || !ok {
		t.Errorf("HasCommand(xen-save-devices-state) = %v, %v", ok, err)
	}
	if ok, _ := HasCommand(ctx, mon, "migrate"); ok {
		t.Error("HasCommand(migrate) = true")
	}
	MigrateIncoming(ctx, mon, "file:/s")
	Announce(ctx, mon)
	want := []string{"stop", "cont", "quit", "query-status", "query-commands", "query-commands",
		`migrate-incoming {"uri":"file:/s"}`, `announce-self {"initial":50,"max":550,"rounds":5,"step":100}`}
	if !slices.Equal(mon.calls, want) {
		t.Errorf("sent\n%q\nwant\n%q", mon.calls, want)
	}
}

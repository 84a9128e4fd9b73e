package failover

import (
	"slices"
	"testing"
)

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

func TestURIs(t *testing.T) {
	for _, tc := range []struct {
		major, minor int
		in, out      string
	}{
		{7, 2, "exec:cat '/tmp/a b'", "exec:cat > '/tmp/a b'"},
		{8, 2, "file:/tmp/a b", "file:/tmp/a b"},
		{10, 0, "file:/tmp/a b", "file:/tmp/a b"},
	} {
		if got := IncomingURI("/tmp/a b", tc.major, tc.minor); got != tc.in {
			t.Errorf("IncomingURI on %d.%d = %q, want %q", tc.major, tc.minor, got, tc.in)
		}
		if got := OutgoingURI("/tmp/a b", tc.major, tc.minor); got != tc.out {
			t.Errorf("OutgoingURI on %d.%d = %q, want %q", tc.major, tc.minor, got, tc.out)
		}
	}
	if got := IncomingURI("/it's", 7, 2); got != `exec:cat '/it'\''s'` {
		t.Errorf("quoting: %q", got)
	}
}

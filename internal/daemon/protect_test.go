package daemon

import (
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestMergeRequest: a request given again keeps the first one's flags
// where it leaves them out, and wins where it gives them.
func TestMergeRequest(t *testing.T) {
	first := ProtectRequest{Peer: "hostb", Epoch: 50 * time.Millisecond, Tap: "tap-a", PeerTap: "tap-b", Netns: "/run/netns/a", PeerNetns: "/run/netns/b"}
	if got := mergeRequest(ProtectRequest{}, first); got != first {
		t.Errorf("an empty request: %+v, want %+v", got, first)
	}
	again := ProtectRequest{Peer: "hostc:7791", PeerTap: "tap-c"}
	want := first
	want.Peer, want.PeerTap = "hostc:7791", "tap-c"
	if got := mergeRequest(again, first); got != want {
		t.Errorf("a request with a new peer: %+v, want %+v", got, want)
	}
}

// TestAllocPort: ports come from the range, the preferred one first when
// it is free, never one in use or outside the range.
func TestAllocPort(t *testing.T) {
	d := newTestDaemon(t, func(c *Config) { c.AgentPorts = [2]int{17960, 17962} })
	p, err := d.allocPort(17962)
	if err != nil || p != 17962 {
		t.Fatalf("allocPort(17962) = %d, %v; want the preferred port", p, err)
	}
	p, err = d.allocPort(17962) // taken now: the first free one
	if err != nil || p != 17960 {
		t.Fatalf("allocPort(17962) again = %d, %v; want 17960", p, err)
	}
	if p, err = d.allocPort(80); err != nil || p != 17961 { // outside the range: ignored
		t.Fatalf("allocPort(80) = %d, %v; want 17961", p, err)
	}
	if p, err = d.allocPort(0); err == nil {
		t.Fatalf("allocPort with the range used up = %d, want an error", p)
	}
	d.freePort(17960)
	// A port another program listens on is skipped.
	ln, err := net.Listen("tcp", ":17960")
	if err != nil {
		t.Skipf("port 17960: %v", err)
	}
	defer ln.Close()
	if p, err = d.allocPort(17960); err == nil {
		t.Fatalf("allocPort(17960) while it is listened on = %d, want an error (the range is used up)", p)
	}
}

// TestDiskImage: the backup's copy of a disk is a new sparse file of the
// disk's size, replacing an earlier one; a bad target or size is refused.
func TestDiskImage(t *testing.T) {
	d := newTestDaemon(t)
	img, err := d.diskImage("web", StandbyDisk{Target: "vda", Capacity: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(d.cfg.StateDir, "images", "web-vda.img"); img != want {
		t.Errorf("image %s, want %s", img, want)
	}
	if err := os.WriteFile(img, []byte("old data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if img, err = d.diskImage("web", StandbyDisk{Target: "vda", Capacity: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img)
	if err != nil || len(b) != 1<<20 || string(b[:8]) == "old data" {
		t.Fatalf("image after a new standby: %d bytes (%v), starting %q; want 1 MiB of zeroes", len(b), err, b[:min(len(b), 8)])
	}
	for _, bad := range []StandbyDisk{{Target: "", Capacity: 1}, {Target: "../x", Capacity: 1}, {Target: "vda", Capacity: 0}} {
		if _, err := d.diskImage("web", bad); err == nil {
			t.Errorf("diskImage(%+v) accepted", bad)
		}
	}
	removeImage(img)
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("removeImage left %s: %v", img, err)
	}
}

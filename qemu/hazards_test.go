package qemu

import (
	"slices"
	"strings"
	"testing"
)

func TestUntrackedWrites(t *testing.T) {
	qtree := "bus: main-system-bus\r\n  dev: q35-pcihost, id \"\"\r\n      dev: virtio-net-pci, id \"\"\r\n" +
		"          dev: virtio-net-device, id \"\"\r\n      dev: virtio-balloon-pci, id \"balloon0\"\r\n" +
		"          dev: virtio-balloon-device, id \"\"\r\n      dev: vfio-pci, id \"gpu\"\r\n" +
		"      dev: vhost-user-fs-pci, id \"fs0\"\r\n"
	network := "virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ n0: index=0,type=vhost-user,vhost-user0\r\n"
	got := untrackedWrites(qtree, network)
	for _, want := range []string{"virtio-balloon", "vfio-pci", "vhost-user-fs-pci", "netdev vhost-user"} {
		if !slices.ContainsFunc(got, func(s string) bool { return strings.HasPrefix(s, want) }) {
			t.Errorf("%q not named in %q", want, got)
		}
	}
	if len(got) != 4 {
		t.Errorf("got %d entries, want 4 (the balloon once): %q", len(got), got)
	}
	if got := untrackedWrites("  dev: virtio-net-pci, id \"\"\r\n  dev: virtio-blk-pci, id \"\"\r\n", " n0: index=0,type=stream,unix:/run/n.sock\r\n"); len(got) != 0 {
		t.Errorf("plain devices: %q", got)
	}
}

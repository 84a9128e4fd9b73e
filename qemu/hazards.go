package qemu

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// UntrackedWrites lists what in this QEMU can change guest RAM without a
// write through QEMU's own mapping, which write trackers (userfaultfd
// write-protection, soft-dirty bits) would miss: device DMA that bypasses
// QEMU's page tables (VFIO), another process writing the shared RAM
// (vhost-user devices and netdevs), and pages handed back to the host
// (hole punching by a virtio-balloon or virtio-mem). Each entry names the
// device and why. Comparing RAM against the last checkpoint sees all of
// them.
func UntrackedWrites(ctx context.Context, mon Monitor) ([]string, error) {
	qtree, err := hmp(ctx, mon, "info qtree")
	if err != nil {
		return nil, fmt.Errorf("info qtree: %w", err)
	}
	network, err := hmp(ctx, mon, "info network")
	if err != nil {
		return nil, fmt.Errorf("info network: %w", err)
	}
	return untrackedWrites(qtree, network), nil
}

var (
	qtreeDev   = regexp.MustCompile(`(?m)^\s*dev: ([^,\s]+),`)
	netdevType = regexp.MustCompile(`type=([a-z0-9-]+)`)
)

// untrackedWrites is UntrackedWrites on the text of "info qtree" and
// "info network".
func untrackedWrites(qtree, network string) []string {
	var out []string
	add := func(s string) {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	for _, m := range qtreeDev.FindAllStringSubmatch(qtree, -1) {
		switch dev := m[1]; {
		case strings.HasPrefix(dev, "vfio"):
			add(dev + ": device DMA into guest RAM bypasses QEMU's page tables")
		case strings.HasPrefix(dev, "vhost-user"):
			add(dev + ": another process writes guest RAM")
		case strings.HasPrefix(dev, "virtio-balloon"):
			add("virtio-balloon: pages the guest gives back are dropped from RAM (libvirt: <memballoon model='none'/>)")
		case strings.HasPrefix(dev, "virtio-mem"):
			add(dev + ": unplugged memory is dropped from RAM")
		}
	}
	for _, m := range netdevType.FindAllStringSubmatch(network, -1) {
		if m[1] == "vhost-user" || m[1] == "vhost-vdpa" {
			add("netdev " + m[1] + ": another process or the device writes guest RAM")
		}
	}
	return out
}

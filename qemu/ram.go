package qemu

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// ErrNotShared reports guest RAM that remusd cannot read: it is not in a
// memory backend with share=on.
var ErrNotShared = errors.New("guest RAM is not in a shared memory backend (use memory-backend-file or memory-backend-memfd with share=on, and -machine memory-backend=)")

// RAMBackend is the guest RAM backend as QOM describes it.
type RAMBackend struct {
	ID   string // QOM id, e.g. "ram0"
	Type string // memory-backend-file or memory-backend-memfd
	Path string // mem-path (file backends)
	Size uint64
}

// qomGet reads one property of a QOM object.
func qomGet[T any](ctx context.Context, mon Monitor, path, property string) (T, error) {
	return run[T](ctx, mon, "qom-get", struct {
		Path     string `json:"path"`
		Property string `json:"property"`
	}{path, property})
}

// FindRAMBackend looks for the one memory backend object in /objects and
// checks that it is shared. Guests with several backends (NUMA nodes) are
// not supported yet.
func FindRAMBackend(ctx context.Context, mon Monitor) (RAMBackend, error) {
	type prop struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	objs, err := run[[]prop](ctx, mon, "qom-list", struct {
		Path string `json:"path"`
	}{"/objects"})
	if err != nil {
		return RAMBackend{}, fmt.Errorf("list QOM objects: %w", err)
	}
	var found []RAMBackend
	for _, o := range objs {
		t := strings.TrimSuffix(strings.TrimPrefix(o.Type, "child<"), ">")
		if !strings.HasPrefix(t, "memory-backend-") {
			continue
		}
		found = append(found, RAMBackend{ID: o.Name, Type: t})
	}
	if len(found) == 0 {
		return RAMBackend{}, ErrNotShared
	}
	if len(found) > 1 {
		return RAMBackend{}, fmt.Errorf("guest has %d memory backends; remus-kvm protects guests with one", len(found))
	}
	b := found[0]
	path := "/objects/" + b.ID
	share, err := qomGet[bool](ctx, mon, path, "share")
	if err != nil {
		return b, fmt.Errorf("read %s.share: %w", path, err)
	}
	if !share || (b.Type != "memory-backend-file" && b.Type != "memory-backend-memfd") {
		return b, fmt.Errorf("%w: %s is a %s with share=%v", ErrNotShared, b.ID, b.Type, share)
	}
	if b.Size, err = qomGet[uint64](ctx, mon, path, "size"); err != nil {
		return b, fmt.Errorf("read %s.size: %w", path, err)
	}
	if b.Type == "memory-backend-file" {
		if b.Path, err = qomGet[string](ctx, mon, path, "mem-path"); err != nil {
			return b, fmt.Errorf("read %s.mem-path: %w", path, err)
		}
	}
	return b, nil
}

package dirtypages

import (
	"context"
	"errors"
	"fmt"

	"github.com/remus-kvm/remus/transport"
)

// PageSize is the size of a guest page as tracked here: the host's base
// page size on x86-64, which is also the guest's. It is the wire format's
// page (transport.PageSize), so a harvested page is a transport.Page.
const PageSize = transport.PageSize

// Tracker finds the pages of guest RAM written since the previous harvest.
// Harvest is called while the guest is paused; calls must not overlap.
type Tracker interface {
	// Harvest returns the pages written since the previous Harvest, as a
	// new Set of Pages() pages that the caller owns. The first Harvest, and
	// the first successful one after a failed one, reports every page.
	Harvest(ctx context.Context) (*Set, error)
	// Pages is the number of pages tracked: the size of the RAM backend
	// divided by PageSize.
	Pages() int
	// Close releases the tracker's resources. Harvest after Close fails
	// with ErrClosed.
	Close() error
}

// ErrClosed is returned by Harvest on a closed tracker.
var ErrClosed = errors.New("dirtypages: tracker closed")

// Options tunes a tracker. The zero value selects the defaults. Uffd has
// nothing to tune: it checks the values and ignores them.
type Options struct {
	// Workers is the number of goroutines a Harvest spreads its work over.
	// Default: runtime.GOMAXPROCS(0) for Compare, whose pass over RAM
	// scales with cores until memory bandwidth runs out; 1 for SoftDirty,
	// whose pagemap reads of one process were slower in parallel on the
	// development machine.
	Workers int
	// BatchPages is the number of pagemap entries SoftDirty reads with one
	// read(2), per worker; it is rounded up to a multiple of 64. Default
	// DefaultBatchPages (a 512 KiB buffer per worker). Compare ignores it.
	BatchPages int
}

// DefaultBatchPages is the default Options.BatchPages: 256 MiB of RAM per
// pagemap read.
const DefaultBatchPages = 64 << 10

func (o Options) withDefaults(defaultWorkers int) (Options, error) {
	if o.Workers < 0 {
		return o, fmt.Errorf("dirtypages: %d workers", o.Workers)
	}
	if o.BatchPages < 0 {
		return o, fmt.Errorf("dirtypages: batch of %d pages", o.BatchPages)
	}
	if o.Workers == 0 {
		o.Workers = defaultWorkers
	}
	if o.BatchPages == 0 {
		o.BatchPages = DefaultBatchPages
	}
	o.BatchPages = (o.BatchPages + 63) &^ 63
	return o, nil
}

// NewAuto picks the tracker for guest RAM that process pid (QEMU) maps at m
// and this process at ram, in this order of preference:
//
//  1. Uffd (NewUffd), when the kernel has userfaultfd's asynchronous
//     write-protection and PAGEMAP_SCAN (Linux 6.7), this process may
//     ptrace QEMU and QEMU is not confined by seccomp: exact, needs no
//     locked RAM, and its harvest costs grow with the pages written;
//  2. SoftDirty (NewSoftDirty), when the kernel tracks soft-dirty bits and
//     QEMU locks guest RAM in memory;
//  3. Compare (NewCompare) otherwise.
//
// fallback says why the trackers before the one chosen were passed over:
// NewUffd's error when it chose SoftDirty, NewUffd's and NewSoftDirty's
// joined (errors.Join) when it chose Compare. It wraps
// ErrUffdUnsupported, ErrSoftDirtyUnsupported, or ErrRAMNotLocked (naming
// the fix: QEMU's -overcommit mem-lock=on) where those are the reasons;
// the caller should tell the user. err is set only when no tracker could
// be made. ram must be as long as m.
func NewAuto(pid int, m Mapping, ram []byte, opts Options) (tr Tracker, fallback error, err error) {
	return chooseTracker(m, ram, opts,
		func() (*Uffd, error) { return NewUffd(pid, m, opts) },
		func() (*SoftDirty, error) { return NewSoftDirty(pid, m, opts) })
}

// chooseTracker is NewAuto with the uffd and soft-dirty constructors as
// parameters.
func chooseTracker(m Mapping, ram []byte, opts Options, uffd func() (*Uffd, error), softDirty func() (*SoftDirty, error)) (tr Tracker, fallback error, err error) {
	if uintptr(len(ram)) != m.Len() {
		return nil, nil, fmt.Errorf("dirtypages: choose a tracker: RAM mapped here is %d bytes, QEMU's mapping %#x-%#x of %s is %d", len(ram), m.Start, m.End, m.Path, m.Len())
	}
	u, uffdErr := uffd()
	if uffdErr == nil {
		return u, nil, nil
	}
	sd, sdErr := softDirty()
	if sdErr == nil {
		return sd, uffdErr, nil
	}
	fallback = errors.Join(uffdErr, sdErr)
	c, err := NewCompare(ram, opts)
	if err != nil {
		return nil, fallback, fmt.Errorf("dirtypages: choose a tracker: uffd unusable (%v), soft-dirty unusable (%v), and compare: %w", uffdErr, sdErr, err)
	}
	return c, fallback, nil
}

package dirtypages

import (
	"context"
	"errors"
	"fmt"
)

// PageSize is the size of a guest page as tracked here: the host's base
// page size on x86-64, which is also the guest's.
const PageSize = 4096

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

// Options tunes a tracker. The zero value selects the defaults.
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

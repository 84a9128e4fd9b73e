package dirtypages

import (
	"context"
	"fmt"
	"sync"
)

// harvests is the bookkeeping every tracker's Harvest and Close share:
// they are serialised, nothing harvests after Close, and the first harvest,
// and the first one after a failed one, reports every page. Its zero value
// is a tracker that has not harvested yet.
type harvests struct {
	mu     sync.Mutex
	synced bool // the last harvest succeeded: the next may report changes only
	closed bool
}

// harvest runs one harvest of a tracker of pages pages: scan puts the
// changed pages in set, told whether this harvest reports every page anyway
// (full: the tracker resets what it compares against), and returns its
// errors wrapped as they should reach the caller. name says what failed
// when ctx has ended before it starts.
func (h *harvests) harvest(ctx context.Context, pages int, name string, scan func(set *Set, full bool) error) (*Set, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("dirtypages: %s: %w", name, err)
	}
	full := !h.synced
	// Until this harvest completes, a failure must lead to a full one.
	h.synced = false
	set := NewSet(pages)
	if err := scan(set, full); err != nil {
		return nil, err
	}
	if full {
		set.AddRange(0, pages)
	}
	h.synced = true
	return set, nil
}

// close runs release once, after any harvest under way; later calls do
// nothing.
func (h *harvests) close(release func() error) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	return release()
}

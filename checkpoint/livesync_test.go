package checkpoint

import (
	"context"

	"github.com/remus-kvm/remus/dirtypages"
	"github.com/remus-kvm/remus/transport"
)

// writingTracker is a compare tracker on a fake guest that writes while a
// live sync copies its RAM: after each harvest with the guest running it
// changes two pages (the first round reported both), and before the next
// harvest, if the guest still runs, it writes the first one's old content
// back. A live sync
// that sent a reported page's live content instead of what the harvest
// saw would leave the backup with the intermediate version, which no later
// harvest reports (the page is back to what the tracker holds).
type writingTracker struct {
	*dirtypages.Compare
	g        *fakeGuest
	rounds   int
	restore  int // page to write back before the next harvest, -1: none
	oldValue []byte
}

func (w *writingTracker) Harvest(ctx context.Context) (*dirtypages.Set, error) {
	w.g.mu.Lock()
	if w.oldValue != nil && w.g.running {
		copy(w.g.ram[w.restore*transport.PageSize:], w.oldValue)
	}
	w.oldValue = nil
	w.g.mu.Unlock()
	set, err := w.Compare.Harvest(ctx)
	if err != nil {
		return nil, err
	}
	w.g.mu.Lock()
	defer w.g.mu.Unlock()
	if !w.g.running {
		return set, nil
	}
	w.rounds++
	pages := len(w.g.ram) / transport.PageSize
	p, q := (5*w.rounds)%pages, (5*w.rounds+1)%pages
	w.restore = p
	w.oldValue = append([]byte(nil), w.g.ram[p*transport.PageSize:(p+1)*transport.PageSize]...)
	w.g.ram[p*transport.PageSize+7] ^= 0xa5
	w.g.ram[q*transport.PageSize+9] ^= 0x5a
	return set, nil
}

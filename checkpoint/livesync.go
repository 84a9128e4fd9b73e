package checkpoint

import (
	"context"
	"fmt"
	"time"

	"github.com/remus-kvm/remus/dirtypages"
	"github.com/remus-kvm/remus/transport"
)

// LiveSyncConfig tunes the live first sync: before a session's first epoch
// the primary copies guest RAM to the backup in rounds while the guest
// runs, each round sending the pages the tracker reports written since the
// previous one, until a round is small or stops shrinking. The first
// epoch's pause then holds only the pages written since the last round
// instead of all of RAM, and the guest's output, held from that pause on,
// waits for an epoch of ordinary size.
//
// The pages go as frames of epoch 0, which the backup writes into its RAM
// image at once: nothing of the session is resumable before its first
// epoch commits, and that epoch brings every page written since.
type LiveSyncConfig struct {
	// Off disables the live sync: the first epoch copies all of RAM in
	// one pause.
	Off bool
	// TargetPages ends the rounds once one reports at most this many
	// pages. Default DefaultLiveSyncTarget.
	TargetPages int
	// MaxRounds bounds the rounds (a guest that writes faster than the
	// link carries never gets below the target). Default
	// DefaultLiveSyncRounds.
	MaxRounds int
}

// Defaults for LiveSyncConfig.
const (
	DefaultLiveSyncTarget = 2048 // 8 MiB
	DefaultLiveSyncRounds = 30
)

// LiveTracker is a dirtypages.Tracker that may harvest while the guest
// runs: a page written after a harvest reported it (or while it did) is
// reported again by a later harvest, so the pages copied after each round
// converge on the guest's RAM once a harvest runs with the guest paused.
// Trackers that clear their state apart from reading it (soft-dirty) are
// not: a write between the two is lost.
type LiveTracker interface {
	dirtypages.Tracker
	HarvestsLive() bool
}

// SnapshotTracker is a tracker whose own copy of RAM, as of its last
// harvest, must be the source of the pages a harvest with the guest running
// reported (the compare tracker: a page copied from live RAM later than the
// tracker's copy could be missed if the guest wrote the older content back).
type SnapshotTracker interface {
	Snapshot() []byte
}

// liveSync reports whether sessions copy RAM live before the first epoch.
func (p *Primary) liveSync() bool {
	if p.cfg.LiveSync.Off {
		return false
	}
	lt, ok := p.tracker.(LiveTracker)
	return ok && lt.HarvestsLive()
}

// LiveSyncStats describes a session's live first sync.
type LiveSyncStats struct {
	Rounds    int
	Pages     int   // pages sent over all rounds
	LastRound int   // pages of the last round
	WireBytes int64 // frame bytes sent
	Took      time.Duration
}

// liveSync runs the rounds of the live first sync on the link.
func (d *primaryDriver) liveSync(ctx context.Context) error {
	p := d.p
	cfg := p.cfg.LiveSync
	if cfg.TargetPages <= 0 {
		cfg.TargetPages = DefaultLiveSyncTarget
	}
	if cfg.MaxRounds <= 0 {
		cfg.MaxRounds = DefaultLiveSyncRounds
	}
	src := p.ram
	if s, ok := p.tracker.(SnapshotTracker); ok {
		src = s.Snapshot()
	}
	st := LiveSyncStats{}
	start := time.Now()
	prev := 0
	p.sync.round.Store(0)
	p.sync.pages.Store(0)
	p.sync.on.Store(true)
	defer p.sync.on.Store(false)
	for {
		set, err := p.tracker.Harvest(ctx)
		if err != nil {
			return fmt.Errorf("checkpoint: live sync: round %d: harvest: %w", st.Rounds+1, err)
		}
		st.Rounds++
		p.sync.round.Store(int64(st.Rounds))
		n := set.Count()
		// Whatever a harvest reported goes out, even in the last round:
		// the tracker reports it only once.
		bytes, err := d.sendLivePages(ctx, set, src)
		if err != nil {
			return fmt.Errorf("checkpoint: live sync: round %d: %w", st.Rounds, err)
		}
		st.Pages += n
		st.LastRound = n
		st.WireBytes += bytes
		p.log.Debug("live sync round", "round", st.Rounds, "pages", n, "wire_bytes", bytes)
		if n <= cfg.TargetPages || st.Rounds >= cfg.MaxRounds || (st.Rounds > 1 && n*10 > prev*9) {
			break
		}
		prev = n
	}
	st.Took = time.Since(start)
	d.liveStats = st
	p.log.Info("live sync done: the first epoch holds what the guest wrote since", "rounds", st.Rounds,
		"pages", st.Pages, "last_round_pages", st.LastRound, "wire_bytes", st.WireBytes, "took", st.Took.Round(time.Millisecond))
	return nil
}

// sendLivePages sends the pages of set, read from src, as frames of epoch 0
// (compressed with the session's encoder when it has one) and returns the
// bytes sent. Each frame's pages are copied out of src first: with the
// guest running they may change, and the frame (and the encoder's memory of
// what the backup holds) must see one version of each.
func (d *primaryDriver) sendLivePages(ctx context.Context, set *dirtypages.Set, src []byte) (int64, error) {
	buf := make([]byte, transport.MaxPagesPerFrame*transport.PageSize)
	pages := make([]transport.Page, 0, transport.MaxPagesPerFrame)
	var sent int64
	flush := func() error {
		if len(pages) == 0 {
			return nil
		}
		var msg transport.Message = transport.RAMPages{Pages: pages}
		if d.enc != nil {
			dm, err := d.enc.Encode(pages)
			if err != nil {
				return err
			}
			msg = dm
		}
		f, err := transport.NewFrame(0, msg)
		if err != nil {
			return err
		}
		if err := d.link.Send(ctx, f); err != nil {
			return fmt.Errorf("send pages: %w", err)
		}
		d.p.sync.pages.Add(int64(len(pages)))
		sent += int64(len(f.Payload) + transport.Overhead)
		pages = pages[:0]
		return nil
	}
	for i := range set.All() {
		data := buf[len(pages)*transport.PageSize : (len(pages)+1)*transport.PageSize]
		copy(data, src[i*transport.PageSize:(i+1)*transport.PageSize])
		pages = append(pages, transport.Page{Index: uint64(i), Data: data})
		if len(pages) == transport.MaxPagesPerFrame {
			if err := flush(); err != nil {
				return sent, err
			}
		}
	}
	return sent, flush()
}

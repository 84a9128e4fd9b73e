package dirtypages

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"testing"
)

// comparePages is the size of the RAM in the compare tests: 8 MiB and three
// pages, so the last chunk of work and the last bitmap word are partial.
const comparePages = 2048 + 3

func TestCompareTracksWrites(t *testing.T) {
	for _, backing := range []string{"memfd", "file"} {
		for _, workers := range []int{1, 2, 3} {
			t.Run(fmt.Sprintf("%s/workers=%d", backing, workers), func(t *testing.T) {
				testCompareTracksWrites(t, backing, workers)
			})
		}
	}
}

func testCompareTracksWrites(t *testing.T, backing string, workers int) {
	const n = comparePages
	size := n * PageSize
	f := newRAMFile(t, size)
	if backing == "memfd" {
		f = newMemfd(t, "dirtypages-compare", size)
	}
	// Two mappings of the same memory, as QEMU and the agent have: the test
	// writes through guest, the tracker reads agent.
	guest, agent := mapShared(t, f, size), mapShared(t, f, size)
	fillPattern(guest)
	tr, err := NewCompare(agent, Options{Workers: workers})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	if tr.Pages() != n {
		t.Fatalf("Pages() = %d, want %d", tr.Pages(), n)
	}

	wantSet(t, "first harvest", harvest(t, tr), NewFullSet(n))
	wantSet(t, "harvest with no writes", harvest(t, tr), NewSet(n))

	// Random writes are reported exactly.
	rng := rand.New(rand.NewPCG(7, uint64(workers)))
	gen := uint64(1) << 40
	write := func(pages ...int) *Set {
		gen++
		for _, p := range pages {
			writePage(guest, p, int(gen), gen)
		}
		return setOf(n, pages...)
	}
	var random []int
	for range 300 {
		random = append(random, rng.IntN(n))
	}
	w := write(random...)
	wantSet(t, "random writes", harvest(t, tr), w)

	// Writes after a harvest appear in the next one, and only there.
	a := write(0, 1, 63, 64, 511, 512, n-1)
	wantSet(t, "epoch A", harvest(t, tr), a)
	b := write(2, 100, 1000)
	wantSet(t, "epoch B", harvest(t, tr), b)

	// Compare reports content changes, not writes: a page written and then
	// restored within one epoch, or written with the value it holds, is not
	// reported.
	old := atomic.LoadUint64(word(guest, 5*PageSize))
	atomic.StoreUint64(word(guest, 5*PageSize), ^old)
	atomic.StoreUint64(word(guest, 5*PageSize), old)
	v := atomic.LoadUint64(word(guest, 6*PageSize+8))
	atomic.StoreUint64(word(guest, 6*PageSize+8), v)
	wantSet(t, "restoring writes", harvest(t, tr), NewSet(n))

	// A page restored in a later epoch to an older value differs from the
	// copy, which holds the newer one.
	atomic.StoreUint64(word(guest, 7*PageSize), ^old)
	wantSet(t, "change", harvest(t, tr), setOf(n, 7))
	atomic.StoreUint64(word(guest, 7*PageSize), old)
	wantSet(t, "change back", harvest(t, tr), setOf(n, 7))

	// The first and last bytes of RAM.
	guest[0]++
	guest[size-1]++
	wantSet(t, "edge bytes", harvest(t, tr), setOf(n, 0, n-1))

	// Every page.
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	w = write(all...)
	wantSet(t, "every page", harvest(t, tr), w)
	wantSet(t, "quiet again", harvest(t, tr), NewSet(n))
}

// cancelDuring is a context that is live for its first Err call and
// cancelled from then on, so a harvest passes its entry check and is
// cancelled while it runs.
type cancelDuring struct {
	context.Context
	calls atomic.Int32
	done  chan struct{}
}

func newCancelDuring() *cancelDuring {
	c := &cancelDuring{Context: context.Background(), done: make(chan struct{})}
	close(c.done)
	return c
}

func (c *cancelDuring) Done() <-chan struct{} { return c.done }

func (c *cancelDuring) Err() error {
	if c.calls.Add(1) == 1 {
		return nil
	}
	return context.Canceled
}

func TestCompareFailedHarvestResyncs(t *testing.T) {
	const n = comparePages
	mem := mapShared(t, newMemfd(t, "dirtypages-cancel", n*PageSize), n*PageSize)
	tr, err := NewCompare(mem, Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	harvest(t, tr)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := tr.Harvest(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("harvest with a cancelled context: %v", err)
	}
	mem[7*PageSize]++
	// Nothing was consumed by a harvest refused at the door.
	wantSet(t, "after refused harvest", harvest(t, tr), setOf(n, 7))

	mem[9*PageSize]++
	if _, err := tr.Harvest(newCancelDuring()); !errors.Is(err, context.Canceled) {
		t.Fatalf("harvest cancelled while running: %v", err)
	}
	wantSet(t, "after cancelled harvest", harvest(t, tr), NewFullSet(n))
	wantSet(t, "then", harvest(t, tr), NewSet(n))
}

func TestCompareClose(t *testing.T) {
	mem := mapShared(t, newMemfd(t, "dirtypages-close", 64*PageSize), 64*PageSize)
	tr, err := NewCompare(mem, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Harvest(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("harvest after close: %v", err)
	}
	if err := tr.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

func TestNewCompareRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		size int
		opts Options
	}{
		"empty":            {0, Options{}},
		"partial page":     {PageSize + 1, Options{}},
		"negative workers": {PageSize, Options{Workers: -1}},
		"negative batch":   {PageSize, Options{BatchPages: -1}},
	} {
		t.Run(name, func(t *testing.T) {
			if tr, err := NewCompare(make([]byte, tc.size), tc.opts); err == nil {
				tr.Close()
				t.Fatal("accepted")
			}
		})
	}
}

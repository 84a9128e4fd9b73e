package checkpoint

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

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

// TestBackupLiveSyncPages speaks the primary's side by hand: pages of epoch
// 0 go into the backup's image at once, compressed or not; once the first
// epoch began they are refused and the session ends.
func TestBackupLiveSyncPages(t *testing.T) {
	dir := t.TempDir()
	b, committed := newCountingBackup(t, dir)
	pl, bl := tcpPair(t)
	ctx := withTimeout(t, 30*time.Second)
	done := make(chan error, 1)
	go func() { done <- b.Serve(ctx, bl) }()

	send := func(epoch uint64, m transport.Message) {
		t.Helper()
		if err := sendMessage(ctx, pl, epoch, m); err != nil {
			t.Fatal(err)
		}
	}
	// next returns the backup's next frame other than a heartbeat.
	next := func() transport.Message {
		t.Helper()
		for {
			f, err := pl.Recv(ctx)
			if err != nil {
				t.Fatal(err)
			}
			m, err := transport.Decode(f)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := m.(transport.Heartbeat); !ok {
				return m
			}
		}
	}
	const ramSize = 16 * transport.PageSize
	send(0, transport.Hello{Version: transport.Version, Role: transport.RolePrimary, VMName: "vm1", RAMSize: ramSize, PageSize: transport.PageSize})
	if _, ok := next().(transport.Hello); !ok {
		t.Fatal("no hello from the backup")
	}
	page := func(i uint64, v byte) transport.Page {
		return transport.Page{Index: i, Data: bytes.Repeat([]byte{v}, transport.PageSize)}
	}
	send(0, transport.RAMPages{Pages: []transport.Page{page(1, 0x11), page(3, 0x33)}})
	enc, err := transport.NewDeltaEncoder(ramSize)
	if err != nil {
		t.Fatal(err)
	}
	dm, err := enc.Encode([]transport.Page{page(5, 0x55)})
	if err != nil {
		t.Fatal(err)
	}
	send(0, dm)
	// Epoch 1 brings a page and the device state; the image then holds
	// both the live pages and the epoch's.
	frames, err := transport.Epoch{Number: 1, Pages: []transport.Page{page(7, 0x77)}, DeviceState: []byte("dev")}.Frames()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range frames {
		if err := pl.Send(ctx, f); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := next().(transport.Ack); !ok || committed.Load() != 1 {
		t.Fatalf("epoch 1 not acknowledged (committed %d)", committed.Load())
	}
	for i, want := range map[int]byte{1: 0x11, 3: 0x33, 5: 0x55, 7: 0x77, 0: 0, 2: 0} {
		if got := b.ram[i*transport.PageSize : (i+1)*transport.PageSize]; !bytes.Equal(got, bytes.Repeat([]byte{want}, transport.PageSize)) {
			t.Errorf("image page %d: first byte %#x, want all %#x", i, got[0], want)
		}
	}
	// A live page after the first epoch is refused: the session ends.
	send(0, transport.RAMPages{Pages: []transport.Page{page(2, 0x22)}})
	m, ok := next().(transport.Error)
	if !ok || !strings.Contains(m.Message, "live first sync after the first epoch") {
		t.Fatalf("a live page after epoch 1: %#v, want an error naming it", m)
	}
	if b.ram[2*transport.PageSize] != 0 {
		t.Fatal("the refused live page reached the image")
	}
}

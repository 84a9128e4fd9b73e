package transport

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"golang.org/x/sys/unix"
)

// backupRAM plays the backup's committed RAM image.
type backupRAM []byte

func (b backupRAM) base(idx uint64) []byte {
	off := idx * PageSize
	if off+PageSize > uint64(len(b)) {
		return nil
	}
	return b[off : off+PageSize]
}

func (b backupRAM) apply(m RAMPages) {
	for _, pg := range m.Pages {
		copy(b[pg.Index*PageSize:], pg.Data)
	}
}

// TestDeltaRoundTrip: epochs of random pages with random edits (a few
// bytes, a run, a whole new page, zeroing, no change) go through the
// encoder, the wire and Expand against the backup's copy, and come out
// exactly; every codec is tried alone and together.
func TestDeltaRoundTrip(t *testing.T) {
	const pages = 512
	for v, codecs := range [][]Codec{nil, {CodecZstd}, {CodecLZ4}, {}, nil} {
		bounded := v == 4 // the last: an LRU cache of a tenth of RAM
		rng := rand.New(rand.NewPCG(7, uint64(len(codecs))))
		ram := make([]byte, pages*PageSize)
		backup := make(backupRAM, len(ram))
		enc, err := NewDeltaEncoder(uint64(len(ram)))
		if bounded {
			enc, err = NewBoundedDeltaEncoder(uint64(len(ram)), pages/10)
		}
		if err != nil {
			t.Fatal(err)
		}
		enc.Codecs = codecs
		for epoch := 0; epoch < 20; epoch++ {
			// Dirty some pages.
			var dirty []Page
			for idx := uint64(0); idx < pages; idx++ {
				if epoch > 0 && rng.IntN(8) != 0 {
					continue
				}
				pg := ram[idx*PageSize : (idx+1)*PageSize]
				switch rng.IntN(6) {
				case 0: // a few bytes
					for range 1 + rng.IntN(8) {
						pg[rng.IntN(PageSize)] = byte(rng.Uint32())
					}
				case 1: // a run
					o := rng.IntN(PageSize - 256)
					for i := range 256 {
						pg[o+i] = byte(i * epoch)
					}
				case 2: // random whole page
					for i := range pg {
						pg[i] = byte(rng.Uint32())
					}
				case 3:
					clear(pg)
				case 4: // unchanged (a tracker may report it)
				case 5: // text-like
					copy(pg, bytes.Repeat([]byte("remus epoch "), PageSize/12))
				}
				dirty = append(dirty, Page{Index: idx, Data: bytes.Clone(pg)})
			}
			for i := 0; i < len(dirty); i += MaxPagesPerFrame {
				run := dirty[i:min(i+MaxPagesPerFrame, len(dirty))]
				m, err := enc.Encode(run)
				if err != nil {
					t.Fatal(err)
				}
				f, err := NewFrame(uint64(epoch+1), m)
				if err != nil {
					t.Fatal(err)
				}
				dm, err := Decode(f)
				if err != nil {
					t.Fatal(err)
				}
				got, err := dm.(RAMDelta).Expand(backup.base)
				if err != nil {
					t.Fatal(err)
				}
				for j, pg := range got.Pages {
					if pg.Index != run[j].Index || !bytes.Equal(pg.Data, run[j].Data) {
						t.Fatalf("codecs %v epoch %d: page %d differs after the round trip", codecs, epoch, pg.Index)
					}
				}
				backup.apply(got)
			}
		}
		if !bytes.Equal(backup, ram) {
			t.Fatalf("codecs %v: the backup's copy differs from RAM", codecs)
		}
		st := enc.Stats
		if st.Zero == 0 || st.Same == 0 || st.XOR == 0 || st.Raw == 0 {
			t.Fatalf("codecs %v: not every kind was exercised: %+v", codecs, st)
		}
		t.Logf("codecs %v: %d pages (%d zero, %d same, %d xor, %d raw), %d bytes in, %d out (%.3f), frames by codec %v",
			codecs, st.Pages, st.Zero, st.Same, st.XOR, st.Raw, st.RawBytes, st.WireBytes, float64(st.WireBytes)/float64(st.RawBytes), st.ByCodec)
	}
}

func TestRAMDeltaRejects(t *testing.T) {
	good := RAMDelta{Indexes: []uint64{1, 2}, Kinds: []PageKind{PageZero, PageRaw}, Codec: CodecNone, RawLen: PageSize, Blob: make([]byte, PageSize)}
	if _, err := good.AppendPayload(nil); err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]RAMDelta{
		"no pages":        {},
		"kinds missing":   {Indexes: []uint64{1}},
		"unknown kind":    {Indexes: []uint64{1}, Kinds: []PageKind{9}},
		"unknown codec":   {Indexes: []uint64{1}, Kinds: []PageKind{PageZero}, Codec: 7},
		"descending":      {Indexes: []uint64{2, 1}, Kinds: []PageKind{PageZero, PageZero}},
		"raw length":      {Indexes: []uint64{1}, Kinds: []PageKind{PageRaw}, RawLen: 100, Blob: make([]byte, 100)},
		"short blob":      {Indexes: []uint64{1}, Kinds: []PageKind{PageRaw}, RawLen: PageSize, Blob: make([]byte, 10)},
		"index too large": {Indexes: []uint64{MaxPageIndex + 1}, Kinds: []PageKind{PageZero}},
	} {
		if _, err := m.AppendPayload(nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A blob that does not decompress to its raw length, and an XOR page
	// with no previous version.
	bad := RAMDelta{Indexes: []uint64{1}, Kinds: []PageKind{PageRaw}, Codec: CodecZstd, RawLen: PageSize, Blob: []byte{1, 2, 3}}
	if _, err := bad.Expand(backupRAM(nil).base); err == nil {
		t.Error("a corrupt zstd blob expanded")
	}
	noBase := RAMDelta{Indexes: []uint64{1}, Kinds: []PageKind{PageXOR}, Codec: CodecNone, RawLen: PageSize, Blob: make([]byte, PageSize)}
	if _, err := noBase.Expand(backupRAM(nil).base); err == nil {
		t.Error("an XOR page without a base expanded")
	}
}

// FuzzRAMDelta: any payload either fails to decode or expands without
// panicking into at most MaxPagesPerFrame pages.
func FuzzRAMDelta(f *testing.F) {
	enc, _ := NewDeltaEncoder(16 * PageSize)
	for _, c := range []Codec{CodecNone, CodecZstd, CodecLZ4} {
		enc.Reset()
		enc.Codecs = []Codec{c}
		pg := bytes.Repeat([]byte{byte(c) + 1}, PageSize)
		m, _ := enc.Encode([]Page{{Index: 1, Data: pg}, {Index: 3, Data: make([]byte, PageSize)}})
		p, _ := m.AppendPayload(nil)
		f.Add(p)
	}
	base := make(backupRAM, 16*PageSize)
	f.Fuzz(func(t *testing.T, p []byte) {
		m, err := DecodeRAMDelta(p)
		if err != nil {
			return
		}
		got, err := m.Expand(base.base)
		if err != nil {
			return
		}
		if len(got.Pages) != len(m.Indexes) || len(got.Pages) > MaxPagesPerFrame {
			t.Fatalf("%d pages from %d indexes", len(got.Pages), len(m.Indexes))
		}
	})
}

func TestLRUCacheEvictsLeastRecentlySent(t *testing.T) {
	c, err := newLRUCache(100, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { unix.Munmap(c.release()) }()
	pg := func(b byte) []byte { return bytes.Repeat([]byte{b}, PageSize) }
	for i := uint64(1); i <= 3; i++ {
		c.put(i, pg(byte(i)))
	}
	c.put(1, pg(11)) // 1 is now the most recent
	c.put(4, pg(4))  // evicts 2
	if _, ok := c.get(2); ok {
		t.Fatal("page 2 was not evicted")
	}
	for i, want := range map[uint64]byte{1: 11, 3: 3, 4: 4} {
		got, ok := c.get(i)
		if !ok || got[0] != want {
			t.Fatalf("page %d: %v %v", i, ok, got[:1])
		}
	}
	c.reset()
	if _, ok := c.get(1); ok {
		t.Fatal("a page survived reset")
	}
}

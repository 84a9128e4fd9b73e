package transport

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"runtime"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"golang.org/x/sys/unix"
)

// RAMDelta carries pages compressed: each page is a zero page, unchanged,
// XORed against the version the primary sent last (which the backup holds
// committed, since epochs commit in order), or raw when there is no earlier
// version; the XORed and raw bytes of the frame are compressed together
// with the codec that made them smallest.
//
// Payload: count u16 | codec u8 | index u64 × count | kind u8 × count |
// raw length u32 | blob. The blob is the XORed and raw page bytes, in page
// order, compressed; raw length is PageSize times their number.
type RAMDelta struct {
	Indexes []uint64
	Kinds   []PageKind
	Codec   Codec
	RawLen  uint32
	Blob    []byte
}

// PageKind says how a RAMDelta carries a page. The numbers are the
// protocol: append only.
type PageKind uint8

const (
	PageZero PageKind = 0 // all zeroes, no bytes
	PageXOR  PageKind = 1 // PageSize bytes: the page XOR its previous version
	PageRaw  PageKind = 2 // PageSize bytes: the page itself
	PageSame PageKind = 3 // unchanged since the previous version, no bytes
)

// Codec is the compression of a RAMDelta's blob. The numbers are the
// protocol: append only.
type Codec uint8

const (
	CodecNone Codec = 0
	CodecZstd Codec = 1 // klauspost/compress zstd, one frame
	CodecLZ4  Codec = 2 // pierrec/lz4 block
)

func (c Codec) String() string {
	switch c {
	case CodecNone:
		return "none"
	case CodecZstd:
		return "zstd"
	case CodecLZ4:
		return "lz4"
	}
	return fmt.Sprintf("Codec(%d)", uint8(c))
}

// Type returns TypeRAMDelta.
func (RAMDelta) Type() Type { return TypeRAMDelta }

func (m RAMDelta) validate() error {
	n := len(m.Indexes)
	switch {
	case n == 0:
		return malformed(TypeRAMDelta, "no pages")
	case n > MaxPagesPerFrame:
		return tooLarge(TypeRAMDelta, "%d pages, max %d", n, MaxPagesPerFrame)
	case len(m.Kinds) != n:
		return malformed(TypeRAMDelta, "%d kinds for %d pages", len(m.Kinds), n)
	case m.Codec > CodecLZ4:
		return malformed(TypeRAMDelta, "unknown codec %d", m.Codec)
	}
	withData := 0
	for i, k := range m.Kinds {
		switch k {
		case PageXOR, PageRaw:
			withData++
		case PageZero, PageSame:
		default:
			return malformed(TypeRAMDelta, "page %d: unknown kind %d", i, k)
		}
		if m.Indexes[i] > MaxPageIndex {
			return malformed(TypeRAMDelta, "page index %d beyond the 64-bit address space", m.Indexes[i])
		}
		if i > 0 && m.Indexes[i] <= m.Indexes[i-1] {
			return malformed(TypeRAMDelta, "page index %d after %d: indexes must ascend", m.Indexes[i], m.Indexes[i-1])
		}
	}
	if int(m.RawLen) != withData*PageSize {
		return malformed(TypeRAMDelta, "raw length %d for %d pages with data", m.RawLen, withData)
	}
	if m.Codec == CodecNone && len(m.Blob) != int(m.RawLen) {
		return malformed(TypeRAMDelta, "uncompressed blob of %d bytes, raw length %d", len(m.Blob), m.RawLen)
	}
	return nil
}

// AppendPayload implements Message.
func (m RAMDelta) AppendPayload(dst []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(m.Indexes)))
	dst = append(dst, byte(m.Codec))
	for _, idx := range m.Indexes {
		dst = binary.BigEndian.AppendUint64(dst, idx)
	}
	for _, k := range m.Kinds {
		dst = append(dst, byte(k))
	}
	dst = binary.BigEndian.AppendUint32(dst, m.RawLen)
	return append(dst, m.Blob...), nil
}

// DecodeRAMDelta decodes a RAMDelta payload without decompressing it; Blob
// aliases p. Expand gives the pages.
func DecodeRAMDelta(p []byte) (RAMDelta, error) {
	if len(p) < 3 {
		return RAMDelta{}, malformed(TypeRAMDelta, "payload is %d bytes, want at least 3", len(p))
	}
	n := int(binary.BigEndian.Uint16(p))
	if n > MaxPagesPerFrame {
		return RAMDelta{}, tooLarge(TypeRAMDelta, "%d pages, max %d", n, MaxPagesPerFrame)
	}
	head := 3 + 9*n + 4
	if len(p) < head {
		return RAMDelta{}, malformed(TypeRAMDelta, "payload is %d bytes, %d pages need at least %d", len(p), n, head)
	}
	m := RAMDelta{Codec: Codec(p[2]), Indexes: make([]uint64, n), Kinds: make([]PageKind, n)}
	for i := range n {
		m.Indexes[i] = binary.BigEndian.Uint64(p[3+8*i:])
		m.Kinds[i] = PageKind(p[3+8*n+i])
	}
	m.RawLen = binary.BigEndian.Uint32(p[3+9*n:])
	if len(p) > head {
		m.Blob = p[head:len(p):len(p)]
	}
	if err := m.validate(); err != nil {
		return RAMDelta{}, err
	}
	return m, nil
}

// raw decompresses the blob into exactly RawLen bytes (at most
// count×PageSize): lz4 into a buffer of RawLen bytes, zstd from one frame
// that declares RawLen bytes (see checkZstdFrame) into a buffer of that
// and a block. An uncompressed blob is returned as it is.
func (m RAMDelta) raw() ([]byte, error) {
	switch {
	case m.Codec == CodecNone:
		return m.Blob, nil
	case m.RawLen == 0: // no page with data
		if len(m.Blob) != 0 {
			return nil, malformed(TypeRAMDelta, "%s blob of %d bytes for no page data", m.Codec, len(m.Blob))
		}
		return nil, nil
	}
	switch m.Codec {
	case CodecZstd:
		f, err := checkZstdFrame(TypeRAMDelta, m.Blob, uint64(m.RawLen))
		if err != nil {
			return nil, err
		}
		if f.size != uint64(m.RawLen) {
			return nil, malformed(TypeRAMDelta, "zstd frame declares %d bytes, raw length %d", f.size, m.RawLen)
		}
		return decodeZstdFrame(TypeRAMDelta, &zstdDecoders, m.Blob, f)
	case CodecLZ4:
		out := make([]byte, m.RawLen)
		n, err := lz4.UncompressBlock(m.Blob, out)
		if err != nil {
			return nil, malformed(TypeRAMDelta, "lz4: %v", err)
		}
		if n != int(m.RawLen) {
			return nil, malformed(TypeRAMDelta, "lz4 blob holds %d bytes, raw length %d", n, m.RawLen)
		}
		return out, nil
	}
	return nil, malformed(TypeRAMDelta, "unknown codec %d", m.Codec)
}

// Expand decompresses m and returns its pages whole. base returns the
// previous version of a page (the backup's committed copy), which XORed and
// unchanged pages need.
func (m RAMDelta) Expand(base func(index uint64) []byte) (RAMPages, error) {
	raw, err := m.raw()
	if err != nil {
		return RAMPages{}, err
	}
	pages := make([]Page, len(m.Indexes))
	data := make([]byte, len(m.Indexes)*PageSize)
	for i, idx := range m.Indexes {
		pg := data[i*PageSize : (i+1)*PageSize : (i+1)*PageSize]
		switch m.Kinds[i] {
		case PageRaw:
			copy(pg, raw[:PageSize])
			raw = raw[PageSize:]
		case PageXOR:
			b := base(idx)
			if len(b) != PageSize {
				return RAMPages{}, malformed(TypeRAMDelta, "no previous version of page %d to XOR against", idx)
			}
			xorPage(pg, raw[:PageSize], b)
			raw = raw[PageSize:]
		case PageSame:
			b := base(idx)
			if len(b) != PageSize {
				return RAMPages{}, malformed(TypeRAMDelta, "no previous version of unchanged page %d", idx)
			}
			copy(pg, b)
		case PageZero:
		}
		pages[i] = Page{Index: idx, Data: pg}
	}
	return RAMPages{Pages: pages}, nil
}

// xorPage sets dst to a XOR b, word by word.
func xorPage(dst, a, b []byte) {
	for i := 0; i < PageSize; i += 8 {
		binary.NativeEndian.PutUint64(dst[i:], binary.NativeEndian.Uint64(a[i:])^binary.NativeEndian.Uint64(b[i:]))
	}
}

// DeltaEncoder turns pages into RAMDelta messages on the primary. It keeps
// the version of every page it encoded (a cache the size of guest RAM), so
// the next version goes as an XOR against it. It is not safe for concurrent
// use; Reset it when a session starts (the backup's copy is then unknown).
type DeltaEncoder struct {
	cache   pageCache
	zenc    *zstd.Encoder
	lz      lz4.Compressor
	raw     []byte
	zbuf    []byte
	lbuf    []byte
	cleanup runtime.Cleanup // releases the cache's memory if Close is not called
	// Codecs, when set, limits the codecs tried (for measurements).
	Codecs []Codec
	Stats  DeltaStats
}

// DeltaStats counts what an encoder did.
type DeltaStats struct {
	Pages, Zero, Same, XOR, Raw uint64
	RawBytes, WireBytes         uint64 // page bytes in, blob bytes out
	ByCodec                     [3]uint64
}

// NewDeltaEncoder returns an encoder for a guest of ramSize bytes.
func NewDeltaEncoder(ramSize uint64) (*DeltaEncoder, error) {
	// Single-segment frames always declare their content size, which the
	// backup needs (see checkZstdFrame).
	z, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithSingleSegment(true))
	if err != nil {
		return nil, fmt.Errorf("transport: zstd: %w", err)
	}
	pages := ramSize / PageSize
	data, err := offHeap(int(pages * PageSize))
	if err != nil {
		return nil, err
	}
	e := &DeltaEncoder{zenc: z}
	e.setCache(&fullCache{data: data, valid: make([]uint64, (pages+63)/64)}, data)
	return e, nil
}

// setCache gives the encoder a cache whose memory, data, is outside the Go
// heap: released by Close, or once the encoder is unreachable.
func (e *DeltaEncoder) setCache(c pageCache, data []byte) {
	e.cache = c
	if data != nil {
		e.cleanup = runtime.AddCleanup(e, func(d []byte) { unix.Munmap(d) }, data)
	}
}

// offHeap allocates n zeroed bytes outside the Go heap, as an anonymous
// mapping: a page cache as large as guest RAM on the heap would let the
// garbage collector grow the heap to twice that before it collects. The
// encoder releases the mapping (Close, or once it is unreachable).
func offHeap(n int) ([]byte, error) {
	if n == 0 {
		return nil, nil
	}
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("transport: map a page cache of %d bytes: %w", n, err)
	}
	return b, nil
}

// NewBoundedDeltaEncoder returns an encoder whose cache holds at most
// maxPages pages, the ones sent most recently (LRU): a page not in it goes
// raw (compressed) instead of as an XOR.
func NewBoundedDeltaEncoder(ramSize uint64, maxPages int) (*DeltaEncoder, error) {
	e, err := NewDeltaEncoder(PageSize)
	if err != nil {
		return nil, err
	}
	e.Close()
	c, err := newLRUCache(ramSize/PageSize, maxPages)
	if err != nil {
		return nil, err
	}
	e.setCache(c, c.data)
	return e, nil
}

// Close releases the encoder's page cache (kept outside the Go heap); the
// encoder must not be used afterwards.
func (e *DeltaEncoder) Close() error {
	if e.cache == nil {
		return nil
	}
	e.cleanup.Stop()
	data := e.cache.release()
	e.cache = nil
	if data == nil {
		return nil
	}
	if err := unix.Munmap(data); err != nil {
		return fmt.Errorf("transport: release the page cache: %w", err)
	}
	return nil
}

// Reset forgets every cached page.
func (e *DeltaEncoder) Reset() { e.cache.reset() }

// Encode makes a RAMDelta of up to MaxPagesPerFrame pages in ascending
// index order and remembers their new versions.
func (e *DeltaEncoder) Encode(pages []Page) (RAMDelta, error) {
	m := RAMDelta{Indexes: make([]uint64, len(pages)), Kinds: make([]PageKind, len(pages))}
	e.raw = e.raw[:0]
	for i, pg := range pages {
		m.Indexes[i] = pg.Index
		if pg.Index >= e.cache.pages() {
			return RAMDelta{}, fmt.Errorf("transport: page %d beyond the encoder's %d pages of RAM", pg.Index, e.cache.pages())
		}
		prev, known := e.cache.get(pg.Index)
		switch {
		case isZero(pg.Data):
			m.Kinds[i] = PageZero
			e.Stats.Zero++
		case known && bytes.Equal(prev, pg.Data):
			m.Kinds[i] = PageSame
			e.Stats.Same++
		case known:
			m.Kinds[i] = PageXOR
			n := len(e.raw)
			e.raw = append(e.raw, make([]byte, PageSize)...)
			xorPage(e.raw[n:], pg.Data, prev)
			e.Stats.XOR++
		default:
			m.Kinds[i] = PageRaw
			e.raw = append(e.raw, pg.Data...)
			e.Stats.Raw++
		}
		e.cache.put(pg.Index, pg.Data)
	}
	e.Stats.Pages += uint64(len(pages))
	m.RawLen = uint32(len(e.raw))
	m.Codec, m.Blob = CodecNone, append([]byte(nil), e.raw...)
	if len(e.raw) > 0 {
		for _, c := range e.codecs() {
			var out []byte
			switch c {
			case CodecZstd:
				e.zbuf = e.zenc.EncodeAll(e.raw, e.zbuf[:0])
				out = e.zbuf
			case CodecLZ4:
				if need := lz4.CompressBlockBound(len(e.raw)); cap(e.lbuf) < need {
					e.lbuf = make([]byte, need)
				}
				n, err := e.lz.CompressBlock(e.raw, e.lbuf[:cap(e.lbuf)])
				if err != nil || n == 0 {
					continue // incompressible
				}
				out = e.lbuf[:n]
			}
			if len(out) < len(m.Blob) {
				m.Codec, m.Blob = c, append(m.Blob[:0], out...)
			}
		}
	}
	e.Stats.RawBytes += uint64(len(pages) * PageSize)
	e.Stats.WireBytes += uint64(len(m.Blob))
	e.Stats.ByCodec[m.Codec]++
	return m, nil
}

func (e *DeltaEncoder) codecs() []Codec {
	if e.Codecs != nil {
		return e.Codecs
	}
	return []Codec{CodecLZ4, CodecZstd}
}

// isZero reports whether a page is all zeroes.
func isZero(p []byte) bool {
	for i := 0; i < len(p); i += 8 {
		if binary.NativeEndian.Uint64(p[i:]) != 0 {
			return false
		}
	}
	return true
}

// pageCache holds the version of each page the primary sent last.
type pageCache interface {
	pages() uint64
	// get returns the cached version, which stays valid until the next put.
	get(idx uint64) ([]byte, bool)
	put(idx uint64, data []byte)
	reset()
	// release gives up the cache's memory (outside the Go heap) for the
	// caller to unmap.
	release() []byte
}

// fullCache holds every page: guest-RAM-sized.
type fullCache struct {
	data  []byte
	valid []uint64 // bit per page
}

func (c *fullCache) pages() uint64 { return uint64(len(c.data)) / PageSize }

func (c *fullCache) release() []byte { d := c.data; c.data = nil; return d }

func (c *fullCache) get(idx uint64) ([]byte, bool) {
	return c.data[idx*PageSize : (idx+1)*PageSize], c.valid[idx/64]&(1<<(idx%64)) != 0
}

func (c *fullCache) put(idx uint64, data []byte) {
	copy(c.data[idx*PageSize:(idx+1)*PageSize], data)
	c.valid[idx/64] |= 1 << (idx % 64)
}

func (c *fullCache) reset() { clear(c.valid) }

// lruCache holds the most recently sent pages, at most len(slots).
type lruCache struct {
	ramPages uint64
	data     []byte
	slotOf   map[uint64]int32
	page     []uint64 // slot -> page
	// a doubly linked list of slots, most recent first; -1 ends it
	prev, next []int32
	head, tail int32
	used       int32
}

func newLRUCache(ramPages uint64, maxPages int) (*lruCache, error) {
	maxPages = max(maxPages, 1)
	data, err := offHeap(maxPages * PageSize)
	if err != nil {
		return nil, err
	}
	c := &lruCache{ramPages: ramPages, data: data, page: make([]uint64, maxPages),
		prev: make([]int32, maxPages), next: make([]int32, maxPages)}
	c.reset()
	return c, nil
}

func (c *lruCache) release() []byte { d := c.data; c.data = nil; return d }

func (c *lruCache) pages() uint64 { return c.ramPages }

func (c *lruCache) reset() {
	c.slotOf = map[uint64]int32{}
	c.head, c.tail, c.used = -1, -1, 0
}

func (c *lruCache) slot(s int32) []byte { return c.data[int(s)*PageSize : (int(s)+1)*PageSize] }

func (c *lruCache) get(idx uint64) ([]byte, bool) {
	s, ok := c.slotOf[idx]
	if !ok {
		return nil, false
	}
	return c.slot(s), true
}

func (c *lruCache) unlink(s int32) {
	if c.prev[s] >= 0 {
		c.next[c.prev[s]] = c.next[s]
	} else {
		c.head = c.next[s]
	}
	if c.next[s] >= 0 {
		c.prev[c.next[s]] = c.prev[s]
	} else {
		c.tail = c.prev[s]
	}
}

func (c *lruCache) pushFront(s int32) {
	c.prev[s], c.next[s] = -1, c.head
	if c.head >= 0 {
		c.prev[c.head] = s
	}
	c.head = s
	if c.tail < 0 {
		c.tail = s
	}
}

func (c *lruCache) put(idx uint64, data []byte) {
	s, ok := c.slotOf[idx]
	switch {
	case ok:
		c.unlink(s)
	case int(c.used) < len(c.page):
		s = c.used
		c.used++
	default: // evict the least recently sent
		s = c.tail
		c.unlink(s)
		delete(c.slotOf, c.page[s])
	}
	copy(c.slot(s), data)
	c.page[s] = idx
	c.slotOf[idx] = s
	c.pushFront(s)
}

// DeviceStateZ is a chunk of an epoch's device state compressed with zstd
// as a whole: the chunks together, in offset order, are one zstd frame that
// declares its content size, 1..MaxDeviceState bytes, and decompresses to
// the device state (see checkZstdFrame). Offset and Total are those of the
// compressed bytes. Payload: as DeviceState.
type DeviceStateZ struct{ DeviceState }

// Type returns TypeDeviceStateZ.
func (DeviceStateZ) Type() Type { return TypeDeviceStateZ }

// compressDeviceState returns the zstd frame of a device state, or nil
// when that is not smaller.
func (e *DeltaEncoder) compressDeviceState(dev []byte) []byte {
	z := e.zenc.EncodeAll(dev, nil)
	if len(z) >= len(dev) {
		return nil
	}
	return z
}

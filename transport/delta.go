package transport

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
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

var (
	zstdDecoders = sync.Pool{New: func() any {
		d, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxPagesPerFrame*PageSize))
		return d
	}}
)

// raw decompresses the blob into exactly RawLen bytes.
func (m RAMDelta) raw() ([]byte, error) {
	switch m.Codec {
	case CodecNone:
		return m.Blob, nil
	case CodecZstd:
		d := zstdDecoders.Get().(*zstd.Decoder)
		defer zstdDecoders.Put(d)
		out, err := d.DecodeAll(m.Blob, make([]byte, 0, m.RawLen))
		if err != nil {
			return nil, malformed(TypeRAMDelta, "zstd: %v", err)
		}
		if len(out) != int(m.RawLen) {
			return nil, malformed(TypeRAMDelta, "zstd blob holds %d bytes, raw length %d", len(out), m.RawLen)
		}
		return out, nil
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
	cache []byte
	valid []uint64 // bit per page: cache holds it
	zenc  *zstd.Encoder
	lz    lz4.Compressor
	raw   []byte
	zbuf  []byte
	lbuf  []byte
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
	z, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, fmt.Errorf("transport: zstd: %w", err)
	}
	pages := ramSize / PageSize
	return &DeltaEncoder{cache: make([]byte, ramSize), valid: make([]uint64, (pages+63)/64), zenc: z}, nil
}

// Reset forgets every cached page.
func (e *DeltaEncoder) Reset() { clear(e.valid) }

// Encode makes a RAMDelta of up to MaxPagesPerFrame pages in ascending
// index order and remembers their new versions.
func (e *DeltaEncoder) Encode(pages []Page) (RAMDelta, error) {
	m := RAMDelta{Indexes: make([]uint64, len(pages)), Kinds: make([]PageKind, len(pages))}
	e.raw = e.raw[:0]
	for i, pg := range pages {
		m.Indexes[i] = pg.Index
		off := pg.Index * PageSize
		if off+PageSize > uint64(len(e.cache)) {
			return RAMDelta{}, fmt.Errorf("transport: page %d beyond the encoder's %d bytes of RAM", pg.Index, len(e.cache))
		}
		prev := e.cache[off : off+PageSize]
		known := e.valid[pg.Index/64]&(1<<(pg.Index%64)) != 0
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
		copy(prev, pg.Data)
		e.valid[pg.Index/64] |= 1 << (pg.Index % 64)
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

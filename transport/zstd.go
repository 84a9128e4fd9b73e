package transport

import (
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Decompression is bounded by what the sender declares, within the caps:
// a zstd blob (a RAMDelta's pages, an epoch's DeviceStateZ) must be exactly
// one zstd frame that declares its content size: for a RAMDelta exactly its
// raw length (at most count×PageSize), for a device state 1..MaxDeviceState
// bytes. The frame's header and block headers are checked before anything
// is decompressed, so a blob of several frames, with bytes after its
// frame, or whose blocks cannot add up to what it declares is refused
// without allocating for it. The output buffer is then allocated once: the
// declared size plus room for one block (at most 128 KiB, and no more than
// the frame's window: a single-segment frame's window is its content
// size). The decoder checks the size after each block and is held to the
// buffer (WithDecodeAllCapLimit), so a frame that holds more than it
// declares is refused without the buffer growing: at worst the declared
// size and a block are allocated.
//
// The primary's encoder writes single-segment frames, which always carry
// their content size (zstd omits it from other frames under 256 bytes).

const (
	// zstdMaxBlock is the most a zstd block regenerates (and its most
	// compressed bytes).
	zstdMaxBlock = 128 << 10
	// zstdOverAlloc is what the decoder wants past the end of its output.
	zstdOverAlloc = 16
)

var (
	// zstdDecoders decompress RAMDelta blobs, at most a frame of pages.
	zstdDecoders = sync.Pool{New: func() any {
		return newZstdDecoder(MaxPagesPerFrame * PageSize)
	}}
	// deviceStateDecoders allow the larger device state (one per commit).
	deviceStateDecoders = sync.Pool{New: func() any {
		return newZstdDecoder(MaxDeviceState)
	}}
)

// newZstdDecoder returns a decoder for DecodeAll that refuses frames that
// decompress to more than limit bytes, need a larger window, or more than
// the room in the destination.
func newZstdDecoder(limit uint64) *zstd.Decoder {
	d, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(limit),
		zstd.WithDecoderMaxWindow(max(limit, zstd.MinWindowSize)),
		zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		panic(fmt.Sprintf("transport: zstd decoder: %v", err)) // the options are constant
	}
	return d
}

// zstdFrame is what a checked zstd frame declares.
type zstdFrame struct {
	// size is the content size.
	size uint64
	// block is the most one block of it regenerates.
	block uint64
}

// room returns the output buffer to decode f into: the content and one
// block past it.
func (f zstdFrame) room() []byte { return make([]byte, 0, f.size+f.block+zstdOverAlloc) }

// checkZstdFrame checks that z, a blob of a message of type t, is exactly
// one complete zstd frame without a dictionary, declaring its content size
// and at most limit bytes (ErrTooLarge), and returns what it declares. It
// reads only the frame and block headers. Its errors match ErrMalformed or
// ErrTooLarge.
func checkZstdFrame(t Type, z []byte, limit uint64) (zstdFrame, error) {
	var h zstd.Header
	if err := h.Decode(z); err != nil {
		return zstdFrame{}, malformed(t, "zstd: frame header: %v", err)
	}
	window := h.WindowSize
	if h.SingleSegment {
		window = max(h.FrameContentSize, zstd.MinWindowSize)
	}
	switch {
	case h.Skippable:
		return zstdFrame{}, malformed(t, "zstd: a skippable frame, not a frame of content")
	case h.DictionaryID != 0:
		return zstdFrame{}, malformed(t, "zstd: the frame needs dictionary %d", h.DictionaryID)
	case !h.HasFCS:
		return zstdFrame{}, malformed(t, "zstd: the frame declares no content size")
	case h.FrameContentSize > limit:
		return zstdFrame{}, tooLarge(t, "zstd: the frame declares %d bytes, max %d", h.FrameContentSize, limit)
	case window > max(limit, zstd.MinWindowSize):
		return zstdFrame{}, tooLarge(t, "zstd: the frame's window is %d bytes, max %d", window, max(limit, zstd.MinWindowSize))
	}
	f := zstdFrame{size: h.FrameContentSize, block: min(window, zstdMaxBlock)}
	// Walk the blocks: 3-byte little-endian headers (last u1 | type u2 |
	// size u21), then the block's bytes: size of them for a raw or
	// compressed block, one for an RLE block (which regenerates size).
	var exact, most uint64 // what raw and RLE blocks regenerate; all blocks at most
	rest := z[h.HeaderSize:]
	for last := false; !last; {
		if len(rest) < 3 {
			return zstdFrame{}, malformed(t, "zstd: the frame ends inside a block header")
		}
		bh := uint32(rest[0]) | uint32(rest[1])<<8 | uint32(rest[2])<<16
		rest = rest[3:]
		last = bh&1 != 0
		size := uint64(bh >> 3)
		if size > f.block {
			return zstdFrame{}, malformed(t, "zstd: a block of %d bytes, max %d", size, f.block)
		}
		n := size // bytes the block occupies
		switch bh >> 1 & 3 {
		case 0: // raw
			exact += size
			most += size
		case 1: // RLE
			n = 1
			exact += size
			most += size
		case 2: // compressed
			most += f.block
		default:
			return zstdFrame{}, malformed(t, "zstd: a block of the reserved type")
		}
		if uint64(len(rest)) < n {
			return zstdFrame{}, malformed(t, "zstd: the frame ends inside a block")
		}
		rest = rest[n:]
		if exact > f.size {
			return zstdFrame{}, malformed(t, "zstd: the blocks hold more than the %d bytes the frame declares", f.size)
		}
	}
	if most < f.size {
		return zstdFrame{}, malformed(t, "zstd: the blocks hold at most %d bytes, the frame declares %d", most, f.size)
	}
	if h.HasCheckSum {
		if len(rest) < 4 {
			return zstdFrame{}, malformed(t, "zstd: the frame ends inside its checksum")
		}
		rest = rest[4:]
	}
	if len(rest) != 0 {
		return zstdFrame{}, malformed(t, "zstd: %d bytes after the frame (one frame only)", len(rest))
	}
	return f, nil
}

// decodeZstdFrame decompresses z, a blob of a message of type t that
// checkZstdFrame found to be the frame f, into a buffer allocated for f,
// and checks that it holds exactly the declared size.
func decodeZstdFrame(t Type, pool *sync.Pool, z []byte, f zstdFrame) ([]byte, error) {
	d := pool.Get().(*zstd.Decoder)
	defer pool.Put(d)
	out, err := d.DecodeAll(z, f.room())
	if err != nil {
		return nil, malformed(t, "zstd: %v", err)
	}
	if uint64(len(out)) != f.size {
		return nil, malformed(t, "zstd: the frame holds %d bytes, declares %d", len(out), f.size)
	}
	return out, nil
}

// decompressDeviceState reverses compressDeviceState: z is one zstd frame
// declaring 1..MaxDeviceState bytes, and the result is allocated once, for
// that size (and a block).
func decompressDeviceState(z []byte) ([]byte, error) {
	f, err := checkZstdFrame(TypeDeviceStateZ, z, MaxDeviceState)
	if err != nil {
		return nil, err
	}
	if f.size == 0 {
		return nil, malformed(TypeDeviceStateZ, "zstd: an empty device state")
	}
	return decodeZstdFrame(TypeDeviceStateZ, &deviceStateDecoders, z, f)
}

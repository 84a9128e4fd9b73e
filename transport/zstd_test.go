package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"runtime"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// allocated returns how many bytes f allocated on the heap.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// zstdAll compresses src as one frame, as the primary does.
func zstdAll(t testing.TB, src []byte) []byte {
	t.Helper()
	enc, err := NewDeltaEncoder(PageSize)
	if err != nil {
		t.Fatal(err)
	}
	return enc.zenc.EncodeAll(src, nil)
}

// zstdStream compresses src with the streaming encoder, whose frame
// declares no content size.
func zstdStream(t testing.TB, src []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	w, err := zstd.NewWriter(&b, zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	w.Write(src)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// withContentSize returns a copy of the single-segment frame z whose header
// declares size in place of its real content size (4-byte field).
func withContentSize(t testing.TB, z []byte, size uint32) []byte {
	t.Helper()
	var h zstd.Header
	if err := h.Decode(z); err != nil || !h.SingleSegment || h.HeaderSize != 4+1+4 {
		t.Fatalf("frame header %+v (%v): want single segment with a 4-byte content size", h, err)
	}
	z = bytes.Clone(z)
	binary.LittleEndian.PutUint32(z[5:], size)
	return z
}

// stateText is a device-state-like blob of n bytes that compresses well.
func stateText(n int) []byte {
	const pattern = "QEVM\x00\x00\x01virtio-net\x00"
	b := make([]byte, n)
	for i := range b {
		b[i] = pattern[i%len(pattern)] ^ byte(i/4096)
	}
	return b
}

// TestDeviceStateZMemory: decompressing a device state allocates about
// what it declares, never beyond MaxDeviceState, and a stream that holds
// more than its one frame declares, or more frames than one, is refused
// before it is decompressed.
func TestDeviceStateZMemory(t *testing.T) {
	small := stateText(50_000)
	tenth := zstdAll(t, make([]byte, MaxDeviceState/10))
	var tenFrames []byte // 64 MiB in total, a dozen KiB compressed
	for range 10 {
		tenFrames = append(tenFrames, tenth...)
	}
	mib := zstdAll(t, make([]byte, 1<<20))
	tests := []struct {
		name     string
		z        []byte
		want     []byte // nil: must be refused
		maxAlloc uint64
	}{
		{"50 KB state", zstdAll(t, small), small, 1 << 20},
		{"1 MiB of zeroes", mib, make([]byte, 1<<20), 2 << 20},
		{"ten frames of 6.4 MiB", tenFrames, nil, 1 << 20},
		{"frame then trailing bytes", append(bytes.Clone(zstdAll(t, small)), 1, 2, 3), nil, 1 << 20},
		{"declares 4 KiB, holds 1 MiB", withContentSize(t, mib, 4096), nil, 1 << 20},
		{"declares 200 KB, compressed blocks hold 300 KB", withContentSize(t, zstdAll(t, stateText(300_000)), 200_000), nil, 1 << 20},
		{"declares 64 MiB, holds 1 MiB", withContentSize(t, mib, MaxDeviceState), nil, 1 << 20},
		{"declares over MaxDeviceState", withContentSize(t, mib, MaxDeviceState+1), nil, 1 << 20},
		{"declares no content size", zstdStream(t, make([]byte, 1<<20)), nil, 1 << 20},
		{"empty", nil, nil, 1 << 20},
		{"truncated", zstdAll(t, small)[:100], nil, 1 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			decompressDeviceState(tt.z) // pool a decoder, as a running backup has one
			var (
				got []byte
				err error
			)
			n := allocated(func() { got, err = decompressDeviceState(tt.z) })
			switch {
			case tt.want == nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrTooLarge):
				t.Errorf("%d compressed bytes decompressed to %d bytes, err %v; want ErrMalformed or ErrTooLarge", len(tt.z), len(got), err)
			case tt.want != nil && (err != nil || !bytes.Equal(got, tt.want)):
				t.Errorf("decompressed %d bytes, err %v; want the %d bytes compressed", len(got), err, len(tt.want))
			}
			if n > tt.maxAlloc {
				t.Errorf("allocated %d bytes (%.1f MiB), want at most %d", n, float64(n)/(1<<20), tt.maxAlloc)
			}
			t.Logf("%d compressed bytes: allocated %d bytes, err %v", len(tt.z), n, err)
		})
	}
}

// TestRAMDeltaDecompressMemory: a RAMDelta blob decompresses to exactly
// its raw length, at most count×PageSize, and expanding it allocates about
// that much; a blob that holds more, in one frame or several, is refused.
func TestRAMDeltaDecompressMemory(t *testing.T) {
	raw := stateText(2 * PageSize)
	onePage := zstdAll(t, make([]byte, PageSize))
	var pageFrames []byte // 1 MiB as 256 frames of a page
	for range MaxPagesPerFrame {
		pageFrames = append(pageFrames, onePage...)
	}
	lz := func(src []byte) []byte {
		out := make([]byte, lz4.CompressBlockBound(len(src)))
		n, err := lz4.CompressBlock(src, out, nil)
		if err != nil || n == 0 {
			t.Fatalf("lz4: %d, %v", n, err)
		}
		return out[:n]
	}
	kinds := func(n int) []PageKind {
		k := make([]PageKind, n)
		for i := range k {
			k[i] = PageRaw
		}
		return k
	}
	tests := []struct {
		name     string
		m        RAMDelta
		ok       bool
		maxAlloc uint64
	}{
		{"zstd two pages", RAMDelta{Indexes: []uint64{1, 2}, Kinds: kinds(2), Codec: CodecZstd, RawLen: 2 * PageSize, Blob: zstdAll(t, raw)}, true, 1 << 20},
		{"lz4 two pages", RAMDelta{Indexes: []uint64{1, 2}, Kinds: kinds(2), Codec: CodecLZ4, RawLen: 2 * PageSize, Blob: lz(raw)}, true, 1 << 20},
		{"zstd 256 frames for one page", RAMDelta{Indexes: []uint64{1}, Kinds: kinds(1), Codec: CodecZstd, RawLen: PageSize, Blob: pageFrames}, false, 1 << 20},
		{"zstd 1 MiB for one page", RAMDelta{Indexes: []uint64{1}, Kinds: kinds(1), Codec: CodecZstd, RawLen: PageSize, Blob: zstdAll(t, make([]byte, 1<<20))}, false, 1 << 20},
		{"zstd declares a page, holds 1 MiB", RAMDelta{Indexes: []uint64{1}, Kinds: kinds(1), Codec: CodecZstd, RawLen: PageSize, Blob: withContentSize(t, zstdAll(t, make([]byte, 1<<20)), PageSize)}, false, 1 << 20},
		{"zstd declares two pages, a block holds 80 KB", RAMDelta{Indexes: []uint64{1, 2}, Kinds: kinds(2), Codec: CodecZstd, RawLen: 2 * PageSize, Blob: withContentSize(t, zstdAll(t, stateText(80_000)), 2*PageSize)}, false, 1 << 20},
		{"zstd no content size", RAMDelta{Indexes: []uint64{1}, Kinds: kinds(1), Codec: CodecZstd, RawLen: PageSize, Blob: zstdStream(t, make([]byte, 1<<20))}, false, 1 << 20},
		{"lz4 1 MiB for one page", RAMDelta{Indexes: []uint64{1}, Kinds: kinds(1), Codec: CodecLZ4, RawLen: PageSize, Blob: lz(make([]byte, 1<<20))}, false, 1 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := tt.m.AppendPayload(nil); err != nil {
				t.Fatalf("the test's message does not encode: %v", err)
			}
			base := func(uint64) []byte { return nil }
			tt.m.Expand(base) // pool a decoder
			var (
				got RAMPages
				err error
			)
			n := allocated(func() { got, err = tt.m.Expand(base) })
			if tt.ok && err != nil {
				t.Errorf("Expand: %v", err)
			}
			if !tt.ok && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrTooLarge) {
				t.Errorf("Expand = %d pages, %v; want ErrMalformed or ErrTooLarge", len(got.Pages), err)
			}
			if n > tt.maxAlloc {
				t.Errorf("allocated %d bytes (%.1f MiB), want at most %d", n, float64(n)/(1<<20), tt.maxAlloc)
			}
			t.Logf("%d blob bytes: allocated %d bytes, err %v", len(tt.m.Blob), n, err)
		})
	}
}

// FuzzDecompressDeviceState: any blob either is refused with ErrMalformed
// or ErrTooLarge or decompresses to exactly the 1..MaxDeviceState bytes its
// one frame declares.
func FuzzDecompressDeviceState(f *testing.F) {
	small := zstdAll(f, stateText(3000))
	f.Add(small)
	f.Add(zstdAll(f, make([]byte, 300)))
	f.Add(zstdAll(f, []byte("x")))
	f.Add(append(bytes.Clone(small), small...))
	f.Add(withContentSize(f, zstdAll(f, stateText(80_000)), 5000))
	f.Add(zstdStream(f, stateText(2000)))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, z []byte) {
		out, err := decompressDeviceState(z)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("error %v matches neither ErrMalformed nor ErrTooLarge", err)
			}
			return
		}
		var h zstd.Header
		if err := h.Decode(z); err != nil || !h.HasFCS || uint64(len(out)) != h.FrameContentSize || len(out) == 0 || len(out) > MaxDeviceState {
			t.Fatalf("decompressed %d bytes from a frame with header %+v (%v)", len(out), h, err)
		}
	})
}

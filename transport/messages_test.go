package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"reflect"
	"strings"
	"testing"
)

func sampleMessages() []struct {
	name string
	m    Message
} {
	return []struct {
		name string
		m    Message
	}{
		{"hello primary", Hello{Version: 1, Role: RolePrimary, VMName: "web-1", RAMSize: 4 << 30, PageSize: PageSize, LastCommitted: 0}},
		{"hello backup resuming", Hello{Version: 1, Role: RoleBackup, VMName: "データベース", RAMSize: 1 << 20, PageSize: PageSize, LastCommitted: 812}},
		{"hello longest name", Hello{Version: 7, Role: RoleBackup, VMName: strings.Repeat("n", MaxVMName), RAMSize: PageSize, PageSize: PageSize, LastCommitted: 1<<64 - 1}},
		{"hello other page size", Hello{Version: 1, Role: RolePrimary, VMName: "huge", RAMSize: 2 << 20, PageSize: 2 << 20}},
		{"hello with a disk", Hello{Version: 2, Role: RolePrimary, VMName: "db", RAMSize: 1 << 30, PageSize: PageSize, DiskSize: 20 << 30}},
		{"hello largest disk", Hello{Version: 2, Role: RoleBackup, VMName: "db", RAMSize: 1 << 30, PageSize: PageSize, LastCommitted: 9, DiskSize: 1<<64 - 1}},
		{"one page", RAMPages{Pages: pages(0, 1, 1, 1)}},
		{"full frame of pages", RAMPages{Pages: pages(1000, 3, MaxPagesPerFrame, 2)}},
		{"highest page index", RAMPages{Pages: []Page{page(MaxPageIndex-1, 3), page(MaxPageIndex, 3)}}},
		{"device state whole", DeviceState{Offset: 0, Total: 3, Data: []byte{1, 2, 3}}},
		{"device state chunk", DeviceState{Offset: 100, Total: MaxDeviceState, Data: bytes.Repeat([]byte{7}, 1000)}},
		{"device state last byte", DeviceState{Offset: MaxDeviceState - 1, Total: MaxDeviceState, Data: []byte{9}}},
		{"commit", Commit{PageCount: 300, DeviceStateLen: 32 << 10, Digest: 0xcafef00d}},
		{"commit empty epoch", Commit{}},
		{"ack", Ack{}},
		{"heartbeat", Heartbeat{SentUnixNano: 1_700_000_000_123_456_789, LastCommitted: 41}},
		{"heartbeat negative time", Heartbeat{SentUnixNano: -1}},
		{"error", Error{Code: CodeMismatch, Message: "RAM size 1073741824, want 2147483648"}},
		{"error empty message", Error{Code: CodeInternal}},
		{"error unknown code", Error{Code: 999, Message: "from a newer peer"}},
		{"error longest message", Error{Code: CodeProtocol, Message: strings.Repeat("é", MaxErrorMessage/2)}},
		{"disk write", DiskWrite{Offset: 4096, Length: 3, Data: []byte{1, 2, 3}}},
		{"disk write largest chunk", DiskWrite{Offset: 1 << 40, Length: MaxDiskChunk, Data: bytes.Repeat([]byte{5}, MaxDiskChunk)}},
		{"disk zeroes", DiskWrite{Offset: 512, Length: MaxZeroLength, Flags: DiskZero}},
	}
}

// TestMessagesRoundTrip sends every message through a frame and back.
func TestMessagesRoundTrip(t *testing.T) {
	var frames []Frame
	msgs := sampleMessages()
	for i, tt := range msgs {
		frames = append(frames, mustFrame(t, uint64(i), uint64(i+1), tt.m))
	}
	r := NewReader(bytes.NewReader(encodeFrames(frames...)))
	for i, tt := range msgs {
		t.Run(tt.name, func(t *testing.T) {
			f, err := r.Next()
			if err != nil {
				t.Fatalf("Next: %v", err)
			}
			if f.Type != tt.m.Type() || f.Epoch != uint64(i) {
				t.Fatalf("frame %v, want type %v epoch %d", f, tt.m.Type(), i)
			}
			got, err := Decode(f)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !reflect.DeepEqual(got, tt.m) {
				t.Errorf("decoded %+v, want %+v", got, tt.m)
			}
			again, err := got.AppendPayload(nil)
			if err != nil || !bytes.Equal(again, f.Payload) {
				t.Errorf("re-encoding differs (err %v)", err)
			}
		})
	}
	if _, err := r.Next(); err != io.EOF {
		t.Errorf("after the messages: %v, want io.EOF", err)
	}
}

func TestMessagesPayloadSizes(t *testing.T) {
	full, err := RAMPages{Pages: pages(0, 1, MaxPagesPerFrame, 0)}.AppendPayload(nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := 2 + MaxPagesPerFrame*(8+PageSize); len(full) != want || len(full) > MaxPayload {
		t.Errorf("full RAMPages payload is %d bytes, want %d (<= MaxPayload)", len(full), want)
	}
	chunk, err := DeviceState{Total: MaxDeviceState, Data: make([]byte, MaxDeviceChunk)}.AppendPayload(nil)
	if err != nil || len(chunk) != MaxMessage || len(chunk)+TagSize != MaxPayload {
		t.Errorf("largest DeviceState payload: %d bytes, err %v; want exactly MaxMessage, MaxPayload with its tag", len(chunk), err)
	}
}

// TestHelloLayout pins Hello's version 2 payload, disk size last.
func TestHelloLayout(t *testing.T) {
	for _, tt := range []struct {
		name string
		m    Hello
		want []byte
	}{
		{"with a disk", Hello{Version: 2, Role: RoleBackup, VMName: "vm", RAMSize: 4 << 30, PageSize: PageSize, LastCommitted: 0x0102030405060708, DiskSize: 0x1112131415161718}, []byte{
			2, 2, 2, 'v', 'm', // version, role, name length, name
			0, 0, 0, 1, 0, 0, 0, 0, // RAM size
			0, 0, 0x10, 0, // page size
			1, 2, 3, 4, 5, 6, 7, 8, // last committed
			0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // disk size
		}},
		{"no disk", Hello{Version: 2, Role: RolePrimary, VMName: "a", RAMSize: PageSize, PageSize: PageSize}, []byte{
			2, 1, 1, 'a',
			0, 0, 0, 0, 0, 0, 0x10, 0,
			0, 0, 0x10, 0,
			0, 0, 0, 0, 0, 0, 0, 0,
			0, 0, 0, 0, 0, 0, 0, 0, // 0: no disk
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, err := tt.m.AppendPayload(nil)
			if err != nil || !bytes.Equal(p, tt.want) {
				t.Fatalf("payload % x (err %v)\nwant    % x", p, err, tt.want)
			}
			got, err := DecodeHello(tt.want)
			if err != nil || got != tt.m {
				t.Fatalf("DecodeHello = %+v, %v; want %+v", got, err, tt.m)
			}
		})
	}
}

func TestMessagesEncodeRejects(t *testing.T) {
	hello := Hello{Version: 1, Role: RolePrimary, VMName: "vm", RAMSize: 1 << 20, PageSize: PageSize}
	with := func(f func(*Hello)) Hello { h := hello; f(&h); return h }
	short := page(3, 0)
	short.Data = short.Data[:100]
	tests := []struct {
		name string
		m    Message
		want error
	}{
		{"hello version 0", with(func(h *Hello) { h.Version = 0 }), ErrMalformed},
		{"hello role 0", with(func(h *Hello) { h.Role = 0 }), ErrMalformed},
		{"hello role 3", with(func(h *Hello) { h.Role = 3 }), ErrMalformed},
		{"hello empty name", with(func(h *Hello) { h.VMName = "" }), ErrMalformed},
		{"hello long name", with(func(h *Hello) { h.VMName = strings.Repeat("x", MaxVMName+1) }), ErrTooLarge},
		{"hello name not UTF-8", with(func(h *Hello) { h.VMName = "a\xffb" }), ErrMalformed},
		{"hello page size 0", with(func(h *Hello) { h.PageSize = 0 }), ErrMalformed},
		{"hello page size 3000", with(func(h *Hello) { h.PageSize = 3000 }), ErrMalformed},
		{"hello RAM 0", with(func(h *Hello) { h.RAMSize = 0 }), ErrMalformed},
		{"hello RAM not whole pages", with(func(h *Hello) { h.RAMSize = 1<<20 + 1 }), ErrMalformed},
		{"no pages", RAMPages{}, ErrMalformed},
		{"too many pages", RAMPages{Pages: pages(0, 1, MaxPagesPerFrame+1, 0)}, ErrTooLarge},
		{"short page", RAMPages{Pages: []Page{short}}, ErrMalformed},
		{"pages descending", RAMPages{Pages: []Page{page(5, 0), page(4, 0)}}, ErrMalformed},
		{"page twice", RAMPages{Pages: []Page{page(5, 0), page(5, 0)}}, ErrMalformed},
		{"page index overflows", RAMPages{Pages: []Page{page(MaxPageIndex+1, 0)}}, ErrMalformed},
		{"device state empty", DeviceState{Total: 1}, ErrMalformed},
		{"device state past total", DeviceState{Offset: 2, Total: 3, Data: []byte{1, 2}}, ErrMalformed},
		{"device state offset overflow", DeviceState{Offset: 1<<32 - 1, Total: 1<<32 - 1, Data: []byte{1}}, ErrTooLarge},
		{"device state total", DeviceState{Total: MaxDeviceState + 1, Data: []byte{1}}, ErrTooLarge},
		{"device state chunk", DeviceState{Total: MaxDeviceState, Data: make([]byte, MaxDeviceChunk+1)}, ErrTooLarge},
		{"commit device state", Commit{DeviceStateLen: MaxDeviceState + 1}, ErrTooLarge},
		{"error code 0", Error{Message: "x"}, ErrMalformed},
		{"error long", Error{Code: 1, Message: strings.Repeat("x", MaxErrorMessage+1)}, ErrTooLarge},
		{"error not UTF-8", Error{Code: 1, Message: "\xc3"}, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := tt.m.AppendPayload([]byte("dst"))
			if !errors.Is(err, tt.want) {
				t.Fatalf("err %v, want %v", err, tt.want)
			}
			if string(out) != "dst" {
				t.Errorf("dst changed to %q on error", out)
			}
			if _, err := NewFrame(1, tt.m); !errors.Is(err, tt.want) {
				t.Errorf("NewFrame: err %v, want %v", err, tt.want)
			}
		})
	}
}

func TestMessagesDecodeRejects(t *testing.T) {
	enc := func(m Message) []byte {
		p, err := m.AppendPayload(nil)
		if err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		return p
	}
	hello := enc(Hello{Version: 1, Role: RoleBackup, VMName: "vm", RAMSize: 1 << 20, PageSize: PageSize})
	two := enc(RAMPages{Pages: []Page{page(1, 0), page(2, 0)}})
	set := func(p []byte, off int, v ...byte) []byte {
		p = bytes.Clone(p)
		copy(p[off:], v)
		return p
	}
	plus := func(p []byte) []byte { return append(bytes.Clone(p), 0) }
	u16 := func(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
	tests := []struct {
		name    string
		typ     Type
		flags   Flags
		payload []byte
		want    error
		detail  string
	}{
		{"hello trailing byte", TypeHello, 0, plus(hello), ErrMalformed, "Hello: payload is 34 bytes, want 33"},
		{"hello short", TypeHello, 0, hello[:len(hello)-1], ErrMalformed, "want 33"},
		{"hello of version 1 (no disk size)", TypeHello, 0, hello[:len(hello)-8], ErrMalformed, "Hello: payload is 25 bytes, want 33"},
		{"hello empty", TypeHello, 0, nil, ErrMalformed, "Hello: payload is 0 bytes"},
		{"hello name length too long", TypeHello, 0, set(hello, 2, 3), ErrMalformed, "want 34"},
		{"hello role", TypeHello, 0, set(hello, 1, 9), ErrMalformed, "unknown role 9"},
		{"hello name not UTF-8", TypeHello, 0, set(hello, 3, 0xff), ErrMalformed, "not UTF-8"},
		{"hello empty name", TypeHello, 0, append([]byte{1, 2, 0}, hello[5:]...), ErrMalformed, "empty VM name"},
		{"pages trailing byte", TypeRAMPages, 0, plus(two), ErrMalformed, "RAMPages: payload is 8211 bytes, want 8210"},
		{"pages short", TypeRAMPages, 0, two[:len(two)-1], ErrMalformed, "want 8210"},
		{"pages count only", TypeRAMPages, 0, u16(0), ErrMalformed, "no pages"},
		{"pages count 257", TypeRAMPages, 0, u16(MaxPagesPerFrame + 1), ErrTooLarge, "257 pages, max 256"},
		{"pages count 65535", TypeRAMPages, 0, u16(65535), ErrTooLarge, "65535 pages"},
		{"pages one byte", TypeRAMPages, 0, []byte{0}, ErrMalformed, "at least 2"},
		{"pages out of order", TypeRAMPages, 0, set(two, 2+7, 3), ErrMalformed, "page index 2 after 3"},
		{"device header only", TypeDeviceState, 0, make([]byte, 8), ErrMalformed, "empty chunk"},
		{"device short", TypeDeviceState, 0, make([]byte, 7), ErrMalformed, "at least 9"},
		{"device past total", TypeDeviceState, 0, []byte{0, 0, 0, 0, 0, 0, 0, 1, 'a', 'b'}, ErrMalformed, "chunk 0+2 ends beyond total 1"},
		{"device total over cap", TypeDeviceState, 0, []byte{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 'a'}, ErrTooLarge, "total 4294967295 bytes"},
		{"commit trailing byte", TypeCommit, 0, make([]byte, 21), ErrMalformed, "Commit: payload is 21 bytes, want 20"},
		{"commit short", TypeCommit, 0, make([]byte, 19), ErrMalformed, "want 20"},
		{"commit device state over cap", TypeCommit, 0, set(make([]byte, 20), 8, 0, 0, 0, 0, 4, 0, 0, 1), ErrTooLarge, "device state"},
		{"ack not empty", TypeAck, 0, []byte{0}, ErrMalformed, "Ack: payload is 1 bytes, want 0"},
		{"heartbeat trailing byte", TypeHeartbeat, 0, make([]byte, 17), ErrMalformed, "want 16"},
		{"heartbeat short", TypeHeartbeat, 0, make([]byte, 15), ErrMalformed, "want 16"},
		{"error trailing byte", TypeError, 0, []byte{0, 1, 0, 1, 'x', 'y'}, ErrMalformed, "want 5"},
		{"error short message", TypeError, 0, []byte{0, 1, 0, 2, 'x'}, ErrMalformed, "want 6"},
		{"error short", TypeError, 0, []byte{0, 1, 0}, ErrMalformed, "at least 4"},
		{"error code 0", TypeError, 0, []byte{0, 0, 0, 0}, ErrMalformed, "code 0"},
		{"error message over cap", TypeError, 0, []byte{0, 1, 0x04, 0x01}, ErrTooLarge, "1025 bytes"},
		{"disk write short", TypeDiskWrite, 0, []byte{1}, ErrMalformed, "at least 13"},
		{"disk write length mismatch", TypeDiskWrite, 0, []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1, 2}, ErrMalformed, "length 4 with 2 bytes"},
		{"disk zero with data", TypeDiskWrite, 0, []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 7}, ErrMalformed, "zero write with 1 bytes"},
		{"disk write unknown flag", TypeDiskWrite, 0, []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 7}, ErrMalformed, "unknown flags"},
		{"disk write empty", TypeDiskWrite, 0, []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, ErrMalformed, "empty write"},
		{"disk write overflows", TypeDiskWrite, 0, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2, 1}, ErrMalformed, "overflows"},
		{"disk zeroes too long", TypeDiskWrite, 0, []byte{0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 1, 1}, ErrTooLarge, "zero write of"},
		{"message over MaxMessage", TypeDeviceState, 0, make([]byte, MaxMessage+1), ErrTooLarge, "exceeds MaxMessage"},
		{"unknown type", 42, 0, nil, ErrUnsupported, "unknown frame type 42"},
		{"flags", TypeAck, FlagCompressed, nil, ErrUnsupported, "Ack with flags Compressed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Decode(Frame{Type: tt.typ, Flags: tt.flags, Payload: tt.payload})
			if !errors.Is(err, tt.want) {
				t.Fatalf("decoded %+v, err %v; want %v", m, err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.detail) {
				t.Errorf("err %q does not contain %q", err, tt.detail)
			}
		})
	}
}

// TestRAMPagesAliasing checks that decoded pages alias the payload without
// letting an append through one page overwrite the next.
func TestRAMPagesAliasing(t *testing.T) {
	p, err := RAMPages{Pages: pages(0, 1, 2, 0)}.AppendPayload(nil)
	if err != nil {
		t.Fatal(err)
	}
	m, err := DecodeRAMPages(p)
	if err != nil {
		t.Fatal(err)
	}
	if cap(m.Pages[0].Data) != PageSize {
		t.Errorf("page data capacity %d, want %d", cap(m.Pages[0].Data), PageSize)
	}
	next := m.Pages[1].Data[0]
	_ = append(m.Pages[0].Data, ^next)
	if m.Pages[1].Data[0] != next {
		t.Errorf("appending to page 0 overwrote page 1")
	}
}

func TestChunkDeviceState(t *testing.T) {
	for _, n := range []int{0, 1, 32 << 10, MaxDeviceChunk, MaxDeviceChunk + 1, 3*MaxDeviceChunk + 5} {
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(i / 4093)
		}
		chunks, err := ChunkDeviceState(data)
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if want := (n + MaxDeviceChunk - 1) / MaxDeviceChunk; len(chunks) != want {
			t.Errorf("%d bytes: %d chunks, want %d", n, len(chunks), want)
		}
		var joined []byte
		for _, c := range chunks {
			if int(c.Offset) != len(joined) || int(c.Total) != n {
				t.Errorf("%d bytes: chunk offset %d total %d after %d bytes", n, c.Offset, c.Total, len(joined))
			}
			if _, err := c.AppendPayload(nil); err != nil {
				t.Errorf("%d bytes: chunk at %d does not encode: %v", n, c.Offset, err)
			}
			joined = append(joined, c.Data...)
		}
		if !bytes.Equal(joined, data) {
			t.Errorf("%d bytes: chunks do not join to the data", n)
		}
	}
	if _, err := ChunkDeviceState(make([]byte, MaxDeviceState+1)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("over MaxDeviceState: err %v, want ErrTooLarge", err)
	}
}

// TestDigestDefinition pins the digest to its documented definition.
func TestDigestDefinition(t *testing.T) {
	pgs := []Page{page(3, 1), page(9, 2)}
	dev := []byte("device state")
	var d Digest
	d.AddPages(RAMPages{Pages: pgs})
	d.AddDeviceState(dev[:5])
	d.AddDeviceState(dev[5:])
	var content []byte
	for _, p := range pgs {
		content = binary.BigEndian.AppendUint64(content, p.Index)
		content = append(content, p.Data...)
	}
	content = append(content, dev...)
	want := Commit{PageCount: 2, DeviceStateLen: uint64(len(dev)), Digest: crc32.Checksum(content, crc32.MakeTable(crc32.Castagnoli))}
	if got := d.Commit(); got != want {
		t.Errorf("Commit() = %+v, want %+v", got, want)
	}
	d.Reset()
	if got := d.Commit(); got != (Commit{}) {
		t.Errorf("after Reset: %+v", got)
	}
}

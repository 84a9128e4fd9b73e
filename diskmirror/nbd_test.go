package diskmirror

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestDecodeRequest(t *testing.T) {
	good := Request{Flags: cmdFlagFUA, Type: CmdWrite, Handle: 0x1122334455667788, Offset: 4096, Length: 512}
	got, err := DecodeRequest(good.Encode())
	if err != nil || got != good {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"short", good.Encode()[:27], "27 bytes"},
		{"magic", append([]byte{0, 0, 0, 0}, good.Encode()[4:]...), "magic"},
		{"unknown command", Request{Type: 99}.Encode(), "unknown command"},
		{"overflow", Request{Type: CmdWriteZeroes, Offset: ^uint64(0) - 10, Length: 100}.Encode(), "overflows"},
		{"huge write", Request{Type: CmdWrite, Length: MaxRequestLength + 1}.Encode(), "at most"},
	} {
		_, err := DecodeRequest(tc.b)
		if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrProtocol saying %q", tc.name, err, tc.want)
		}
	}
	// Zeroes may cover more than a data request.
	if _, err := DecodeRequest(Request{Type: CmdWriteZeroes, Length: 1 << 31}.Encode()); err != nil {
		t.Errorf("large WRITE_ZEROES: %v", err)
	}
}

func TestDecodeGo(t *testing.T) {
	data := []byte{0, 0, 0, 5, 'r', 'e', 'm', 'u', 's', 0, 2, 0, 0, 0, 3}
	g, err := decodeGo(data)
	if err != nil || g.name != "remus" || len(g.infos) != 2 || g.infos[1] != nbdInfoBlockSize {
		t.Fatalf("decodeGo = %+v, %v", g, err)
	}
	for _, bad := range [][]byte{nil, {0, 0, 0, 9, 'x'}, {0, 0, 0, 0, 0, 2, 0, 1}} {
		if _, err := decodeGo(bad); err == nil {
			t.Errorf("decodeGo(%x) accepted", bad)
		}
	}
}

func FuzzDecodeRequest(f *testing.F) {
	f.Add(Request{Type: CmdWrite, Length: 512}.Encode())
	f.Add(Request{Type: CmdDisc}.Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		if !bytes.Equal(r.Encode(), b[:requestSize]) {
			t.Fatalf("%x decodes to %+v, which encodes differently", b, r)
		}
	})
}

func FuzzDecodeGo(f *testing.F) {
	f.Add([]byte{0, 0, 0, 5, 'r', 'e', 'm', 'u', 's', 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := decodeGo(b)
		if err == nil && 4+len(g.name)+2+2*len(g.infos) != len(b) {
			t.Fatalf("%x: %+v does not account for every byte", b, g)
		}
	})
}

// recordingSink keeps the writes it gets.
type recordingSink struct {
	mu     sync.Mutex
	writes []Write
}

func (s *recordingSink) Write(_ context.Context, w Write) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes = append(s.writes, w)
	return nil
}

// TestServerWithQEMUClient drives the server with QEMU's own NBD client
// (qemu-io): data writes, zero writes, a discard, a flush, and a read that
// a mirror target refuses.
func TestServerWithQEMUClient(t *testing.T) {
	qemuIO, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("needs qemu-io (Debian package qemu-utils; make setup installs it)")
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	sink := &recordingSink{}
	srv := &Server{Size: 8 << 20, Sink: sink}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()

	qio := func(cmds ...string) (string, error) {
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		args = append(args, "nbd+unix:///"+ExportName+"?socket="+sock)
		cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
		defer ccancel()
		out, err := exec.CommandContext(cctx, qemuIO, args...).CombinedOutput()
		return string(out), err
	}
	out, err := qio("write -P 0xab 4096 65536", "write -z 1048576 131072", "discard 2097152 4096", "flush")
	if err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	sink.mu.Lock()
	writes := append([]Write(nil), sink.writes...)
	sink.mu.Unlock()
	if len(writes) != 3 {
		t.Fatalf("sink got %d writes, want 3: %+v\n%s", len(writes), writes, out)
	}
	if w := writes[0]; w.Offset != 4096 || w.Length != 65536 || w.Zero || !bytes.Equal(w.Data, bytes.Repeat([]byte{0xab}, 65536)) {
		t.Errorf("data write: offset %d length %d zero %v", w.Offset, w.Length, w.Zero)
	}
	if w := writes[1]; w.Offset != 1<<20 || w.Length != 128<<10 || !w.Zero {
		t.Errorf("zero write: %+v", w)
	}
	if w := writes[2]; w.Offset != 2<<20 || w.Length != 4096 || !w.Zero {
		t.Errorf("discard: %+v", w)
	}
	if st := srv.Stats(); st.Flushes < 1 || st.Writes != 1 || st.Zeroes != 2 { // qemu-io flushes again on close
		t.Errorf("stats %+v", st)
	}
	// Reads are refused; a second client is served after the first.
	if out, err := qio("read 0 4096"); err == nil && !strings.Contains(out, "Invalid argument") {
		t.Errorf("a read of the mirror target succeeded:\n%s", out)
	}
	// Beyond the export.
	if out, _ := qio("write 8388608 4096"); !strings.Contains(out, "error") && !strings.Contains(out, "out of") && !strings.Contains(out, "beyond") {
		t.Errorf("a write beyond the export was accepted:\n%s", out)
	}
}

// serveRequests runs the transmission phase of s over the requests in in
// and returns the reply error value for each handle, in reply order, and
// what transmit returned.
func serveRequests(t *testing.T, s *Server, in []byte) (errnos map[uint64]uint32, order []uint64, err error) {
	t.Helper()
	var out bytes.Buffer
	err = s.transmit(t.Context(), bufio.NewReader(bytes.NewReader(in)), &out)
	errnos = map[uint64]uint32{}
	for b := out.Bytes(); len(b) > 0; b = b[16:] {
		if len(b) < 16 || binary.BigEndian.Uint32(b) != nbdReplyMagic {
			t.Fatalf("malformed replies: %x", out.Bytes())
		}
		h := binary.BigEndian.Uint64(b[8:])
		errnos[h] = binary.BigEndian.Uint32(b[4:])
		order = append(order, h)
	}
	return errnos, order, err
}

// TestServerRequestsBeyondTheExport: a request reaching past the export's
// end gets the error the NBD spec names (ENOSPC for WRITE and WRITE_ZEROES,
// EINVAL for TRIM and READ) and never reaches the sink; a refused WRITE's
// data is skipped, so the requests after it are served.
func TestServerRequestsBeyondTheExport(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name   string
		req    Request
		errno  uint32
		reachs bool // the sink gets it
	}{
		{"write", Request{Type: CmdWrite, Offset: 0, Length: 512}, 0, true},
		{"write to the end", Request{Type: CmdWrite, Offset: size - 512, Length: 512}, 0, true},
		{"write across the end", Request{Type: CmdWrite, Offset: size - 512, Length: 1024}, nbdENOSPC, false},
		{"write past the end", Request{Type: CmdWrite, Offset: size, Length: 4096}, nbdENOSPC, false},
		{"write far past the end", Request{Type: CmdWrite, Offset: 1 << 62, Length: 1}, nbdENOSPC, false},
		{"write zeroes", Request{Type: CmdWriteZeroes, Offset: 4096, Length: 4096}, 0, true},
		{"write zeroes across the end", Request{Type: CmdWriteZeroes, Offset: size - 4096, Length: 8192}, nbdENOSPC, false},
		{"write zeroes longer than the export", Request{Type: CmdWriteZeroes, Offset: 0, Length: 1<<32 - 1}, nbdENOSPC, false},
		{"trim", Request{Type: CmdTrim, Offset: 0, Length: size}, 0, true},
		{"trim across the end", Request{Type: CmdTrim, Offset: size - 1, Length: 2}, nbdEINVAL, false},
		{"read", Request{Type: CmdRead, Offset: 0, Length: 512}, nbdEINVAL, false},
		{"read past the end", Request{Type: CmdRead, Offset: size, Length: 512}, nbdEINVAL, false},
		{"flush", Request{Type: CmdFlush}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sink := &recordingSink{}
			s := &Server{Size: size, Sink: sink}
			req := tc.req
			req.Handle = 1
			in := req.Encode()
			if req.Type == CmdWrite {
				in = append(in, bytes.Repeat([]byte{0xab}, int(req.Length))...)
			}
			// The next request is read from where the first one ended.
			in = append(in, Request{Type: CmdWrite, Handle: 2, Offset: 8, Length: 3}.Encode()...)
			in = append(in, "abc"...)
			in = append(in, Request{Type: CmdDisc, Handle: 3}.Encode()...)
			errnos, order, err := serveRequests(t, s, in)
			if err != nil {
				t.Fatalf("transmit: %v", err)
			}
			if len(order) != 2 || order[0] != 1 || order[1] != 2 {
				t.Fatalf("replies for handles %v, want [1 2]", order)
			}
			if errnos[1] != tc.errno {
				t.Errorf("reply error %d, want %d", errnos[1], tc.errno)
			}
			if errnos[2] != 0 {
				t.Errorf("the request after it: error %d", errnos[2])
			}
			want := 1
			if tc.reachs {
				want = 2
			}
			if len(sink.writes) != want || sink.writes[len(sink.writes)-1].Offset != 8 || string(sink.writes[len(sink.writes)-1].Data) != "abc" {
				t.Fatalf("sink got %+v", sink.writes)
			}
			if tc.reachs && (sink.writes[0].Offset != req.Offset || uint64(sink.writes[0].Length) != uint64(req.Length)) {
				t.Errorf("sink got %+v, want the request's range", sink.writes[0])
			}
		})
	}
}

// allocated returns how many bytes of heap f allocated.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestServerRefusesWithoutAllocating: a request or option the server
// refuses costs it no buffer of the size the client announced: a WRITE
// longer than MaxRequestLength ends the connection unread, a WRITE past the
// export's end has its data skipped, an option's data is capped.
func TestServerRefusesWithoutAllocating(t *testing.T) {
	const size = 1 << 20
	const budget = 1 << 20 // far below what the requests announce
	payload := make([]byte, MaxRequestLength)
	for _, tc := range []struct {
		name    string
		in      []byte
		handles int    // replies
		errno   uint32 // of the first
		err     error  // from transmit, after its replies
	}{
		{"write longer than MaxRequestLength", Request{Type: CmdWrite, Handle: 1, Length: MaxRequestLength + 1}.Encode(), 0, 0, ErrProtocol},
		{"write of 4 GiB", Request{Type: CmdWrite, Handle: 1, Length: 1<<32 - 1}.Encode(), 0, 0, ErrProtocol},
		{"read longer than MaxRequestLength", Request{Type: CmdRead, Handle: 1, Length: 1<<32 - 1}.Encode(), 0, 0, ErrProtocol},
		{"write of MaxRequestLength past the end", append(append(
			Request{Type: CmdWrite, Handle: 1, Offset: size, Length: MaxRequestLength}.Encode(), payload...),
			Request{Type: CmdDisc}.Encode()...), 1, nbdENOSPC, nil},
		{"zeroes of 4 GiB past the end", append(
			Request{Type: CmdWriteZeroes, Handle: 1, Length: 1<<32 - 1}.Encode(),
			Request{Type: CmdDisc}.Encode()...), 1, nbdENOSPC, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Server{Size: size, Sink: &recordingSink{}}
			r := bufio.NewReader(bytes.NewReader(tc.in))
			var out bytes.Buffer
			out.Grow(1024)
			var err error
			n := allocated(func() { err = s.transmit(t.Context(), r, &out) })
			if n > budget {
				t.Errorf("allocated %d bytes for it", n)
			}
			if (tc.err == nil) != (err == nil) || (tc.err != nil && !errors.Is(err, tc.err)) {
				t.Errorf("transmit: %v, want %v", err, tc.err)
			}
			if out.Len() != 16*tc.handles {
				t.Fatalf("%d bytes of replies, want %d replies", out.Len(), tc.handles)
			}
			if tc.handles > 0 {
				if e := binary.BigEndian.Uint32(out.Bytes()[4:]); e != tc.errno {
					t.Errorf("reply error %d, want %d", e, tc.errno)
				}
			}
		})
	}

	t.Run("option of 1 GiB", func(t *testing.T) {
		in := binary.BigEndian.AppendUint32(nil, nbdFlagCFixed)
		in = binary.BigEndian.AppendUint64(in, nbdOptMagic)
		in = binary.BigEndian.AppendUint32(in, nbdOptGo)
		in = binary.BigEndian.AppendUint32(in, 1<<30)
		s := &Server{Size: size, Sink: &recordingSink{}}
		r := bufio.NewReader(bytes.NewReader(in))
		var err error
		n := allocated(func() { _, err = s.handshake(r, io.Discard) })
		if !errors.Is(err, ErrProtocol) {
			t.Errorf("handshake: %v, want ErrProtocol", err)
		}
		if n > budget {
			t.Errorf("allocated %d bytes for it", n)
		}
	})
}

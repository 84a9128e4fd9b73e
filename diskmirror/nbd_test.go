package diskmirror

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os/exec"
	"path/filepath"
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

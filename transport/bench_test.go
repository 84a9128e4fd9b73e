package transport

import (
	"context"
	"encoding/binary"
	"hash/crc32"
	"io"
	"net"
	"testing"
)

// fullRAMPages is a RAMPages message of MaxPagesPerFrame pages.
func fullRAMPages() RAMPages {
	return RAMPages{Pages: pages(1<<20, 1, MaxPagesPerFrame, 0x3c)}
}

func BenchmarkEncodeRAMPages(b *testing.B) {
	m := fullRAMPages()
	var payload, frame []byte
	var err error
	b.SetBytes(Overhead + 2 + MaxPagesPerFrame*(8+PageSize))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		payload, err = m.AppendPayload(payload[:0])
		if err != nil {
			b.Fatal(err)
		}
		frame = AppendFrame(frame[:0], Frame{Type: TypeRAMPages, Epoch: 7, Seq: uint64(i + 1), Payload: payload})
	}
	if len(frame) != Overhead+2+MaxPagesPerFrame*(8+PageSize) {
		b.Fatalf("frame is %d bytes", len(frame))
	}
}

// repeater serves one frame over and over, giving each copy the next seq.
type repeater struct {
	frame []byte
	seq   uint64
	pos   int
}

func (r *repeater) Read(p []byte) (int, error) {
	if r.pos == len(r.frame) {
		r.pos = 0
	}
	if r.pos == 0 {
		r.seq++
		binary.BigEndian.PutUint64(r.frame[offSeq:], r.seq)
		binary.BigEndian.PutUint32(r.frame[offHeaderCRC:], crc32.Checksum(r.frame[:offHeaderCRC], castagnoli))
	}
	n := copy(p, r.frame[r.pos:])
	r.pos += n
	return n, nil
}

func BenchmarkDecodeRAMPages(b *testing.B) {
	raw := encodeFrames(mustFrame(b, 7, 1, fullRAMPages()))
	r := NewReader(&repeater{frame: raw})
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		f, err := r.Next()
		if err != nil {
			b.Fatal(err)
		}
		m, err := DecodeRAMPages(f.Payload)
		if err != nil || len(m.Pages) != MaxPagesPerFrame {
			b.Fatal(err)
		}
	}
}

// BenchmarkStage stages and commits epochs of one full RAMPages frame: the
// backup's verification cost per page byte.
func BenchmarkStage(b *testing.B) {
	m := fullRAMPages()
	var d Digest
	d.AddPages(m)
	c := d.Commit()
	s, err := NewStage(8<<30, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(MaxPagesPerFrame * PageSize)
	b.ReportAllocs()
	for epoch := uint64(1); b.Loop(); epoch++ {
		if err := s.AddPages(epoch, m); err != nil {
			b.Fatal(err)
		}
		if _, err := s.Commit(epoch, c); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkConnTCP sends full RAMPages frames over loopback TCP.
func BenchmarkConnTCP(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Skipf("no loopback TCP: %v", err)
	}
	defer ln.Close()
	f := mustFrame(b, 7, 0, fullRAMPages())
	done := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		c := NewConn(nc)
		defer c.Close()
		for {
			if _, err := c.Recv(context.Background()); err != nil {
				if err == io.EOF {
					err = nil
				}
				done <- err
				return
			}
		}
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	c := NewConn(nc)
	ctx := context.Background()
	b.SetBytes(int64(Overhead + len(f.Payload)))
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Send(ctx, f); err != nil {
			b.Fatal(err)
		}
	}
	c.Close()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

package lab

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/transport"
)

// throughProxy sends heartbeats and RAM frames of the given epochs through a
// LinkProxy set up by arm, and returns what the far side read: the
// epochs of the RAM frames in order (heartbeats are left out), and the
// reader's error if it stopped on one.
func throughProxy(t *testing.T, arm func(*LinkProxy), epochs ...uint64) ([]uint64, error, *LinkProxy) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		epochs []uint64
		err    error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		var r result
		rd := transport.NewReader(c)
		for {
			f, err := rd.Next()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					r.err = err
				}
				got <- r
				return
			}
			if f.Type == transport.TypeRAMPages {
				r.epochs = append(r.epochs, f.Epoch)
			}
		}
	}()
	p, err := NewLinkProxy("127.0.0.1:0", ln.Addr().String(), 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	arm(p)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	page := bytes.Repeat([]byte{7}, transport.PageSize)
	var seq uint64
write:
	for _, e := range epochs {
		for _, m := range []transport.Message{transport.Heartbeat{LastCommitted: e}, transport.RAMPages{Pages: []transport.Page{{Index: e, Data: page}}}} {
			f, err := transport.NewFrame(e, m)
			if err != nil {
				t.Fatal(err)
			}
			seq++
			f.Seq = seq
			if _, err := c.Write(transport.AppendFrame(nil, f)); err != nil {
				// The far side stopped at a damaged frame and hung up,
				// and the proxy with it: what it read says the rest.
				break write
			}
		}
	}
	c.(*net.TCPConn).CloseWrite()
	select {
	case r := <-got:
		c.Close()
		return r.epochs, r.err, p
	case <-time.After(10 * time.Second):
		t.Fatal("the far side read nothing to the end")
	}
	return nil, nil, nil
}

func TestLinkProxy(t *testing.T) {
	t.Run("relays in order", func(t *testing.T) {
		got, err, p := throughProxy(t, func(*LinkProxy) {}, 1, 2, 3)
		if err != nil || len(got) != 3 || got[0] != 1 || got[2] != 3 || p.Connections() != 1 {
			t.Fatalf("got %v, %v, %d connections", got, err, p.Connections())
		}
	})
	// The far side's reader checks sequence numbers, as the agents' do: a
	// dropped or repeated frame stops it there.
	t.Run("drop", func(t *testing.T) {
		got, err, p := throughProxy(t, func(p *LinkProxy) { p.Damage(Drop) }, 1, 2, 3)
		if err == nil || !strings.Contains(err.Error(), "seq skips") || len(got) != 0 {
			t.Fatalf("got %v, %v: want epoch 1's RAM frame gone, and the reader stopped at the gap", got, err)
		}
		if d := p.Damaged(); len(d) != 1 || d[0] != "drop RAMPages of epoch 1" {
			t.Fatalf("damaged %q", d)
		}
	})
	t.Run("duplicate", func(t *testing.T) {
		got, err, _ := throughProxy(t, func(p *LinkProxy) { p.Damage(Duplicate) }, 1, 2)
		if err == nil || !strings.Contains(err.Error(), "seq repeats") || len(got) != 1 || got[0] != 1 {
			t.Fatalf("got %v, %v: want epoch 1's RAM frame once, and the reader stopped at its copy", got, err)
		}
	})
	t.Run("corrupt", func(t *testing.T) {
		got, err, _ := throughProxy(t, func(p *LinkProxy) { p.Damage(Corrupt) }, 1, 2)
		if err == nil || len(got) != 0 {
			t.Fatalf("got %v, %v: want the reader to fail on the damaged frame", got, err)
		}
	})
	t.Run("latency and stalls", func(t *testing.T) {
		start := time.Now()
		got, err, _ := throughProxy(t, func(p *LinkProxy) { p.Lossy(20*time.Millisecond, 1, 30*time.Millisecond) }, 1, 2, 3)
		// Every frame waits its 20 ms and a 30 ms stall, pipelined, in order.
		if took := time.Since(start); err != nil || len(got) != 3 || got[0] != 1 || got[2] != 3 || took < 50*time.Millisecond {
			t.Fatalf("got %v, %v in %v", got, err, took)
		}
	})
	t.Run("bandwidth", func(t *testing.T) {
		start := time.Now()
		got, err, _ := throughProxy(t, func(p *LinkProxy) { p.Limit(64 << 10) }, 1, 2, 3, 4)
		// Four pages and some headers at 64 KiB/s: a quarter second.
		if took := time.Since(start); err != nil || len(got) != 4 || took < 200*time.Millisecond {
			t.Fatalf("got %v, %v in %v", got, err, took)
		}
	})
}

package lab

import (
	"io"
	"net"
	"sync"
)

// Link is a TCP forwarder standing for a network path between two hosts
// (an agent and its peer or the witness), which a test can cut as a
// partition does: while cut, bytes are dropped in both directions and new
// connections are accepted but never connected, so that both ends see
// silence (timeouts), not resets. Heal drops what was cut (the ends see
// their connections fail only on their own timeouts) and lets new
// connections through again.
type Link struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
}

// NewLink listens on loopback and forwards to target. Close with Close.
func NewLink(target string) (*Link, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	k := &Link{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	go k.serve()
	return k, nil
}

// Addr is where to connect instead of the target.
func (k *Link) Addr() string { return k.ln.Addr().String() }

// URL is Addr as an http:// URL (for an etcd endpoint).
func (k *Link) URL() string { return "http://" + k.Addr() }

// Cut partitions the path.
func (k *Link) Cut() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cut = true
}

// Heal ends the partition: connections made or cut meanwhile are closed
// (their peers long gave up on them), new ones are forwarded.
func (k *Link) Heal() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cut = false
	for c := range k.conns {
		c.Close()
	}
	clear(k.conns)
}

// Close stops forwarding and closes every connection.
func (k *Link) Close() error {
	err := k.ln.Close()
	k.Heal()
	return err
}

func (k *Link) track(c net.Conn) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.conns[c] = struct{}{}
}

func (k *Link) isCut() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.cut
}

func (k *Link) serve() {
	for {
		a, err := k.ln.Accept()
		if err != nil {
			return
		}
		k.track(a)
		if k.isCut() {
			go io.Copy(io.Discard, a) // a black hole
			continue
		}
		b, err := net.Dial("tcp", k.target)
		if err != nil {
			a.Close()
			continue
		}
		k.track(b)
		go k.pipe(a, b)
		go k.pipe(b, a)
	}
}

// pipe copies from src to dst until either fails, dropping what arrives
// while the link is cut.
func (k *Link) pipe(src, dst net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !k.isCut() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !k.isCut() {
				dst.Close()
			}
			return
		}
	}
}

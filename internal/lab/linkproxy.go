package lab

import (
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/remus-kvm/remus/transport"
)

// LinkProxy sits on the agents' link (ProtectOptions.Via) and relays it
// frame by frame, each direction in order, with faults a test turns on and
// off while the agents run: latency, stalls like those of lost packets, a
// bandwidth limit, and one-shot damage to the next RAM frame from the
// primary (a flipped byte, the frame dropped, the frame sent twice). The
// host kernel has no netem; this is its userspace stand-in, at the level
// of whole frames.
type LinkProxy struct {
	ln     net.Listener
	target string

	mu       sync.Mutex
	latency  time.Duration // added to every frame, pipelined
	stallP   float64       // chance per frame of a stall of stall
	stall    time.Duration
	rate     float64 // bytes per second each way, 0: unlimited
	damage   FrameDamage
	damaged  []string // what was done, for the log
	conns    []net.Conn
	accepted int
	closed   bool
	rng      *rand.Rand
}

// FrameDamage is a one-shot fault on the next RAM frame from the primary.
type FrameDamage int

const (
	NoDamage  FrameDamage = iota
	Corrupt               // one payload byte flipped: the checksum fails
	Drop                  // the frame never arrives: the sequence check fails
	Duplicate             // the frame arrives twice: the sequence check fails
)

func (d FrameDamage) String() string {
	return [...]string{"none", "corrupt", "drop", "duplicate"}[d]
}

// NewLinkProxy listens on addr (host:0 for any port) and relays each
// connection to target. seed makes its random stalls replayable.
func NewLinkProxy(addr, target string, seed uint64) (*LinkProxy, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	p := &LinkProxy{ln: ln, target: target, rng: rand.New(rand.NewPCG(seed, 0x11c))}
	go p.serve()
	return p, nil
}

// Addr is where the primary connects.
func (p *LinkProxy) Addr() string { return p.ln.Addr().String() }

// Lossy adds latency to every frame and, with chance stallP per frame, a
// stall of stall (as a lost segment's retransmission would); zero values
// heal the link.
func (p *LinkProxy) Lossy(latency time.Duration, stallP float64, stall time.Duration) {
	p.mu.Lock()
	p.latency, p.stallP, p.stall = latency, stallP, stall
	p.mu.Unlock()
}

// Limit caps each direction at bytesPerSec (0: unlimited).
func (p *LinkProxy) Limit(bytesPerSec float64) {
	p.mu.Lock()
	p.rate = bytesPerSec
	p.mu.Unlock()
}

// Damage arms d for the next RAM frame from the primary.
func (p *LinkProxy) Damage(d FrameDamage) {
	p.mu.Lock()
	p.damage = d
	p.mu.Unlock()
}

// Damaged lists the damage done so far ("corrupt epoch 12", ...).
func (p *LinkProxy) Damaged() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.damaged...)
}

// Connections is how many connections the proxy relayed so far.
func (p *LinkProxy) Connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// Close stops accepting and cuts every relayed connection.
func (p *LinkProxy) Close() {
	p.mu.Lock()
	p.closed = true
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	p.ln.Close()
	for _, c := range conns {
		c.Close()
	}
}

func (p *LinkProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			b.Close()
			return
		}
		p.conns = append(p.conns, c, b)
		p.accepted++
		p.mu.Unlock()
		go p.relay(c, b, true)
		go p.relay(b, c, false)
	}
}

// relay copies frames from src to dst until either fails, then closes
// both. A reader goroutine stamps each frame with the time it may leave
// (latency, stalls) so that latency does not cut throughput.
func (p *LinkProxy) relay(src, dst net.Conn, fromPrimary bool) {
	type due struct {
		at  time.Time
		buf []byte
	}
	q := make(chan due, 4096)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		defer close(q)
		r := transport.NewReader(src)
		for {
			f, err := r.Next()
			if err != nil {
				return
			}
			buf := transport.AppendFrame(nil, f)
			p.mu.Lock()
			at := time.Now().Add(p.latency)
			if p.stallP > 0 && p.rng.Float64() < p.stallP {
				at = at.Add(p.stall)
			}
			copies := 1
			if fromPrimary && p.damage != NoDamage && (f.Type == transport.TypeRAMPages || f.Type == transport.TypeRAMDelta) {
				switch p.damage {
				case Corrupt:
					buf[transport.HeaderSize+len(f.Payload)/2] ^= 0x10
				case Drop:
					copies = 0
				case Duplicate:
					copies = 2
				}
				p.damaged = append(p.damaged, fmt.Sprintf("%s %s of epoch %d", p.damage, f.Type, f.Epoch))
				p.damage = NoDamage
			}
			p.mu.Unlock()
			for range copies {
				select {
				case q <- due{at, buf}:
				case <-stop:
					return
				}
			}
		}
	}()
	defer src.Close()
	defer dst.Close()
	var last time.Time // when the previous frame left: stalls hold later ones too
	for d := range q {
		if d.at.Before(last) {
			d.at = last
		}
		time.Sleep(time.Until(d.at))
		if _, err := dst.Write(d.buf); err != nil {
			return
		}
		last = time.Now()
		p.mu.Lock()
		rate := p.rate
		p.mu.Unlock()
		if rate > 0 {
			pace := time.Duration(float64(len(d.buf)) / rate * float64(time.Second))
			time.Sleep(pace)
			last = time.Now()
		}
	}
}

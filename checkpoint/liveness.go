package checkpoint

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/transport"
)

// liveness runs the failure detector and the heartbeats of one session
// beside the epoch loop, so that a long pause, a big first epoch or a slow
// apply never starves either: frames are marked heard as they come off the
// link, heartbeats leave on their own goroutine, and the verdict arrives on
// a channel.
type liveness struct {
	mu        sync.Mutex
	det       *failover.Detector
	dead      chan struct{} // closed once the peer is declared dead
	deadAt    time.Time
	lastHeard time.Time
	silence   time.Duration

	committed atomic.Uint64 // reported in heartbeats
}

func startLiveness(ctx context.Context, cfg failover.DetectorConfig, link Link) *liveness {
	det, _ := failover.NewDetector(cfg, time.Now())
	l := &liveness{det: det, dead: make(chan struct{})}
	send := make(chan struct{}, 1)
	go func() { // the sender: a stalled link blocks only this goroutine
		for {
			select {
			case <-ctx.Done():
				return
			case <-send:
			}
			sendMessage(ctx, link, 0, transport.Heartbeat{SentUnixNano: time.Now().UnixNano(), LastCommitted: l.committed.Load()})
		}
	}()
	go func() {
		t := time.NewTicker(cfg.Interval / 4)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				l.mu.Lock()
				v := l.det.Tick(now)
				if v.SendHeartbeat {
					l.det.Sent(now)
				}
				if v.PeerDead {
					l.deadAt, l.lastHeard, l.silence = now, l.det.LastHeard(), v.Silence
				}
				l.mu.Unlock()
				if v.PeerDead {
					close(l.dead)
					return
				}
				if v.SendHeartbeat {
					select {
					case send <- struct{}{}:
					default:
					}
				}
			}
		}
	}()
	return l
}

// heard records a frame from the peer.
func (l *liveness) heard() {
	l.mu.Lock()
	l.det.Heard(time.Now())
	l.mu.Unlock()
}

// verdict is when the peer was last heard, when it was declared dead and
// how long it had been silent; valid once dead is closed.
func (l *liveness) verdict() (lastHeard, deadAt time.Time, silence time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastHeard, l.deadAt, l.silence
}

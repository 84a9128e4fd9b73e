package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"
)

// Event is an asynchronous QMP event, such as STOP, RESUME, SHUTDOWN,
// BLOCK_JOB_READY or MIGRATION.
type Event struct {
	// Name is the event name, for example "STOP".
	Name string
	// Data is the event's "data" member, nil when it has none. It is shared
	// by all subscribers and must not be modified.
	Data json.RawMessage
	// Time is when QEMU emitted the event (its "timestamp"); the zero Time
	// if it carried none.
	Time time.Time
}

// DecodeData unmarshals the event's data into v.
func (e Event) DecodeData(v any) error {
	if len(e.Data) == 0 {
		return fmt.Errorf("qmp: event %s: no data", e.Name)
	}
	if err := json.Unmarshal(e.Data, v); err != nil {
		return fmt.Errorf("qmp: event %s: decode data: %w", e.Name, err)
	}
	return nil
}

// errSubscriptionClosed is what Wait reports on a subscription that its
// owner closed.
var errSubscriptionClosed = errors.New("subscription closed")

// Subscription receives the events a Client reads, in order. Each
// subscription has its own bounded buffer: when a consumer falls behind,
// further events to it are dropped (and counted and logged), so a slow
// consumer never delays command replies or other subscribers.
type Subscription struct {
	c       *Client
	names   map[string]struct{} // nil: every event
	ch      chan Event
	dropped atomic.Uint64
	closed  error // why ch was closed; guarded by c.subMu
}

// Subscribe starts delivering events named in names (every event when names
// is empty) to a new subscription. Events read before Subscribe returns are
// not delivered, so subscribe before running the command whose event you
// want:
//
//	sub := c.Subscribe("STOP")
//	defer sub.Close()
//	if err := c.Execute(ctx, "stop", nil, nil); err != nil { ... }
//	ev, err := sub.Wait(ctx, nil)
//
// On a closed client the subscription's channel is closed at once.
func (c *Client) Subscribe(names ...string) *Subscription {
	s := &Subscription{c: c, ch: make(chan Event, c.opts.eventBuffer)}
	if len(names) > 0 {
		s.names = make(map[string]struct{}, len(names))
		for _, n := range names {
			s.names[n] = struct{}{}
		}
	}
	c.subMu.Lock()
	defer c.subMu.Unlock()
	if c.subsClosed {
		s.closed = c.closeCause()
		close(s.ch)
		return s
	}
	c.subs[s] = struct{}{}
	return s
}

// Events returns the channel on which events arrive. It is closed when the
// subscription or the client is closed.
func (s *Subscription) Events() <-chan Event { return s.ch }

// Dropped returns how many events this subscription has dropped because its
// buffer was full.
func (s *Subscription) Dropped() uint64 { return s.dropped.Load() }

// Close stops delivery and closes the Events channel. It is idempotent.
func (s *Subscription) Close() {
	s.c.subMu.Lock()
	defer s.c.subMu.Unlock()
	if _, ok := s.c.subs[s]; ok {
		delete(s.c.subs, s)
		s.closed = errSubscriptionClosed
		close(s.ch)
	}
}

// Wait returns the next event of this subscription for which match returns
// true (the next event at all when match is nil); events that do not match
// are consumed and skipped. It fails when ctx ends, wrapping ctx.Err(), or
// when the subscription or the client is closed (wrapping ErrClosed in the
// latter case).
func (s *Subscription) Wait(ctx context.Context, match func(Event) bool) (Event, error) {
	for {
		select {
		case ev, ok := <-s.ch:
			if !ok {
				s.c.subMu.Lock()
				why := s.closed
				s.c.subMu.Unlock()
				return Event{}, fmt.Errorf("qmp: wait for %s: %w", s.what(), why)
			}
			if match == nil || match(ev) {
				return ev, nil
			}
		case <-ctx.Done():
			return Event{}, fmt.Errorf("qmp: wait for %s: %w", s.what(), ctx.Err())
		}
	}
}

// what names the events s waits for, for error messages.
func (s *Subscription) what() string {
	if len(s.names) == 0 {
		return "event"
	}
	names := make([]string, 0, len(s.names))
	for n := range s.names {
		names = append(names, n)
	}
	if len(names) > 1 {
		slices.Sort(names)
	}
	return strings.Join(names, "|")
}

func (s *Subscription) wants(name string) bool {
	if s.names == nil {
		return true
	}
	_, ok := s.names[name]
	return ok
}

// Dropped returns how many events all subscriptions of c together have
// dropped because their buffers were full.
func (c *Client) Dropped() uint64 { return c.dropped.Load() }

// publish hands ev to every subscription that wants it, without blocking.
// Drops are logged at Warn on the 1st, 2nd, 4th, 8th... drop of each
// subscription, so a stuck consumer cannot flood the log.
func (c *Client) publish(ev Event) {
	type drop struct {
		n   uint64
		buf int
	}
	var drops []drop
	c.subMu.Lock()
	for s := range c.subs {
		if !s.wants(ev.Name) {
			continue
		}
		select {
		case s.ch <- ev:
		default:
			n := s.dropped.Add(1)
			c.dropped.Add(1)
			if n&(n-1) == 0 {
				drops = append(drops, drop{n, cap(s.ch)})
			}
		}
	}
	c.subMu.Unlock()
	for _, d := range drops {
		c.log.Warn("qmp: event subscriber is not keeping up, dropping events",
			"event", ev.Name, "dropped", d.n, "buffer", d.buf)
	}
}

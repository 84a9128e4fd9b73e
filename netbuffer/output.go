package netbuffer

import (
	"fmt"
	"slices"
	"time"

	"github.com/remus-kvm/remus/internal/stats"
)

// Mode says what a Relay does with the guest's outbound frames.
type Mode int

const (
	// PassThrough sends every outbound frame on at once: the guest is not
	// protected (no backup yet, or the backup was lost), and the Relay says
	// so in its Status.
	PassThrough Mode = iota
	// Holding keeps each outbound frame until the epoch during which the
	// guest sent it is committed on the backup.
	Holding
)

// String returns "pass-through" or "holding".
func (m Mode) String() string {
	switch m {
	case PassThrough:
		return "pass-through"
	case Holding:
		return "holding"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// DefaultHoldCap is the default bound on the bytes of outbound frames a
// Relay holds: at 25 ms epochs and two epochs in flight, enough for a guest
// sending at well over 1 Gbit/s.
const DefaultHoldCap = 16 << 20

// heldFrame is an outbound frame and when the Relay read it.
type heldFrame struct {
	data []byte
	at   time.Time
}

// closedEpoch is the frames the guest sent during one epoch, before its
// pause.
type closedEpoch struct {
	epoch  uint64
	frames []heldFrame
}

// Release describes the frames one commit let out.
type Release struct {
	Epoch  uint64
	Frames int
	Bytes  int64
	// WaitP50 and WaitP99 are the median and 99th percentile of the time
	// the released frames spent held, from the Relay reading them from the
	// guest to their epoch's commit.
	WaitP50, WaitP99 time.Duration
}

// outQueue is the outbound side's bookkeeping, without I/O or locking (the
// Relay holds its lock around every call): frames of the open epoch, the
// epochs cut but not committed, and frames released for the writer.
type outQueue struct {
	mode  Mode
	open  []heldFrame   // read since the last cut
	cut   []closedEpoch // cut, waiting for their commit, in epoch order
	ready []heldFrame   // released, not yet written to the host side

	bytes int64 // in open, cut and ready
	peak  int64 // the most bytes ever in the queue
	cap   int64
}

// add queues a frame read at time at; in PassThrough it is ready at once.
func (q *outQueue) add(frame []byte, at time.Time) {
	f := heldFrame{data: frame, at: at}
	if q.mode == PassThrough {
		q.ready = append(q.ready, f)
	} else {
		q.open = append(q.open, f)
	}
	q.bytes += int64(len(frame))
	q.peak = max(q.peak, q.bytes)
}

// full reports whether the guest must wait before more is read from it.
// Only held frames count: in PassThrough the writer drains the queue as
// fast as the host side takes frames.
func (q *outQueue) full() bool { return q.mode == Holding && q.bytes >= q.cap }

// hold starts holding: frames added from now on wait for a commit. Epochs
// are numbered afresh (a new protection session starts at 1).
func (q *outQueue) hold() { q.mode = Holding }

// closeEpoch gives the frames added since the last cut to epoch, which must
// be above every epoch cut before. In PassThrough it does nothing.
func (q *outQueue) closeEpoch(epoch uint64) error {
	if q.mode != Holding {
		return nil
	}
	if n := len(q.cut); n > 0 && q.cut[n-1].epoch >= epoch {
		return fmt.Errorf("netbuffer: cut epoch %d after epoch %d", epoch, q.cut[n-1].epoch)
	}
	q.cut = append(q.cut, closedEpoch{epoch: epoch, frames: q.open})
	q.open = nil
	return nil
}

// commit releases, in order, the frames of every cut epoch up to and
// including epoch, measuring their waits against now.
func (q *outQueue) commit(epoch uint64, now time.Time) Release {
	r := Release{Epoch: epoch}
	var waits []time.Duration
	i := 0
	for ; i < len(q.cut) && q.cut[i].epoch <= epoch; i++ {
		for _, f := range q.cut[i].frames {
			waits = append(waits, now.Sub(f.at))
			r.Bytes += int64(len(f.data))
		}
		q.ready = append(q.ready, q.cut[i].frames...)
	}
	q.cut = slices.Delete(q.cut, 0, i)
	r.Frames = len(waits)
	r.WaitP50, r.WaitP99 = stats.Quantile(waits, 0.5), stats.Quantile(waits, 0.99)
	return r
}

// passThrough releases everything held, cut epochs first, and stops
// holding. It returns how many frames it released.
func (q *outQueue) passThrough() int {
	n := len(q.open)
	for _, e := range q.cut {
		q.ready = append(q.ready, e.frames...)
		n += len(e.frames)
	}
	q.ready = append(q.ready, q.open...)
	q.cut, q.open = nil, nil
	q.mode = PassThrough
	return n
}

// take removes and returns the frames ready for the host side.
func (q *outQueue) take() []heldFrame {
	r := q.ready
	q.ready = nil
	return r
}

// written accounts for n bytes the writer delivered.
func (q *outQueue) written(n int64) { q.bytes -= n }

// held returns the frames and bytes waiting for a commit.
func (q *outQueue) held() (frames int, bytes int64) {
	for _, f := range q.open {
		bytes += int64(len(f.data))
	}
	frames = len(q.open)
	for _, e := range q.cut {
		frames += len(e.frames)
		for _, f := range e.frames {
			bytes += int64(len(f.data))
		}
	}
	return frames, bytes
}

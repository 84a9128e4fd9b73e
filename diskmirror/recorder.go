package diskmirror

import (
	"context"
	"fmt"
	"sync"

	"github.com/remus-kvm/remus/transport"
)

// DefaultEpochWriteCap bounds the bytes of writes a Recorder holds for the
// open epoch; at the cap the next write waits for the epoch's cut (the
// guest's I/O slows down instead of memory growing).
const DefaultEpochWriteCap = 256 << 20

// DefaultEpochWrites bounds how many write messages (DiskWrites, after
// splitting) a Recorder holds for the open epoch; at the cap the next
// write waits for the epoch's cut. It matters for zero writes and discards,
// which the byte cap does not count; it is a quarter of the backup
// journal's DefaultJournalWrites, so an epoch cut here always fits there.
const DefaultEpochWrites = 1 << 18

// Recorder is the primary's Sink. During the initial copy (Direct) each
// write is sent at once, as epoch 0; once the mirror is in step (Record),
// writes are kept for the open epoch until the checkpoint loop takes them
// at the epoch's pause (Cut). Outside a protection session (Off) writes
// are dropped: the next session copies the whole disk again.
type Recorder struct {
	Cap       int64 // DefaultEpochWriteCap when 0
	MaxWrites int   // DefaultEpochWrites when 0

	mu        sync.Mutex
	changed   *sync.Cond
	mode      recMode
	send      func(context.Context, transport.DiskWrite) error
	open      []transport.DiskWrite
	openBytes int64
	// cutting: a pause is coming; writes go into the open epoch whatever
	// its caps, since the pause waits for them.
	cutting bool
	direct  DirectStats
}

type recMode int

const (
	recOff recMode = iota
	recDirect
	recRecording
)

// DirectStats counts the initial copy.
type DirectStats struct {
	Writes int
	Bytes  uint64 // data and zeroes
}

// NewRecorder returns a Recorder that is Off.
func NewRecorder() *Recorder {
	r := &Recorder{}
	r.changed = sync.NewCond(&r.mu)
	return r
}

// Direct starts a session's initial copy: writes go to send at once.
func (r *Recorder) Direct(send func(context.Context, transport.DiskWrite) error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mode, r.send, r.direct = recDirect, send, DirectStats{}
	r.dropOpen()
}

// Record starts keeping writes per epoch: those from now on belong to the
// session's first epoch, until its Cut.
func (r *Recorder) Record() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mode = recRecording
	r.dropOpen()
}

// Off ends the session: held writes are dropped and later ones ignored.
func (r *Recorder) Off() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mode, r.send = recOff, nil
	r.dropOpen()
}

// DirectStats returns what the initial copy sent so far.
func (r *Recorder) DirectStats() DirectStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.direct
}

func (r *Recorder) dropOpen() {
	r.open, r.openBytes = nil, 0
	r.changed.Broadcast()
}

// BeginCut lets every write in, over the epoch's caps, until the next Cut.
// Call it just before pausing the guest: QMP stop waits for the guest's
// I/O to complete, and a write waiting here for the cut would wait for the
// stop in turn. The overshoot is what the guest has in flight (bounded by
// the mirror job's buffer).
func (r *Recorder) BeginCut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cutting = true
	r.changed.Broadcast()
}

// Cut takes the writes of the epoch being closed: everything received
// since the last Cut. Call it with the guest paused (QMP stop drained the
// guest's I/O, so every write of the epoch was received).
func (r *Recorder) Cut() []transport.DiskWrite {
	r.mu.Lock()
	defer r.mu.Unlock()
	ws := r.open
	r.cutting = false
	r.dropOpen()
	return ws
}

// Write implements Sink.
func (r *Recorder) Write(ctx context.Context, w Write) error {
	msgs := split(w)
	r.mu.Lock()
	switch r.mode {
	case recOff:
		r.mu.Unlock()
		return nil
	case recDirect:
		send := r.send
		r.direct.Writes++
		r.direct.Bytes += uint64(w.Length)
		r.mu.Unlock()
		for _, m := range msgs {
			if err := send(ctx, m); err != nil {
				return fmt.Errorf("diskmirror: send write at %d to the backup: %w", m.Offset, err)
			}
		}
		return nil
	}
	defer r.mu.Unlock()
	limit := r.Cap
	if limit <= 0 {
		limit = DefaultEpochWriteCap
	}
	maxWrites := r.MaxWrites
	if maxWrites <= 0 {
		maxWrites = DefaultEpochWrites
	}
	stop := context.AfterFunc(ctx, func() {
		r.mu.Lock()
		r.changed.Broadcast()
		r.mu.Unlock()
	})
	defer stop()
	for r.mode == recRecording && len(r.open) > 0 && !r.cutting &&
		(r.openBytes+int64(len(w.Data)) > limit || len(r.open)+len(msgs) > maxWrites) {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("diskmirror: waiting for the epoch's cut: %w", err)
		}
		r.changed.Wait()
	}
	if r.mode != recRecording {
		return nil // the session ended meanwhile
	}
	r.open = append(r.open, msgs...)
	r.openBytes += int64(len(w.Data))
	return nil
}

// split turns a write into DiskWrite messages within the frame limits.
func split(w Write) []transport.DiskWrite {
	if !w.Zero {
		return transport.ChunkDiskWrite(w.Offset, w.Data)
	}
	var out []transport.DiskWrite
	for off, left := w.Offset, uint64(w.Length); left > 0; {
		n := min(left, transport.MaxZeroLength)
		out = append(out, transport.DiskWrite{Offset: off, Length: uint32(n), Flags: transport.DiskZero})
		off += n
		left -= n
	}
	return out
}

package agent

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/transport"
)

// The backup's states, as BackupStatus.State says them.
const (
	BackupWaiting        = "waiting"
	BackupStandby        = "standby"
	BackupFailingOver    = "failing-over"
	BackupFailedOver     = "failed-over"
	BackupFailoverFailed = "failover-failed"
)

// backupState follows the backup agent for its status: the sessions'
// hellos, commits and goodbyes as its connections carry them, the epochs
// applied, the failover. It is safe for concurrent use.
type backupState struct {
	vm string

	mu      sync.Mutex
	state   string
	why     string
	epoch   uint64 // the newest epoch committed
	at      time.Time
	primary string // the current or last session's primary
	session *primaryLink
	report  *FailoverReport
	// resuming: the failover began (the primary is gone for good).
	resuming bool

	// commitFrom is the connection the newest Commit frame came on: the
	// session whose epoch is applied next.
	commitFrom atomic.Pointer[primaryLink]
}

func newBackupState(vm string) *backupState {
	return &backupState{vm: vm, state: BackupWaiting, why: "no epoch committed yet: waiting for a primary's first epoch"}
}

// before is true until the guest is being resumed here: the sessions'
// events move the state (a primary heard again while the backup fenced
// or claimed the witness starts a new session).
func (b *backupState) before() bool { return !b.resuming }

// hello notes a primary's hello on l: a new session replaces whatever
// the backup held.
func (b *backupState) hello(l *primaryLink) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.primary, b.session = l.addr, l
	if b.before() {
		b.state, b.why = BackupWaiting, "the primary at "+l.addr+" started a session: nothing is resumable before its first epoch commits"
	}
}

// goodbye notes the primary's goodbye on l: it ended its session, and the
// backup will not resume the guest.
func (b *backupState) goodbye(l *primaryLink) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l.ended.Store(true)
	if b.session == l && b.before() {
		b.state, b.why = BackupWaiting, "the primary at "+l.addr+" ended its session (goodbye): nothing to resume until a new session commits an epoch"
	}
}

// committed notes epoch applied at t, before its acknowledgement.
func (b *backupState) committed(epoch uint64, t time.Time) {
	l := b.commitFrom.Load()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.epoch, b.at = epoch, t
	if l != nil {
		if l.ended.Load() {
			return // the session ended after it sent this epoch
		}
		b.primary, b.session = l.addr, l
	}
	if b.before() {
		b.state, b.why = BackupStandby, "holds a committed epoch: the guest resumes here from it if the primary is lost"
	}
}

// clearing notes that the primary went silent and the backup makes sure
// it runs no more (what: fencing its host, claiming the witness) before
// it resumes the guest.
func (b *backupState) clearing(what string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.before() {
		b.state, b.why = BackupFailingOver, "the primary went silent: "+what+" before resuming the guest here"
	}
}

// failingOver notes the failover's start: the guest is being resumed here.
func (b *backupState) failingOver(lost *checkpoint.PrimaryLost) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.resuming = true
	b.state, b.why = BackupFailingOver, fmt.Sprintf("primary lost (%v): resuming epoch %d here", lost.Cause, lost.Committed.Epoch)
}

// failedOver notes how the failover ended: its report, and err when the
// guest could not be resumed.
func (b *backupState) failedOver(r *FailoverReport, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.report = r
	if err != nil {
		b.state, b.why = BackupFailoverFailed, "the failover failed: "+err.Error()
		return
	}
	b.state, b.why = BackupFailedOver, "the guest runs here"
}

// status is the backup's status now.
func (b *backupState) status() BackupStatus {
	b.mu.Lock()
	defer b.mu.Unlock()
	return BackupStatus{VM: b.vm, Role: "backup", State: b.state, Why: b.why, CommittedEpoch: b.epoch, CommittedAt: b.at,
		Primary: b.primary, Failover: b.report}
}

// fence wraps a fence function to note its runs.
func (b *backupState) fence(f func(context.Context, string) error) func(context.Context, string) error {
	return func(ctx context.Context, primary string) error {
		b.clearing("fencing the primary's host " + primary)
		return f(ctx, primary)
	}
}

// claim wraps a witness claim to note its runs.
func (b *backupState) claim(f func(context.Context) (bool, error)) func(context.Context) (bool, error) {
	return func(ctx context.Context) (bool, error) {
		b.clearing("claiming the witness")
		return f(ctx)
	}
}

// primaryLink is a connection from a primary that tells the backup's
// status what the primary says on it: its hello, its epochs' commits, its
// goodbye.
type primaryLink struct {
	*transport.Conn
	addr  string
	st    *backupState
	ended atomic.Bool // the primary said goodbye on it
}

// Recv receives the next frame and notes what it says for the status.
func (l *primaryLink) Recv(ctx context.Context) (transport.Frame, error) {
	f, err := l.Conn.Recv(ctx)
	if err != nil {
		return f, err
	}
	switch f.Type {
	case transport.TypeHello:
		l.st.hello(l)
	case transport.TypeCommit:
		l.st.commitFrom.Store(l)
	case transport.TypeError:
		if m, derr := transport.DecodeError(f.Payload); derr == nil && m.Code == transport.CodeGoodbye {
			l.st.goodbye(l)
		}
	}
	return f, nil
}

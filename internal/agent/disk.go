package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/diskmirror"
	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
	"github.com/remus-kvm/remus/transport"
)

// Names remusd gives what it adds to the primary QEMU for the mirror.
const (
	mirrorTarget = "remus-mirror-target" // the NBD block node
	mirrorJob    = "remus-mirror"
)

// primaryDisk is the primary's side of disk replication: an NBD server that
// QEMU mirrors the guest's disk to, and the recorder behind it.
type primaryDisk struct {
	ctx  context.Context // the NBD connections are served until it ends
	node string          // the guest disk's block node
	size uint64
	rec  *diskmirror.Recorder
	srv  *diskmirror.Server
	mon  *qmp.Client
	log  *slog.Logger
	// events of the session's mirror job, from before it starts: a job
	// that ends or fails stops copying the guest's writes.
	events *qmp.Subscription
	broken error
}

// BeginCut implements checkpoint.DiskSource.
func (d *primaryDisk) BeginCut() { d.rec.BeginCut() }

// Cut implements checkpoint.DiskSource: the epoch's writes, or why the
// mirror no longer delivers them all. QEMU sends a job's events before the
// reply to the stop that follows them, so a job that ended before this
// pause is seen here.
func (d *primaryDisk) Cut() ([]transport.DiskWrite, error) {
	for d.broken == nil && d.events != nil {
		select {
		case ev, ok := <-d.events.Events():
			if !ok {
				d.events = nil
				continue
			}
			d.broken = mirrorEnded(ev)
			continue
		default:
		}
		break
	}
	if d.broken != nil {
		return nil, d.broken
	}
	return d.rec.Cut(), nil
}

// mirrorEnded says how an event ended or failed the mirror job, nil when
// it does not concern the job or leaves it running.
func mirrorEnded(ev qmp.Event) error {
	var data struct {
		Device string `json:"device"`
		ID     string `json:"id"`
		Status string `json:"status"`
		Error  string `json:"error"`
		Action string `json:"action"`
	}
	if ev.DecodeData(&data) != nil || (data.Device != mirrorJob && data.ID != mirrorJob) {
		return nil
	}
	switch ev.Name {
	case "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED":
		msg := "the disk mirror job ended (" + ev.Name + ")"
		if data.Error != "" {
			msg += ": " + data.Error
		}
		return errors.New(msg + "; the guest's writes no longer reach the backup")
	case "BLOCK_JOB_ERROR":
		return fmt.Errorf("the disk mirror job hit an I/O error (%s, action %s); the guest's writes no longer reach the backup", data.Error, data.Action)
	case "JOB_STATUS_CHANGE":
		switch data.Status {
		case "aborting", "concluded", "null":
			return fmt.Errorf("the disk mirror job is %s; the guest's writes no longer reach the backup", data.Status)
		}
	}
	return nil
}

// startPrimaryDisk finds the size of the block node and readies the NBD
// export of that size that QEMU mirrors it to, served until ctx ends.
func startPrimaryDisk(ctx context.Context, q *QEMU, node string, log *slog.Logger) (*primaryDisk, error) {
	size, err := qemu.NodeSize(ctx, q.Mon, node)
	if err != nil {
		return nil, err
	}
	d := &primaryDisk{ctx: ctx, node: node, size: size, rec: diskmirror.NewRecorder(), mon: q.Mon, log: log.With("part", "diskmirror")}
	d.srv = &diskmirror.Server{Size: size, Sink: d.rec, Log: d.log}
	return d, nil
}

// nbdFD is the name under which QEMU gets its end of the NBD connection.
const nbdFD = "remus-nbd"

// connect hands QEMU one end of a new socket pair (getfd) and serves the
// NBD export on the other: QEMU, another user in a sandbox under libvirt,
// need not reach a socket of remusd's, and nothing else can connect.
func (d *primaryDisk) connect(ctx context.Context) error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("NBD socket pair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "nbd-remusd"), os.NewFile(uintptr(fds[1]), "nbd-qemu")
	defer theirs.Close()
	c, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return fmt.Errorf("NBD socket pair: %w", err)
	}
	if err := qemu.PassFile(ctx, d.mon, nbdFD, theirs); err != nil {
		c.Close()
		return err
	}
	go func() {
		if err := d.srv.ServeConn(d.ctx, c); err != nil && d.ctx.Err() == nil {
			d.log.Warn("NBD client session ended", "err", err)
		}
	}()
	return nil
}

// prepare is the session's Prepare: the initial copy of the whole disk,
// sent to the backup as it goes, until the mirror is in step; from then on
// writes are recorded per epoch.
func (d *primaryDisk) prepare(ctx context.Context, link checkpoint.Link) error {
	d.stopMirror() // one left by an earlier session
	d.rec.Direct(func(ctx context.Context, w transport.DiskWrite) error {
		f, err := transport.NewFrame(0, w)
		if err != nil {
			return err
		}
		return link.Send(ctx, f)
	})
	if err := d.connect(ctx); err != nil {
		return fmt.Errorf("disk: connect the mirror target: %w", err)
	}
	add := qemu.NBDNode{NodeName: mirrorTarget, Export: diskmirror.ExportName, FD: nbdFD}
	if err := qemu.AddNBDNode(ctx, d.mon, add); err != nil {
		return fmt.Errorf("disk: attach the mirror target: %w", err)
	}
	mirror := qemu.Mirror{JobID: mirrorJob, Device: d.node, Target: mirrorTarget, Sync: "full", CopyMode: "write-blocking"}
	d.events = d.mon.Subscribe("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "JOB_STATUS_CHANGE")
	d.broken = nil
	if err := qemu.StartMirror(ctx, d.mon, mirror); err != nil {
		return fmt.Errorf("disk: start the mirror of %s: %w", d.node, err)
	}
	start := time.Now()
	d.log.Info("syncing the disk to the backup", "node", d.node, "bytes", d.size)
	lastLog := start
	err := qemu.PollBlockJob(ctx, d.mon, mirrorJob, 20*time.Millisecond, func(job *qemu.BlockJob) (bool, error) {
		if job == nil {
			return false, fmt.Errorf("the mirror job of %s ended during the initial copy", d.node)
		}
		if job.Ready {
			// Writes from here on go with epoch 1; the first pause comes
			// after this returns.
			d.rec.Record()
			st := d.rec.DirectStats()
			d.log.Info("disk in step with the backup", "copied_bytes", st.Bytes, "writes", st.Writes, "took", time.Since(start).Round(time.Millisecond))
			return true, nil
		}
		if time.Since(lastLog) >= time.Second {
			d.log.Info("syncing the disk to the backup", "done_bytes", job.Offset, "of", job.Len)
			lastLog = time.Now()
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("disk: initial copy: %w", err)
	}
	return nil
}

// stopMirror ends the session's mirror: writes are dropped from now on,
// the job is cancelled (after the initial copy that completes it without
// switching the guest to the target) and the NBD node is removed. QEMU may
// be gone; errors are logged.
func (d *primaryDisk) stopMirror() {
	d.rec.Off()
	if d.events != nil {
		d.events.Close()
		d.events = nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if job, err := qemu.FindBlockJob(ctx, d.mon, mirrorJob); err == nil && job != nil {
		if err := qemu.CancelBlockJob(ctx, d.mon, mirrorJob, true); err != nil {
			d.log.Warn("cancel the disk mirror", "err", err)
		}
		// Until it is gone; QEMU may be gone too, or ctx end.
		qemu.PollBlockJob(ctx, d.mon, mirrorJob, 10*time.Millisecond, func(job *qemu.BlockJob) (bool, error) { return job == nil, nil })
	}
	err := qemu.DelNode(ctx, d.mon, mirrorTarget)
	var qe *qmp.Error
	if err != nil && !(errors.As(err, &qe) && qe.Class == "GenericError") {
		d.log.Warn("remove the mirror target", "err", err)
	}
}

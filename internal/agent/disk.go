package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/diskmirror"
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
	node   string // the guest disk's block node
	socket string
	size   uint64
	rec    *diskmirror.Recorder
	srv    *diskmirror.Server
	mon    *qmp.Client
	log    *slog.Logger
}

// startPrimaryDisk finds the size of the block node, and serves an NBD
// export of that size on a unix socket in stateDir until ctx ends.
func startPrimaryDisk(ctx context.Context, q *QEMU, node, stateDir string, log *slog.Logger) (*primaryDisk, error) {
	size, err := nodeSize(ctx, q.Mon, node)
	if err != nil {
		return nil, err
	}
	d := &primaryDisk{node: node, socket: filepath.Join(stateDir, "nbd.sock"), size: size, rec: diskmirror.NewRecorder(), mon: q.Mon,
		log: log.With("part", "diskmirror")}
	d.srv = &diskmirror.Server{Size: size, Sink: d.rec, Log: d.log}
	os.Remove(d.socket)
	ln, err := net.Listen("unix", d.socket)
	if err != nil {
		return nil, fmt.Errorf("NBD socket: %w", err)
	}
	go d.srv.Serve(ctx, ln)
	return d, nil
}

// nodeSize returns the virtual size of a block node.
func nodeSize(ctx context.Context, mon *qmp.Client, node string) (uint64, error) {
	type blockNode struct {
		NodeName string `json:"node-name"`
		Image    struct {
			VirtualSize uint64 `json:"virtual-size"`
		} `json:"image"`
	}
	nodes, err := qmp.Run[[]blockNode](ctx, mon, "query-named-block-nodes", map[string]any{"flat": true})
	if err != nil {
		return 0, fmt.Errorf("block nodes: %w", err)
	}
	var names []string
	for _, n := range nodes {
		if n.NodeName == node {
			return n.Image.VirtualSize, nil
		}
		names = append(names, n.NodeName)
	}
	return 0, fmt.Errorf("QEMU has no block node %q (it has %v)", node, names)
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
	add := map[string]any{"driver": "nbd", "node-name": mirrorTarget, "export": diskmirror.ExportName,
		"server": map[string]any{"type": "unix", "path": d.socket}}
	if err := d.mon.Execute(ctx, "blockdev-add", add, nil); err != nil {
		return fmt.Errorf("disk: attach the mirror target: %w", err)
	}
	mirror := map[string]any{"job-id": mirrorJob, "device": d.node, "target": mirrorTarget, "sync": "full", "copy-mode": "write-blocking"}
	if err := d.mon.Execute(ctx, "blockdev-mirror", mirror, nil); err != nil {
		return fmt.Errorf("disk: start the mirror of %s: %w", d.node, err)
	}
	start := time.Now()
	d.log.Info("syncing the disk to the backup", "node", d.node, "bytes", d.size)
	lastLog := start
	for {
		job, err := d.job(ctx)
		if err != nil {
			return err
		}
		if job == nil {
			return fmt.Errorf("disk: the mirror job of %s ended during the initial copy", d.node)
		}
		if job.Ready {
			// Writes from here on go with epoch 1; the first pause comes
			// after this returns.
			d.rec.Record()
			st := d.rec.DirectStats()
			d.log.Info("disk in step with the backup", "copied_bytes", st.Bytes, "writes", st.Writes, "took", time.Since(start).Round(time.Millisecond))
			return nil
		}
		if time.Since(lastLog) >= time.Second {
			d.log.Info("syncing the disk to the backup", "done_bytes", job.Offset, "of", job.Len)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// blockJob is what query-block-jobs says of a job.
type blockJob struct {
	Device string `json:"device"`
	Ready  bool   `json:"ready"`
	Offset uint64 `json:"offset"`
	Len    uint64 `json:"len"`
}

// job returns the mirror job, nil when there is none.
func (d *primaryDisk) job(ctx context.Context) (*blockJob, error) {
	jobs, err := qmp.Run[[]blockJob](ctx, d.mon, "query-block-jobs", nil)
	if err != nil {
		return nil, fmt.Errorf("disk: query the mirror: %w", err)
	}
	for _, j := range jobs {
		if j.Device == mirrorJob {
			return &j, nil
		}
	}
	return nil, nil
}

// stopMirror ends the session's mirror: writes are dropped from now on,
// the job is cancelled (after the initial copy that completes it without
// switching the guest to the target) and the NBD node is removed. QEMU may
// be gone; errors are logged.
func (d *primaryDisk) stopMirror() {
	d.rec.Off()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if job, err := d.job(ctx); err == nil && job != nil {
		if err := d.mon.Execute(ctx, "block-job-cancel", map[string]any{"device": mirrorJob, "force": true}, nil); err != nil {
			d.log.Warn("cancel the disk mirror", "err", err)
		}
		for {
			job, err := d.job(ctx)
			if err != nil || job == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	err := d.mon.Execute(ctx, "blockdev-del", map[string]any{"node-name": mirrorTarget}, nil)
	var qe *qmp.Error
	if err != nil && !(errors.As(err, &qe) && qe.Class == "GenericError") {
		d.log.Warn("remove the mirror target", "err", err)
	}
}

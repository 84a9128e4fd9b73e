package qemu

import (
	"context"
	"fmt"
	"time"
)

// BlockNode is what query-named-block-nodes says of a block node.
type BlockNode struct {
	NodeName string `json:"node-name"`
	Image    struct {
		VirtualSize uint64 `json:"virtual-size"`
	} `json:"image"`
}

// BlockNodes lists QEMU's named block nodes (query-named-block-nodes,
// flat).
func BlockNodes(ctx context.Context, mon Monitor) ([]BlockNode, error) {
	return run[[]BlockNode](ctx, mon, "query-named-block-nodes", struct {
		Flat bool `json:"flat"`
	}{true})
}

// NodeSize returns the virtual size of a block node.
func NodeSize(ctx context.Context, mon Monitor, node string) (uint64, error) {
	nodes, err := BlockNodes(ctx, mon)
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

// DiskNode returns the block node a guest device has on top of the image
// file (or block device) path: the node to mirror (query-block). libvirt
// names its nodes itself (libvirt-1-format, ...); its XML names the file.
func DiskNode(ctx context.Context, mon Monitor, path string) (string, error) {
	type device struct {
		Device   string `json:"device"`
		QDev     string `json:"qdev"`
		Inserted *struct {
			NodeName string `json:"node-name"`
			File     string `json:"file"`
		} `json:"inserted"`
	}
	devs, err := run[[]device](ctx, mon, "query-block", nil)
	if err != nil {
		return "", fmt.Errorf("query-block: %w", err)
	}
	var files []string
	for _, d := range devs {
		if d.Inserted == nil {
			continue
		}
		if d.Inserted.File == path {
			return d.Inserted.NodeName, nil
		}
		files = append(files, d.Inserted.File)
	}
	return "", fmt.Errorf("no guest device uses %s (the devices use %v)", path, files)
}

// NBDNode is an NBD client block node, connected through a unix socket
// or a descriptor QEMU was given (getfd: PassFile).
type NBDNode struct {
	NodeName string // the new node's name
	Export   string // the export to open
	Socket   string // the NBD server's unix socket, or
	FD       string // the name of the connected descriptor QEMU was given
}

// AddNBDNode attaches an NBD export as a block node (blockdev-add).
func AddNBDNode(ctx context.Context, mon Monitor, n NBDNode) error {
	type server struct {
		Type string `json:"type"`
		Path string `json:"path,omitempty"`
		Str  string `json:"str,omitempty"`
	}
	srv := server{Type: "unix", Path: n.Socket}
	if n.FD != "" {
		srv = server{Type: "fd", Str: n.FD}
	}
	args := struct {
		Driver   string `json:"driver"`
		NodeName string `json:"node-name"`
		Export   string `json:"export"`
		Server   server `json:"server"`
	}{"nbd", n.NodeName, n.Export, srv}
	return mon.Execute(ctx, "blockdev-add", args, nil)
}

// DelNode removes a block node that blockdev-add added (blockdev-del).
func DelNode(ctx context.Context, mon Monitor, node string) error {
	return mon.Execute(ctx, "blockdev-del", struct {
		NodeName string `json:"node-name"`
	}{node}, nil)
}

// Mirror is a blockdev-mirror job.
type Mirror struct {
	JobID  string `json:"job-id"`
	Device string `json:"device"` // the source node
	Target string `json:"target"` // the target node
	// Sync is "full" (copy the whole source first), "top" or "none".
	Sync string `json:"sync"`
	// CopyMode is "background" (guest writes complete before they reach the
	// target) or "write-blocking" (they complete once the target has them).
	CopyMode string `json:"copy-mode,omitempty"`
}

// StartMirror starts a mirror job (blockdev-mirror).
func StartMirror(ctx context.Context, mon Monitor, m Mirror) error {
	return mon.Execute(ctx, "blockdev-mirror", m, nil)
}

// BlockJob is what query-block-jobs says of a job.
type BlockJob struct {
	Device string `json:"device"` // the job's id
	Ready  bool   `json:"ready"`
	Offset uint64 `json:"offset"`
	Len    uint64 `json:"len"`
}

// FindBlockJob returns the block job with the id, nil when there is none.
func FindBlockJob(ctx context.Context, mon Monitor, id string) (*BlockJob, error) {
	jobs, err := run[[]BlockJob](ctx, mon, "query-block-jobs", nil)
	if err != nil {
		return nil, err
	}
	for _, j := range jobs {
		if j.Device == id {
			return &j, nil
		}
	}
	return nil, nil
}

// CancelBlockJob cancels a block job (block-job-cancel). force cancels a
// mirror that is ready without completing it: the guest stays on the
// source. The job may take a while to go; PollBlockJob waits for that.
func CancelBlockJob(ctx context.Context, mon Monitor, id string, force bool) error {
	return mon.Execute(ctx, "block-job-cancel", struct {
		Device string `json:"device"`
		Force  bool   `json:"force"`
	}{id, force}, nil)
}

// PollBlockJob looks up the block job id every interval and calls fn with
// it (nil once there is no such job) until fn says done, fn or the query
// fails, or ctx ends.
func PollBlockJob(ctx context.Context, mon Monitor, id string, every time.Duration, fn func(*BlockJob) (done bool, err error)) error {
	for {
		job, err := FindBlockJob(ctx, mon, id)
		if err != nil {
			return err
		}
		if done, err := fn(job); done || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(every):
		}
	}
}

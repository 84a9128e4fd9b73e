// Package agent is what remusd runs: it turns a configuration into a
// protected VM on the primary (attach to QEMU over QMP, find and map the
// shared guest RAM, pick a dirty-page tracker, connect to the backup and run
// the epoch loop) or a standby on the backup (receive and apply epochs, and
// on the primary's death start QEMU on the RAM image and resume the last
// committed checkpoint). Start-up runs as named steps, so a failure says
// which step failed on what.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/qemu"
	"github.com/remus-kvm/remus/qmp"
)

// step runs one named start-up step, logging it, and names it in the error.
func step(ctx context.Context, log *slog.Logger, name string, fn func() error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	log.Info(name)
	if err := fn(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// redial calls dial every interval until it succeeds or ctx ends, and then
// returns the last dial's error: for sockets that appear a moment after a
// process starts, and peers that come back.
func redial[T any](ctx context.Context, every time.Duration, dial func(context.Context) (T, error)) (T, error) {
	for {
		v, err := dial(ctx)
		if err == nil {
			return v, nil
		}
		select {
		case <-ctx.Done():
			return v, err
		case <-time.After(every):
		}
	}
}

// QEMU is a running QEMU process that remusd attached to.
type QEMU struct {
	Mon     *qmp.Client
	PID     int
	Version qmp.Version
	RAM     qemu.RAMBackend
}

// Attach connects to QEMU's QMP socket, learns QEMU's PID from the socket's
// peer credentials and finds the guest RAM backend.
func Attach(ctx context.Context, socket string, log *slog.Logger) (*QEMU, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("QMP socket %s unreachable (is the VM running, and is this its QMP socket?): %w", socket, err)
	}
	pid, err := peerPID(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("QMP socket %s: %w", socket, err)
	}
	mon, err := qmp.New(ctx, nc, qmp.WithLogger(log))
	if err != nil {
		return nil, fmt.Errorf("QMP socket %s: %w", socket, err)
	}
	q := &QEMU{Mon: mon, PID: pid, Version: mon.Version()}
	if q.RAM, err = qemu.FindRAMBackend(ctx, mon); err != nil {
		mon.Close()
		return nil, err
	}
	return q, nil
}

func peerPID(nc net.Conn) (int, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return 0, errors.New("not a unix socket")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, fmt.Errorf("peer credentials: %w", serr)
	}
	return int(cred.Pid), nil
}

// MapRAM maps the guest RAM read-only into this process. A file backend is
// opened by its path; a memfd through QEMU's file descriptor in /proc.
func (q *QEMU) MapRAM() ([]byte, error) {
	path := q.RAM.Path
	if q.RAM.Type == "memory-backend-memfd" {
		var err error
		if path, err = q.memfdPath(); err != nil {
			return nil, err
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open guest RAM %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if uint64(st.Size()) != q.RAM.Size {
		return nil, fmt.Errorf("guest RAM %s has %d bytes; QEMU reports %d", path, st.Size(), q.RAM.Size)
	}
	ram, err := unix.Mmap(int(f.Fd()), 0, int(q.RAM.Size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map guest RAM %s: %w", path, err)
	}
	return ram, nil
}

// memfdPath finds QEMU's memfd of the RAM backend's size in /proc/PID/fd.
func (q *QEMU) memfdPath() (string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", q.PID)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("find guest RAM memfd: %w", err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		target, err := os.Readlink(p)
		if err != nil || !strings.HasPrefix(target, "/memfd:") {
			continue
		}
		if st, err := os.Stat(p); err == nil && uint64(st.Size()) == q.RAM.Size {
			return p, nil
		}
	}
	return "", fmt.Errorf("find guest RAM memfd: no memfd of %d bytes among QEMU's (pid %d) file descriptors", q.RAM.Size, q.PID)
}

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
	"strconv"
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
	// Proc is QEMU's process, held by a pidfd from the moment remusd
	// attached: a signal never reaches another process that reused the
	// pid after QEMU ended.
	Proc *os.Process
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
	proc, err := os.FindProcess(pid) // a pidfd on Linux
	if err != nil {
		mon.Close()
		return nil, fmt.Errorf("QEMU pid %d: %w", pid, err)
	}
	q := &QEMU{Mon: mon, PID: pid, Version: mon.Version(), Proc: proc}
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
	path, err := q.ramPath()
	if err != nil {
		return nil, err
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

// ramPath is where this process opens the guest RAM of q: its backend's
// file, or its memfd through /proc.
func (q *QEMU) ramPath() (string, error) {
	if q.RAM.Type == "memory-backend-memfd" {
		return q.memfdPath()
	}
	if q.RAM.Path == "" {
		return "", fmt.Errorf("RAM backend %s (%s) has no file to write committed epochs into", q.RAM.ID, q.RAM.Type)
	}
	return q.RAM.Path, nil
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

// RAMBlock is one of QEMU's RAM blocks (info ramblock).
type RAMBlock struct {
	Name  string
	Bytes uint64
}

// parseRAMBlocks reads the table `info ramblock` prints: a header line,
// then per block its name, page size (two fields), offset, used and total
// (QEMU 10.0 adds the host address and ro/rw, and ends lines with \r\n).
func parseRAMBlocks(out string) ([]RAMBlock, error) {
	var blocks []RAMBlock
	for i, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) == 0 {
			continue // the header
		}
		if len(f) < 6 {
			return nil, fmt.Errorf("info ramblock: unexpected line %q", line)
		}
		used, err := strconv.ParseUint(strings.TrimPrefix(f[4], "0x"), 16, 64)
		if err != nil {
			return nil, fmt.Errorf("info ramblock: line %q: %w", line, err)
		}
		blocks = append(blocks, RAMBlock{Name: f[0], Bytes: used})
	}
	if len(blocks) == 0 {
		return nil, errors.New("info ramblock: no RAM blocks listed")
	}
	return blocks, nil
}

// unreplicated returns the RAM blocks besides the guest RAM backend that the
// guest can write. Those are not in the shared backend, so no checkpoint
// carries them, and device state saving skips all RAM: after a failover
// they would hold the backup QEMU's fresh contents. Firmware and option
// ROMs (pc.bios, pc.rom, *.rom) and fw_cfg's blobs (/rom@...) are read-only
// to the guest and rebuilt identically by the backup's QEMU from the same
// command line.
func unreplicated(blocks []RAMBlock, backend string) []RAMBlock {
	var out []RAMBlock
	for _, b := range blocks {
		switch {
		case b.Name == backend, b.Name == "pc.bios", b.Name == "pc.rom",
			strings.HasSuffix(b.Name, ".rom"), strings.HasPrefix(b.Name, "/rom@"):
			continue
		}
		out = append(out, b)
	}
	return out
}

// CheckRAMReplicated refuses a guest with writable RAM outside its shared
// backend (video memory, for one), naming each block.
func (q *QEMU) CheckRAMReplicated(ctx context.Context) error {
	out, err := qmp.Run[string](ctx, q.Mon, "human-monitor-command", map[string]string{"command-line": "info ramblock"})
	if err != nil {
		return fmt.Errorf("list RAM blocks: %w", err)
	}
	blocks, err := parseRAMBlocks(out)
	if err != nil {
		return err
	}
	if bad := unreplicated(blocks, q.RAM.ID); len(bad) > 0 {
		var names []string
		for _, b := range bad {
			names = append(names, fmt.Sprintf("%s (%d KiB)", b.Name, b.Bytes>>10))
		}
		return fmt.Errorf("%w: %s", ErrUnreplicatedRAM, strings.Join(names, ", "))
	}
	return nil
}

// ErrUnreplicatedRAM reports a guest with writable RAM outside its shared
// backend.
var ErrUnreplicatedRAM = errors.New("the guest has RAM outside its shared memory backend that remus-kvm cannot replicate, so a failover would resume it stale; remove the device that owns it (for video memory: -vga none, or a display device without its own RAM)")

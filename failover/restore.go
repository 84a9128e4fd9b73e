package failover

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// Monitor is the part of a QMP client that a restore needs.
type Monitor interface {
	Execute(ctx context.Context, command string, args, result any) error
}

// StateFormat says how a checkpoint's device state was saved, which decides
// how QEMU must be told to load it.
type StateFormat struct {
	// Configuration: the stream starts with a configuration section, as a
	// migration writes it (the fallback saver, migrate with
	// x-ignore-shared); xen-save-devices-state writes none.
	Configuration bool
}

// savevm stream constants (QEMU's migration/savevm.c).
const (
	savevmMagic          = "QEVM"
	savevmVersion        = 3
	sectionConfiguration = 0x07
)

// ParseStateFormat inspects the start of a saved device state.
func ParseStateFormat(head []byte) (StateFormat, error) {
	if len(head) < 9 || string(head[:4]) != savevmMagic {
		return StateFormat{}, fmt.Errorf("failover: device state does not start with a QEVM header")
	}
	if v := int(head[4])<<24 | int(head[5])<<16 | int(head[6])<<8 | int(head[7]); v != savevmVersion {
		return StateFormat{}, fmt.Errorf("failover: device state has savevm version %d, want %d", v, savevmVersion)
	}
	return StateFormat{Configuration: head[8] == sectionConfiguration}, nil
}

// ReadStateFormat inspects a saved device state file.
func ReadStateFormat(path string) (StateFormat, error) {
	f, err := os.Open(path)
	if err != nil {
		return StateFormat{}, fmt.Errorf("failover: %w", err)
	}
	defer f.Close()
	head := make([]byte, 9)
	if _, err := io.ReadFull(f, head); err != nil {
		return StateFormat{}, fmt.Errorf("failover: read device state %s: %w", path, err)
	}
	return ParseStateFormat(head)
}

// RestoreArgs are the QEMU arguments that make a freshly started QEMU wait
// for the device state of a checkpoint: -incoming defer, and, for a state
// without a configuration section, telling QEMU not to expect one. The rest
// of the command line must be the primary's, with the RAM backend's
// mem-path pointing at the backup's RAM image.
func RestoreArgs(f StateFormat) []string {
	if f.Configuration {
		return []string{"-incoming", "defer"}
	}
	return []string{"-incoming", "defer", "-global", "migration.send-configuration=off"}
}

// IncomingURI returns the migrate-incoming URI that reads a saved device
// state file: file: where QEMU has it (8.2 and later), else exec:cat.
func IncomingURI(path string, qemuMajor, qemuMinor int) string {
	if fileURI(qemuMajor, qemuMinor) {
		return "file:" + path
	}
	return "exec:cat " + shellQuote(path)
}

// OutgoingURI returns the migrate URI that writes a migration stream to
// the file path: file: where QEMU has it (8.2 and later), else exec:cat.
func OutgoingURI(path string, qemuMajor, qemuMinor int) string {
	if fileURI(qemuMajor, qemuMinor) {
		return "file:" + path
	}
	return "exec:cat > " + shellQuote(path)
}

func fileURI(major, minor int) bool { return major > 8 || major == 8 && minor >= 2 }

func shellQuote(s string) string {
	out := []byte{'\''}
	for i := 0; i < len(s); i++ {
		if s[i] == '\'' {
			out = append(out, `'\''`...)
			continue
		}
		out = append(out, s[i])
	}
	return string(append(out, '\''))
}

// Restored reports the timing of a restore.
type Restored struct {
	Load   time.Duration // migrate-incoming until QEMU reported completed
	Resume time.Duration // cont
}

// ErrRestore wraps every restore failure.
var ErrRestore = errors.New("failover: restore")

// Restore loads the device state from uri into a QEMU started with
// RestoreArgs, waits for the load to complete and resumes the guest. The
// guest RAM is not copied: QEMU runs on the RAM image it was started with.
//
// A state saved by a migration (Configuration set) lists the shared RAM
// blocks it skipped; the loading side must skip them too (x-ignore-shared),
// or it would expect their pages in the stream.
func Restore(ctx context.Context, mon Monitor, uri string, f StateFormat) (Restored, error) {
	var r Restored
	start := time.Now()
	if f.Configuration {
		caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
		if err := mon.Execute(ctx, "migrate-set-capabilities", caps, nil); err != nil {
			return r, fmt.Errorf("%w: migrate-set-capabilities x-ignore-shared: %w", ErrRestore, err)
		}
	}
	if err := mon.Execute(ctx, "migrate-incoming", map[string]string{"uri": uri}, nil); err != nil {
		return r, fmt.Errorf("%w: migrate-incoming %s: %w", ErrRestore, uri, err)
	}
	poll := time.NewTicker(2 * time.Millisecond)
	defer poll.Stop()
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := mon.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return r, fmt.Errorf("%w: query-migrate: %w", ErrRestore, err)
		}
		if st.Status == "completed" {
			break
		}
		if st.Status == "failed" || st.Status == "cancelled" {
			return r, fmt.Errorf("%w: loading the device state %s", ErrRestore, st.Status+describe(st.ErrorDesc))
		}
		select {
		case <-ctx.Done():
			return r, fmt.Errorf("%w: waiting for the device state to load: %w", ErrRestore, ctx.Err())
		case <-poll.C:
		}
	}
	r.Load = time.Since(start)
	start = time.Now()
	if err := mon.Execute(ctx, "cont", nil, nil); err != nil {
		return r, fmt.Errorf("%w: cont: %w", ErrRestore, err)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := mon.Execute(ctx, "query-status", nil, &st); err != nil {
		return r, fmt.Errorf("%w: query-status: %w", ErrRestore, err)
	}
	if st.Status != "running" {
		return r, fmt.Errorf("%w: guest is %q after cont, not running", ErrRestore, st.Status)
	}
	r.Resume = time.Since(start)
	return r, nil
}

func describe(s string) string {
	if s == "" {
		return ""
	}
	return ": " + s
}

// StateFile holds the committed device state on the backup. Save replaces it
// atomically (write a temporary file, fsync, rename), so a failover always
// finds a whole device state of one committed epoch.
type StateFile struct{ Path string }

// Save writes the device state of a committed epoch.
func (s StateFile) Save(data []byte) error {
	tmp := s.Path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("failover: save device state: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.Path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("failover: save device state to %s: %w", s.Path, err)
	}
	return nil
}

// Announce has QEMU announce the guest's NICs on the network (QMP
// announce-self: gratuitous RARP frames from each NIC's MAC address), so
// that switches learn the port the guest is behind now. The timing is
// QEMU's default after a migration: 5 rounds, 50 ms then 150, 250, ... up
// to 550 ms apart.
func Announce(ctx context.Context, mon Monitor) error {
	args := map[string]int{"initial": 50, "max": 550, "rounds": 5, "step": 100}
	if err := mon.Execute(ctx, "announce-self", args, nil); err != nil {
		return fmt.Errorf("failover: announce-self: %w", err)
	}
	return nil
}

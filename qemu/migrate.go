package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/remus-kvm/remus/qmp"
)

// Capability is a migration capability (migrate-set-capabilities).
type Capability string

// IgnoreShared (x-ignore-shared) leaves RAM blocks in shared memory
// backends out of a migration stream: both sides have them already.
const IgnoreShared Capability = "x-ignore-shared"

// CapabilityOn reports whether migration capability c is on.
func CapabilityOn(ctx context.Context, mon Monitor, c Capability) (bool, error) {
	var caps []struct {
		Capability Capability `json:"capability"`
		State      bool       `json:"state"`
	}
	if err := mon.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return false, fmt.Errorf("query-migrate-capabilities: %w", err)
	}
	for _, x := range caps {
		if x.Capability == c {
			return x.State, nil
		}
	}
	return false, nil
}

// SetCapability turns a migration capability on or off.
func SetCapability(ctx context.Context, mon Monitor, c Capability, on bool) error {
	type capability struct {
		Capability Capability `json:"capability"`
		State      bool       `json:"state"`
	}
	args := struct {
		Capabilities []capability `json:"capabilities"`
	}{[]capability{{c, on}}}
	if err := mon.Execute(ctx, "migrate-set-capabilities", args, nil); err != nil {
		return fmt.Errorf("migrate-set-capabilities %s: %w", c, err)
	}
	return nil
}

type uriArgs struct {
	URI string `json:"uri"`
}

// Migrate starts an outgoing migration to uri (see OutgoingURI); wait for
// it with WaitMigration.
func Migrate(ctx context.Context, mon Monitor, uri string) error {
	return mon.Execute(ctx, "migrate", uriArgs{uri}, nil)
}

// MigrateIncoming starts loading a migration stream from uri (see
// IncomingURI) into a QEMU started with -incoming defer; wait for it with
// WaitMigration.
func MigrateIncoming(ctx context.Context, mon Monitor, uri string) error {
	return mon.Execute(ctx, "migrate-incoming", uriArgs{uri}, nil)
}

// Migration is what query-migrate says of the current migration.
type Migration struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

// QueryMigrate returns the state of the current (or last) migration.
func QueryMigrate(ctx context.Context, mon Monitor) (Migration, error) {
	return run[Migration](ctx, mon, "query-migrate", nil)
}

// WaitMigration polls query-migrate every interval until the migration,
// outgoing or incoming, completed. A migration that failed or was
// cancelled is an error with QEMU's description.
func WaitMigration(ctx context.Context, mon Monitor, every time.Duration) error {
	poll := time.NewTicker(every)
	defer poll.Stop()
	for {
		st, err := QueryMigrate(ctx, mon)
		if err != nil {
			return fmt.Errorf("query-migrate: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			if st.ErrorDesc != "" {
				return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
			}
			return fmt.Errorf("migration %s", st.Status)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the migration: %w", ctx.Err())
		case <-poll.C:
		}
	}
}

// FileMonitor is a Monitor that can pass a file's descriptor with a
// command (qmp.Client over a unix socket).
type FileMonitor interface {
	Monitor
	ExecuteWithFile(ctx context.Context, command string, args, result any, f *os.File) error
}

// PassFile hands QEMU f's descriptor under name (QMP getfd), for an fd:NAME
// migration URI. QEMU's sandbox (-sandbox on: libvirt's) forbids exec:
// URIs, and QEMU's user may not open remusd's files: a descriptor it is
// given works under both.
func PassFile(ctx context.Context, mon FileMonitor, name string, f *os.File) error {
	if err := mon.ExecuteWithFile(ctx, "getfd", map[string]string{"fdname": name}, nil, f); err != nil {
		return fmt.Errorf("getfd %s: %w", name, err)
	}
	return nil
}

// IncomingURI returns the migrate-incoming URI that reads a saved device
// state file: file: where QEMU has it (8.2 and later), else exec:cat.
func IncomingURI(path string, v qmp.Version) string {
	if fileURI(v) {
		return "file:" + path
	}
	return "exec:cat " + shellQuote(path)
}

// OutgoingURI returns the migrate URI that writes a migration stream to
// the file path: file: where QEMU has it (8.2 and later), else exec:cat.
func OutgoingURI(path string, v qmp.Version) string {
	if fileURI(v) {
		return "file:" + path
	}
	return "exec:cat > " + shellQuote(path)
}

func fileURI(v qmp.Version) bool { return v.AtLeast(qmp.Version{Major: 8, Minor: 2}) }

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

// DeviceSaver saves the device and CPU state of a paused guest to a file.
// The zero value uses xen-save-devices-state.
type DeviceSaver struct {
	// Migrate saves with a migration that skips shared RAM (x-ignore-shared)
	// instead, for QEMU builds without xen-save-devices-state: slower and
	// larger, and the stream starts with a configuration section.
	Migrate bool
	// Version is QEMU's; it picks the migrate URI form.
	Version qmp.Version
	// FDSet, when set, is the state file as a descriptor handed to QEMU
	// (AddStateFD): QEMU then writes it without opening a path of its own,
	// which a QEMU running as another user, sandboxed or under an AppArmor
	// profile (libvirt's) may not. xen-save-devices-state only.
	FDSet *FDSetFile
}

// FDSetFile is a file this process opened for writing and added to an fd
// set of QEMU's (QMP add-fd): QEMU opens /dev/fdset/ID and gets a duplicate
// of the descriptor, sharing its offset.
type FDSetFile struct {
	f  *os.File
	ID int
}

// stateFDOpaque marks the fd sets AddStateFD makes.
const stateFDOpaque = "remus device state "

// AddStateFD creates (or empties) the file at path and hands QEMU a
// descriptor of it in a new fd set. Sets an earlier agent left behind
// (it was killed: QEMU keeps them while another monitor, libvirt's, is
// connected) are removed first.
func AddStateFD(ctx context.Context, mon FileMonitor, path string) (*FDSetFile, error) {
	var sets []struct {
		ID  int `json:"fdset-id"`
		FDs []struct {
			Opaque string `json:"opaque"`
		} `json:"fds"`
	}
	if err := mon.Execute(ctx, "query-fdsets", nil, &sets); err != nil {
		return nil, fmt.Errorf("query-fdsets: %w", err)
	}
	for _, set := range sets {
		for _, fd := range set.FDs {
			if strings.HasPrefix(fd.Opaque, stateFDOpaque) {
				if err := mon.Execute(ctx, "remove-fd", map[string]int{"fdset-id": set.ID}, nil); err != nil {
					return nil, fmt.Errorf("remove an earlier agent's fd set %d: %w", set.ID, err)
				}
				break
			}
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	var r struct {
		FDSetID int `json:"fdset-id"`
	}
	if err := mon.ExecuteWithFile(ctx, "add-fd", map[string]string{"opaque": stateFDOpaque + path}, &r, f); err != nil {
		f.Close()
		return nil, fmt.Errorf("add-fd %s: %w", path, err)
	}
	return &FDSetFile{f: f, ID: r.FDSetID}, nil
}

// Name is the file name QEMU opens the descriptor by.
func (s *FDSetFile) Name() string { return "/dev/fdset/" + strconv.Itoa(s.ID) }

// reset empties the file and rewinds the shared offset for the next save.
func (s *FDSetFile) reset() error {
	if err := s.f.Truncate(0); err != nil {
		return err
	}
	_, err := s.f.Seek(0, io.SeekStart)
	return err
}

// Close removes the fd set from QEMU and closes the file. QEMU closes its
// descriptors of a removed set only while the guest runs (a paused guest's
// go when it continues).
func (s *FDSetFile) Close(ctx context.Context, mon Monitor) error {
	err := mon.Execute(ctx, "remove-fd", map[string]int{"fdset-id": s.ID}, nil)
	return errors.Join(err, s.f.Close())
}

// String names the method.
func (s DeviceSaver) String() string {
	if s.Migrate {
		return "migrate(x-ignore-shared)"
	}
	return "xen-save-devices-state"
}

// Save writes the device state to path, which it replaces; QEMU must be
// able to write there (it must be on QEMU's host), unless FDSet holds
// path's descriptor for it.
func (s DeviceSaver) Save(ctx context.Context, mon Monitor, path string) error {
	if s.FDSet != nil && !s.Migrate {
		if err := s.FDSet.reset(); err != nil {
			return fmt.Errorf("empty %s: %w", path, err)
		}
		return SaveDevicesState(ctx, mon, s.FDSet.Name())
	}
	os.Remove(path)
	if !s.Migrate {
		return SaveDevicesState(ctx, mon, path)
	}
	return s.migrateToFile(ctx, mon, path)
}

// SaveDevicesState saves the paused guest's device state to path with
// xen-save-devices-state (live: false): about 2 ms and 32 KiB for a small
// q35 guest.
func SaveDevicesState(ctx context.Context, mon Monitor, path string) error {
	args := struct {
		Filename string `json:"filename"`
		Live     bool   `json:"live"`
	}{Filename: path}
	return mon.Execute(ctx, "xen-save-devices-state", args, nil)
}

// migrateToFile saves the device state with a migration that skips shared
// RAM, for QEMU builds without xen-save-devices-state.
func (s DeviceSaver) migrateToFile(ctx context.Context, mon Monitor, path string) (err error) {
	if err := SetCapability(ctx, mon, IgnoreShared, true); err != nil {
		return err
	}
	// Never left on: a later save of the VM by anyone else (virsh save,
	// a snapshot) would leave guest RAM out of its image.
	defer func() {
		if oerr := SetCapability(context.WithoutCancel(ctx), mon, IgnoreShared, false); oerr != nil && err == nil {
			err = oerr
		}
	}()
	if err := Migrate(ctx, mon, OutgoingURI(path, s.Version)); err != nil {
		return fmt.Errorf("migrate to %s: %w", path, err)
	}
	if err := WaitMigration(ctx, mon, time.Millisecond); err != nil {
		return fmt.Errorf("migrate to %s: %w", path, err)
	}
	// query-migrate says "completed" a moment before QEMU leaves the
	// finish-migrate run state, in which cont is refused ("Migration is
	// not finalized yet"): wait for that too.
	for {
		st, err := Status(ctx, mon)
		if err != nil {
			return fmt.Errorf("migrate to %s: %w", path, err)
		}
		if st != "finish-migrate" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("migrate to %s: waiting for QEMU to leave finish-migrate: %w", path, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

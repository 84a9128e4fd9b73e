package failover

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/remus-kvm/remus/qemu"
)

// ErrRestore wraps every restore failure.
var ErrRestore = errors.New("failover: restore")

// Load loads the device state from uri (qemu.IncomingURI) into a QEMU
// started with qemu.RestoreArgs and waits until it is loaded, returning how
// long that took; the guest stays paused (Resume continues it). Between
// the two, the caller connects what must be there before the guest runs
// (its network), with no device state being loaded meanwhile. The guest
// RAM is not copied: QEMU runs on the RAM image it was started with.
//
// A state saved by a migration (Configuration set) lists the shared RAM
// blocks it skipped; the loading side must skip them too (x-ignore-shared),
// or it would expect their pages in the stream.
func Load(ctx context.Context, mon qemu.Monitor, uri string, f qemu.StateFormat) (time.Duration, error) {
	start := time.Now()
	if f.Configuration {
		if err := qemu.SetCapability(ctx, mon, qemu.IgnoreShared, true); err != nil {
			return 0, fmt.Errorf("%w: %w", ErrRestore, err)
		}
	}
	if err := qemu.MigrateIncoming(ctx, mon, uri); err != nil {
		return 0, fmt.Errorf("%w: migrate-incoming %s: %w", ErrRestore, uri, err)
	}
	if err := qemu.WaitMigration(ctx, mon, 2*time.Millisecond); err != nil {
		return 0, fmt.Errorf("%w: loading the device state: %w", ErrRestore, err)
	}
	took := time.Since(start)
	if f.Configuration {
		// Not left on in the guest's QEMU (libvirt's, after a failover
		// into its standby domain): a later virsh save would leave RAM
		// out of the image.
		if err := qemu.SetCapability(ctx, mon, qemu.IgnoreShared, false); err != nil {
			return took, fmt.Errorf("%w: %w", ErrRestore, err)
		}
	}
	return took, nil
}

// Resume continues the loaded guest and checks that it runs.
func Resume(ctx context.Context, mon qemu.Monitor) (time.Duration, error) {
	start := time.Now()
	if err := qemu.Cont(ctx, mon); err != nil {
		return 0, fmt.Errorf("%w: cont: %w", ErrRestore, err)
	}
	st, err := qemu.Status(ctx, mon)
	if err != nil {
		return 0, fmt.Errorf("%w: query-status: %w", ErrRestore, err)
	}
	if st != "running" {
		return 0, fmt.Errorf("%w: guest is %q after cont, not running", ErrRestore, st)
	}
	return time.Since(start), nil
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

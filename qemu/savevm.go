package qemu

import (
	"fmt"
	"io"
	"os"
)

// StateFormat says how a checkpoint's device state was saved, which decides
// how QEMU must be told to load it.
type StateFormat struct {
	// Configuration: the stream starts with a configuration section, as a
	// migration writes it (DeviceSaver with Migrate: migrate with
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
		return StateFormat{}, fmt.Errorf("qemu: device state does not start with a QEVM header")
	}
	if v := int(head[4])<<24 | int(head[5])<<16 | int(head[6])<<8 | int(head[7]); v != savevmVersion {
		return StateFormat{}, fmt.Errorf("qemu: device state has savevm version %d, want %d", v, savevmVersion)
	}
	return StateFormat{Configuration: head[8] == sectionConfiguration}, nil
}

// ReadStateFormat inspects a saved device state file.
func ReadStateFormat(path string) (StateFormat, error) {
	f, err := os.Open(path)
	if err != nil {
		return StateFormat{}, fmt.Errorf("qemu: %w", err)
	}
	defer f.Close()
	head := make([]byte, 9)
	if _, err := io.ReadFull(f, head); err != nil {
		return StateFormat{}, fmt.Errorf("qemu: read device state %s: %w", path, err)
	}
	return ParseStateFormat(head)
}

// RestoreArgs are the QEMU arguments that make a freshly started QEMU wait
// for the device state of a checkpoint: -incoming defer; -S, so that the
// guest stays paused once it is loaded until the caller continues it (a
// state saved with xen-save-devices-state says "running" and would start
// the guest at once); and, for a state without a configuration section,
// telling QEMU not to expect one. The rest of the command line must be the
// primary's, with the RAM backend's mem-path pointing at the backup's RAM
// image.
func RestoreArgs(f StateFormat) []string {
	args := []string{"-incoming", "defer", "-S"}
	if !f.Configuration {
		args = append(args, "-global", "migration.send-configuration=off")
	}
	return args
}

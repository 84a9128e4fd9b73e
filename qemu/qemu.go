package qemu

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// Monitor is the part of a QMP client the commands use (*qmp.Client).
type Monitor interface {
	Execute(ctx context.Context, command string, args, result any) error
}

// hmp runs a human monitor command through QMP and returns its text.
func hmp(ctx context.Context, mon Monitor, command string) (string, error) {
	return run[string](ctx, mon, "human-monitor-command", map[string]string{"command-line": command})
}

// run executes command and decodes its return value into a T.
func run[T any](ctx context.Context, mon Monitor, command string, args any) (T, error) {
	var v T
	err := mon.Execute(ctx, command, args, &v)
	return v, err
}

// Stop pauses the guest (QMP stop). QEMU returns once the guest's vCPUs
// stopped and its in-flight I/O drained.
func Stop(ctx context.Context, mon Monitor) error { return mon.Execute(ctx, "stop", nil, nil) }

// Cont resumes the guest (QMP cont).
func Cont(ctx context.Context, mon Monitor) error { return mon.Execute(ctx, "cont", nil, nil) }

// Quit ends QEMU (QMP quit).
func Quit(ctx context.Context, mon Monitor) error { return mon.Execute(ctx, "quit", nil, nil) }

// Status returns the guest's run state as query-status reports it
// ("running", "paused", "inmigrate", ...).
func Status(ctx context.Context, mon Monitor) (string, error) {
	st, err := run[struct {
		Status string `json:"status"`
	}](ctx, mon, "query-status", nil)
	return st.Status, err
}

// HasCommand reports whether QEMU offers the QMP command.
func HasCommand(ctx context.Context, mon Monitor, name string) (bool, error) {
	type cmd struct {
		Name string `json:"name"`
	}
	cmds, err := run[[]cmd](ctx, mon, "query-commands", nil)
	if err != nil {
		return false, err
	}
	for _, c := range cmds {
		if c.Name == name {
			return true, nil
		}
	}
	return false, nil
}

// Announce has QEMU announce the guest's NICs on the network (QMP
// announce-self: gratuitous RARP frames from each NIC's MAC address), so
// that switches learn the port the guest is behind now. The timing is
// QEMU's default after a migration: 5 rounds, 50 ms then 150, 250, ... up
// to 550 ms apart.
func Announce(ctx context.Context, mon Monitor) error {
	args := struct {
		Initial int `json:"initial"`
		Max     int `json:"max"`
		Rounds  int `json:"rounds"`
		Step    int `json:"step"`
	}{Initial: 50, Max: 550, Rounds: 5, Step: 100}
	if err := mon.Execute(ctx, "announce-self", args, nil); err != nil {
		return fmt.Errorf("announce-self: %w", err)
	}
	return nil
}

// WaitStreamConnected waits until QEMU has taken a connection on its
// `-netdev stream,server=on` socket at path: until then the netdev's link
// is down and QEMU drops what the guest sends through it. A client's
// connect returns once the kernel queued it, before QEMU's main loop
// accepted it; a guest continued in between loses its first packets.
// QEMU names the socket in "info network" once it accepted (both 7.2 and
// 10.0), which is what this polls.
func WaitStreamConnected(ctx context.Context, mon Monitor, path string, poll time.Duration) error {
	want := "unix:" + path
	for {
		out, err := hmp(ctx, mon, "info network")
		if err != nil {
			return fmt.Errorf("info network: %w", err)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "type=stream") && strings.HasSuffix(strings.TrimSpace(l), want) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("QEMU has not taken the connection on %s: %w (info network: %q)", path, context.Cause(ctx), out)
		case <-time.After(poll):
		}
	}
}

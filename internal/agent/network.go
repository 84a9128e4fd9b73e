package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/remus-kvm/remus/netbuffer"
)

// NetConfig puts remusd between the guest's NIC and the network: QEMU's
// `-netdev stream,server=on,addr.type=unix,addr.path=GUEST` on one side, a
// tap device on the other. On the primary the guest's outbound frames are
// then held until their epoch commits (output commit); on the backup the
// restored guest's NIC is connected to the network after a failover.
type NetConfig struct {
	Guest string // QEMU's -netdev stream socket (QEMU listens)
	Tap   string // the tap device towards the network
	Netns string // the tap's network namespace (a path); empty: remusd's own
	// HoldCap bounds the bytes of output held; 0 is netbuffer's default.
	HoldCap int64
	// NoOutputCommit relays output straight through even while protected:
	// a client may then see replies that a failover takes back.
	NoOutputCommit bool
	// PlugTap, on the primary, holds the output of a guest whose NIC is a
	// tap (-netdev tap, the libvirt default) in the kernel instead: the
	// tap's ingress goes through an IFB device with the sch_plug qdisc.
	// It allows one epoch in flight.
	PlugTap string
}

// Enabled reports whether remusd relays the guest's network.
func (n NetConfig) Enabled() bool { return n.Guest != "" }

// Validate rejects half a network configuration.
func (n NetConfig) Validate() error {
	switch {
	case n.Guest == "" && (n.Tap != "" || n.Netns != ""):
		return errors.New("--net-tap needs --net-guest (the guest NIC's stream socket)")
	case n.Guest != "" && n.Tap == "":
		return errors.New("--net-guest needs --net-tap (the tap towards the network)")
	case n.HoldCap < 0:
		return errors.New("--net-hold-cap must not be negative")
	case n.PlugTap != "" && n.Guest != "":
		return errors.New("--net-plug-tap (a tap NIC, buffered in the kernel) and --net-guest (a stream NIC, relayed by remusd) exclude each other")
	}
	return nil
}

// guestNet is the running relay for the guest's NIC.
type guestNet struct {
	relay *netbuffer.Relay
	done  chan error // Run's result
}

// startNetwork connects to the guest NIC's socket (waiting up to timeout
// for QEMU to create it) and to the tap, and runs the relay in PassThrough
// mode until ctx ends or a side fails.
func startNetwork(ctx context.Context, cfg NetConfig, timeout time.Duration, log *slog.Logger) (*guestNet, error) {
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	guest, err := redial(dctx, 5*time.Millisecond, func(ctx context.Context) (net.Conn, error) {
		return d.DialContext(ctx, "unix", cfg.Guest)
	})
	if err != nil {
		return nil, fmt.Errorf("guest NIC socket %s: %w", cfg.Guest, err)
	}
	tap, err := netbuffer.OpenTapIn(cfg.Netns, cfg.Tap)
	if err != nil {
		guest.Close()
		return nil, err
	}
	var opts []netbuffer.Option
	if cfg.HoldCap > 0 {
		opts = append(opts, netbuffer.WithHoldCap(cfg.HoldCap))
	}
	n := &guestNet{relay: netbuffer.NewRelay(guest, tap, log.With("part", "netbuffer"), opts...), done: make(chan error, 1)}
	go func() { n.done <- n.relay.Run(ctx) }()
	return n, nil
}

// output adapts the relay to the epoch loop.
type output struct{ r *netbuffer.Relay }

func (o output) Hold() error { o.r.Hold(); return nil }

func (o output) Cut(ctx context.Context, epoch uint64) error { return o.r.Cut(ctx, epoch) }

func (o output) Commit(epoch uint64) netbuffer.Release { return o.r.Commit(epoch) }

func (o output) PassThrough() { o.r.PassThrough() }

// plugOutput adapts the kernel buffer to the epoch loop.
type plugOutput struct {
	kb  *netbuffer.KernelBuffer
	log *slog.Logger
}

func (o plugOutput) Hold() error { return o.kb.Hold() }

func (o plugOutput) Cut(ctx context.Context, epoch uint64) error { return o.kb.Cut(epoch) }

// Commit releases the epoch's output in the kernel, which does not count
// it: the Release names only the epoch.
func (o plugOutput) Commit(epoch uint64) netbuffer.Release {
	if err := o.kb.Commit(epoch); err != nil {
		o.log.Error("release the guest's output", "epoch", epoch, "err", err)
	}
	return netbuffer.Release{Epoch: epoch}
}

func (o plugOutput) PassThrough() {
	if err := o.kb.PassThrough(); err != nil {
		o.log.Error("let the guest's output through: its network may be stuck", "err", err)
	}
}

// RunRelay relays a guest's NIC to its tap with nothing held, until ctx
// ends or a side fails: the network of a guest that runs unprotected
// (after remusctl unprotect) whose NIC is a -netdev stream socket, which
// has no other way to the network.
func RunRelay(ctx context.Context, cfg NetConfig, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	if !cfg.Enabled() {
		return errors.New("relay: no guest NIC socket (--net-guest)")
	}
	n, err := startNetwork(ctx, cfg, 30*time.Second, log)
	if err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	log.Info("relaying the guest's NIC, nothing held: the guest is not protected", "guest", cfg.Guest, "tap", cfg.Tap)
	err = <-n.done
	if ctx.Err() != nil {
		return nil
	}
	if errors.Is(err, netbuffer.ErrGuestDisconnected) {
		log.Info("the guest's NIC closed (its QEMU exited): relay ends")
		return nil
	}
	return fmt.Errorf("relay: %w", err)
}

// Command remus-demo is what `make demo` runs: it boots the test guest on an
// outside network of its own, shows its counter service answering over TCP,
// protects it with the two remusd agents, kills the primary QEMU and the
// primary remusd together like a host losing power, and shows the same guest
// (same boot, counter intact) answering again from the backup.
//
// It needs root (a network namespace and a tap device), QEMU and the test
// guest's kernel; `make setup` installs both.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/remus-kvm/remus/testvm"
)

func main() {
	// The demo tells its own story, the accelerator and why included; the
	// library's warnings would only repeat it.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := app().RunContext(ctx, os.Args); err != nil {
		if errors.Is(err, errInterrupted) {
			fmt.Fprintln(os.Stderr, "remus-demo: interrupted; everything the demo started was cleaned up")
			stop()
			os.Exit(130)
		}
		fmt.Fprintf(os.Stderr, "remus-demo: %v\n", err)
		stop()
		os.Exit(1)
	}
}

func app() *cli.App {
	return &cli.App{
		Name:      "remus-demo",
		Usage:     "show a VM protected by remus-kvm surviving the death of its host",
		UsageText: "remus-demo [options]   (as root)",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "qemu", Value: testvm.DefaultQEMU, EnvVars: []string{testvm.QEMUEnv},
				Usage: "QEMU system emulator to run the guest with"},
			&cli.StringFlag{Name: "accel", Value: "auto", EnvVars: []string{testvm.AccelEnv}, Usage: testvm.AccelUsage},
			&cli.StringFlag{Name: "remusd", Usage: "remusd binary to use (default: build cmd/remusd of this module)"},
			&cli.DurationFlag{Name: "protect-for", Value: 5 * time.Second,
				Usage: "how long the guest runs protected, serving the client, before the primary is killed"},
			&cli.IntFlag{Name: "dirty", Value: 4000, Usage: "pages per second the guest's page dirtier writes (0: off)"},
			&cli.DurationFlag{Name: "epoch", Value: 25 * time.Millisecond, Usage: "checkpoint interval"},
			&cli.DurationFlag{Name: "heartbeat-timeout", Value: time.Second,
				Usage: "silence after which the backup declares the primary dead (raise it on a loaded machine)"},
		},
		HideHelpCommand: true,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return fmt.Errorf("unexpected arguments %q (see --help)", c.Args().Slice())
			}
			return run(c.Context, config{
				QEMU:             c.String("qemu"),
				Accel:            c.String("accel"),
				Remusd:           c.String("remusd"),
				ProtectFor:       c.Duration("protect-for"),
				DirtyPerSec:      c.Int("dirty"),
				Epoch:            c.Duration("epoch"),
				HeartbeatTimeout: c.Duration("heartbeat-timeout"),
			}, os.Stdout)
		},
	}
}

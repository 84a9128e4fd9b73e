// Command remusctl drives remus-kvm from the operator's side: protect,
// status, unprotect and switchover talk to this host's remusd daemon (or,
// with --control, to one agent); check tells whether a libvirt domain can
// be protected and prints the XML that fixes what cannot; standby-xml
// makes its standby domain for the backup host; hook is what libvirt's
// qemu hook runs; bench boots
// the test guest with a chosen workload on this machine, protects it with a
// primary and a backup remusd over loopback for a fixed time, and prints
// what protection costs and achieves as one table (and as JSON for
// machines).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/remus-kvm/remus/testvm"
	"github.com/urfave/cli/v2"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := app().RunContext(ctx, os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "remusctl: %v\n", err)
		os.Exit(1)
	}
}

func app() *cli.App {
	return &cli.App{
		Name:  "remusctl",
		Usage: "operate remus-kvm protection",
		Commands: append(append([]*cli.Command{protectCommand()}, controlCommands()...), checkCommand(), standbyCommand(), hookCommand(), &cli.Command{
			Name:  "bench",
			Usage: "measure protection of the test guest under a workload (needs root, QEMU and the guest kernel: make setup)",
			Description: "Boots the 256 MiB test guest with the workload, measures the counter service unprotected, protects the guest\n" +
				"for --for with a primary and a backup remusd on this machine, and prints one table: epochs/s, pause p50/p99\n" +
				"by step, dirty pages and bytes on the wire per epoch (raw and as sent), CPU used by the primary remusd, and\n" +
				"the client's requests/s and round trips protected vs unprotected on the same connection.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "workload", Value: "dirtier", Usage: "idle, dirtier (page dirtier at --dirty pages/s), compile (writes and gzips source-like text) or counter (the counter service under load only)"},
				&cli.IntFlag{Name: "dirty", Value: 40000, Usage: "pages per second for the dirtier workload"},
				&cli.DurationFlag{Name: "for", Value: 10 * time.Second, Usage: "how long to run protected"},
				&cli.DurationFlag{Name: "epoch", Value: 25 * time.Millisecond, Usage: "checkpoint interval"},
				&cli.IntFlag{Name: "ram", Value: 256, Usage: "guest RAM in `MiB`"},
				&cli.StringFlag{Name: "tracker", Value: "auto", Usage: "remusd's dirty-page tracker (its --tracker)"},
				&cli.StringFlag{Name: "min-run", Value: "90%", Usage: "remusd's --min-run: the least share of time the guest runs"},
				&cli.Int64Flag{Name: "delta-cache", Usage: "remusd's --delta-cache: `BYTES` of sent pages remembered for XOR deltas (0: remusd's default)"},
				&cli.BoolFlag{Name: "compress", Value: true, Usage: "compress pages on the link"},
				&cli.StringFlag{Name: "json", Usage: "also write the results as JSON to this file (- for standard output)"},
				&cli.StringFlag{Name: "qemu", Value: testvm.DefaultQEMU, EnvVars: []string{testvm.QEMUEnv}, Usage: "QEMU system emulator"},
				&cli.StringFlag{Name: "accel", Value: "auto", EnvVars: []string{testvm.AccelEnv}, Usage: testvm.AccelUsage},
				&cli.StringFlag{Name: "remusd", Usage: "remusd binary (default: built from this module)"},
			},
			Action: func(c *cli.Context) error {
				o := benchOptions{Workload: c.String("workload"), Dirty: c.Int("dirty"), For: c.Duration("for"), Epoch: c.Duration("epoch"),
					RAMMiB: c.Int("ram"), Tracker: c.String("tracker"), MinRun: c.String("min-run"), DeltaCache: c.Int64("delta-cache"),
					Compress: c.Bool("compress"), QEMU: c.String("qemu"), Accel: c.String("accel"), Remusd: c.String("remusd")}
				r, err := runBench(c.Context, o, os.Stderr)
				if err != nil {
					return err
				}
				printTable(os.Stdout, r)
				if p := c.String("json"); p != "" {
					return writeJSON(p, r)
				}
				return nil
			},
		}),
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/remus-kvm/remus/internal/agent"
)

// controlFlag names the primary remusd's control socket.
var controlFlag = &cli.StringFlag{Name: "control", Usage: "control socket of the primary remusd (remusd primary --control; default STATE-DIR/remusd.sock)", Required: true}

func controlCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:  "status",
			Usage: "show what the primary remusd is doing: syncing (with progress), protecting, unprotected or stopped, and why",
			Flags: []cli.Flag{controlFlag, &cli.BoolFlag{Name: "json", Usage: "print the status as JSON"},
				&cli.DurationFlag{Name: "watch", Usage: "print it again every `INTERVAL` (1s, ...) until interrupted or remusd exits"}},
			Action: func(c *cli.Context) error {
				for {
					var st agent.PrimaryStatus
					if err := agent.CallControl(c.Context, c.String("control"), http.MethodGet, agent.ControlStatusPath, 5*time.Second, &st); err != nil {
						return err
					}
					if c.Bool("json") {
						enc := json.NewEncoder(os.Stdout)
						enc.SetIndent("", "  ")
						if err := enc.Encode(st); err != nil {
							return err
						}
					} else {
						printStatus(os.Stdout, st, time.Now())
					}
					every := c.Duration("watch")
					if every <= 0 {
						return nil
					}
					select {
					case <-c.Context.Done():
						return nil
					case <-time.After(every):
					}
					fmt.Println()
				}
			},
		},
		{
			Name:  "switchover",
			Usage: "move the guest to the backup with nothing lost (planned maintenance of the primary host)",
			Description: "The primary remusd takes a final epoch with the guest paused, waits until the backup acknowledged it,\n" +
				"stops its QEMU and tells the backup to resume that epoch; with a witness it hands its lease over.\n" +
				"The guest's pause is one epoch's checkpoint plus the backup's restore; its TCP connections go on.\n" +
				"Refused when the guest is not protected; abandoned (the guest runs on here) when the backup does not\n" +
				"acknowledge the final epoch in time.",
			Flags: []cli.Flag{controlFlag},
			Action: func(c *cli.Context) error {
				var r agent.SwitchoverResult
				if err := agent.CallControl(c.Context, c.String("control"), http.MethodPost, agent.ControlSwitchoverPath, time.Minute, &r); err != nil {
					return fmt.Errorf("switchover: %w", err)
				}
				fmt.Printf("%s (%.0f ms)\n", r.Result, r.TookMS)
				return nil
			},
		},
		{
			Name:  "unprotect",
			Usage: "end protection: the guest runs on here, unprotected, and the primary remusd exits",
			Description: "As SIGTERM to the primary remusd: its session says goodbye and waits for the backup's confirmation that\n" +
				"it will not resume the guest, the disk mirror job and its node are removed, the migration capabilities\n" +
				"remusd changed are restored, and the guest's held output is let go. When the backup does not confirm\n" +
				"(unreachable), it may resume the guest: the primary's deadman then stops the guest here. The backup\n" +
				"remusd and its standby go on until stopped (a standby domain: virsh destroy and undefine it there).",
			Flags: []cli.Flag{controlFlag},
			Action: func(c *cli.Context) error {
				var r agent.UnprotectResult
				if err := agent.CallControl(c.Context, c.String("control"), http.MethodPost, agent.ControlUnprotectPath, time.Minute, &r); err != nil {
					return fmt.Errorf("unprotect: %w", err)
				}
				fmt.Println(r.Result)
				if !r.Confirmed {
					return cli.Exit("", 1)
				}
				return nil
			},
		},
	}
}

func printStatus(w io.Writer, st agent.PrimaryStatus, now time.Time) {
	fmt.Fprintf(w, "vm          %s\nrole        %s\nstate       %s\n", st.VM, st.Role, st.State)
	if st.Why != "" {
		fmt.Fprintf(w, "why         %s\n", st.Why)
	}
	if sp := st.Sync; sp != nil {
		fmt.Fprintf(w, "sync        round %d, %.0f%% of guest RAM sent (%d of %d pages sent so far)\n", sp.Round, sp.Percent, sp.Pages, sp.RAMPages)
	}
	if st.CommittedEpoch > 0 {
		fmt.Fprintf(w, "committed   epoch %d, %v ago\n", st.CommittedEpoch, now.Sub(st.CommittedAt).Round(time.Millisecond))
	}
	if st.Witness != "" {
		fmt.Fprintf(w, "witness     this host is %q; lease trusted for %.0f ms more\n", st.Witness, st.LeaseLeftMS)
		if st.WitnessError != "" {
			fmt.Fprintf(w, "            cannot read the witness: %s\n", st.WitnessError)
		} else {
			fmt.Fprintf(w, "            owner %q, active %q\n", st.WitnessOwner, st.WitnessActive)
		}
	} else {
		fmt.Fprintf(w, "witness     none (fail-stop assumed)\n")
	}
}

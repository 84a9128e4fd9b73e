package main

import (
	"bytes"
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

// statusControlFlag names either remusd's control socket.
var statusControlFlag = &cli.StringFlag{Name: "control", Usage: "control socket of the primary or backup remusd (remusd primary|backup --control; default STATE-DIR/remusd.sock)", Required: true}

func controlCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:  "status",
			Usage: "show what a remusd is doing, and why: the primary syncing (with progress), protecting, unprotected or stopped; the backup waiting, standby, failing over or failed over",
			Flags: []cli.Flag{statusControlFlag, &cli.BoolFlag{Name: "json", Usage: "print the status as JSON, as remusd answered it"},
				&cli.DurationFlag{Name: "watch", Usage: "print it again every `INTERVAL` (1s, ...) until interrupted or remusd exits"}},
			Action: func(c *cli.Context) error {
				for {
					var answer []byte
					if err := agent.CallControl(c.Context, c.String("control"), http.MethodGet, agent.ControlStatusPath, 5*time.Second, &answer); err != nil {
						return err
					}
					if c.Bool("json") {
						var b bytes.Buffer
						if err := json.Indent(&b, bytes.TrimSpace(answer), "", "  "); err != nil {
							return fmt.Errorf("status answer from %s: %w", c.String("control"), err)
						}
						b.WriteByte('\n')
						if _, err := b.WriteTo(os.Stdout); err != nil {
							return err
						}
					} else if err := printAnswer(os.Stdout, answer, time.Now()); err != nil {
						return fmt.Errorf("status answer from %s: %w", c.String("control"), err)
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

// printAnswer prints a GET /status answer: a primary's or a backup's
// status, as its role says.
func printAnswer(w io.Writer, answer []byte, now time.Time) error {
	var r struct {
		Role string `json:"role"`
	}
	if err := json.Unmarshal(answer, &r); err != nil {
		return err
	}
	switch r.Role {
	case "primary":
		var st agent.PrimaryStatus
		if err := json.Unmarshal(answer, &st); err != nil {
			return err
		}
		printStatus(w, st, now)
	case "backup":
		var st agent.BackupStatus
		if err := json.Unmarshal(answer, &st); err != nil {
			return err
		}
		printBackupStatus(w, st, now)
	default:
		return fmt.Errorf("unknown role %q", r.Role)
	}
	return nil
}

func printStatus(w io.Writer, st agent.PrimaryStatus, now time.Time) {
	fmt.Fprintf(w, "vm          %s\nrole        %s\nstate       %s\n", st.VM, st.Role, st.State)
	if st.Why != "" {
		fmt.Fprintf(w, "why         %s\n", st.Why)
	}
	if sp := st.Sync; sp != nil {
		fmt.Fprintf(w, "sync        round %d, %.0f%% of guest RAM sent (%d of %d pages sent so far)\n", sp.Round, sp.Percent, sp.Pages, sp.RAMPages)
	}
	if st.Peer != "" {
		fmt.Fprintf(w, "backup      %s\n", st.Peer)
	}
	if st.CommittedEpoch > 0 {
		fmt.Fprintf(w, "committed   epoch %d, %v ago\n", st.CommittedEpoch, now.Sub(st.CommittedAt).Round(time.Millisecond))
	}
	if r := st.Recent; r != nil {
		fmt.Fprintf(w, "recent      %.1f epochs/s, pause p50 %.1f ms p99 %.1f ms, raw %s/s, wire %s/s, held %s",
			r.EpochsPerS, r.PauseP50MS, r.PauseP99MS, humanBytes(r.RawBytesPerS), humanBytes(r.WireBytesPerS), humanBytes(float64(r.HeldOutputBytes)))
		if r.WindowS < agent.RecentWindow.Seconds() {
			// More epochs than the agent remembers: a shorter span.
			fmt.Fprintf(w, " (over the last %.2fs)", r.WindowS)
		}
		fmt.Fprintln(w)
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

func printBackupStatus(w io.Writer, st agent.BackupStatus, now time.Time) {
	fmt.Fprintf(w, "vm          %s\nrole        %s\nstate       %s\n", st.VM, st.Role, st.State)
	if st.Why != "" {
		fmt.Fprintf(w, "why         %s\n", st.Why)
	}
	if st.CommittedEpoch > 0 {
		fmt.Fprintf(w, "committed   epoch %d, %v ago\n", st.CommittedEpoch, now.Sub(st.CommittedAt).Round(time.Millisecond))
	}
	if st.Primary != "" {
		fmt.Fprintf(w, "primary     %s\n", st.Primary)
	}
	if r := st.Failover; r != nil {
		if r.Running.IsZero() {
			fmt.Fprintf(w, "failover    epoch %d not resumed (cause: %s)\n", r.Epoch, r.Cause)
		} else {
			fmt.Fprintf(w, "failover    epoch %d resumed in QEMU pid %d, %v ago (detection %.0f ms, clear %.0f ms, restore %.0f ms; cause: %s)\n",
				r.Epoch, r.QEMUPID, now.Sub(r.Running).Round(time.Millisecond), r.DetectionMS, r.ClearMS, r.RestoreMS, r.Cause)
		}
	}
}

// humanBytes writes a byte count with a binary unit (B, KiB, MiB, GiB,
// TiB).
func humanBytes(n float64) string {
	const units = "KMGT"
	if n < 1024 {
		return fmt.Sprintf("%.0f B", n)
	}
	i := -1
	for n >= 1024 && i < len(units)-1 {
		n /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %ciB", n, units[i])
}

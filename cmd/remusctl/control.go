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
	"github.com/remus-kvm/remus/internal/daemon"
)

// controlFlag names one agent's control socket: the commands then talk to
// that agent instead of the host's daemon.
var controlFlag = &cli.StringFlag{Name: "control", Usage: "instead of the daemon: the control socket of one remusd primary or backup (its --control; default STATE-DIR/remusd.sock)"}

func controlCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "status",
			Usage:     "show what remusd does for each VM of this host, or for one: role, state and why, the sync's progress, epochs, pauses, bytes, held output, witness",
			ArgsUsage: "[VM]",
			Description: "Asks this host's remusd daemon (--daemon) about every VM it protects or stands by for, or about VM.\n" +
				"States: on the primary host syncing (the first copy of guest RAM, with its progress), protected,\n" +
				"unprotected (why), stopped (no witness lease and no backup); on the backup host waiting, standby\n" +
				"(resumable), failing-over, failed-over (the guest runs here); either: ended (why), failed.\n" +
				"With --control, asks one agent (remusd primary or backup) instead.",
			Flags: []cli.Flag{daemonFlag, controlFlag, &cli.BoolFlag{Name: "json", Usage: "print the status as JSON"},
				&cli.DurationFlag{Name: "watch", Usage: "print it again every `INTERVAL` (1s, ...) until interrupted"}},
			Action: func(c *cli.Context) error {
				for {
					if err := printStatusOnce(c); err != nil {
						return err
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
			Name:      "switchover",
			Usage:     "move a protected VM to its backup host with nothing lost (planned maintenance of this host)",
			ArgsUsage: "VM",
			Description: "The primary agent takes a final epoch with the guest paused, waits until the backup acknowledged it,\n" +
				"stops its QEMU and tells the backup to resume that epoch; with a witness it hands its lease over.\n" +
				"The guest's pause is one epoch's checkpoint plus the backup's restore; its TCP connections go on, and\n" +
				"the standby domain runs it under the backup host's libvirt. Refused when the guest is not protected;\n" +
				"abandoned (the guest runs on here) when the backup does not acknowledge the final epoch in time.",
			Flags: []cli.Flag{daemonFlag, controlFlag},
			Action: func(c *cli.Context) error {
				if c.IsSet("control") {
					var r agent.SwitchoverResult
					if err := agent.CallControl(c.Context, c.String("control"), http.MethodPost, agent.ControlSwitchoverPath, time.Minute, &r); err != nil {
						return fmt.Errorf("switchover: %w", err)
					}
					fmt.Printf("%s (%.0f ms)\n", r.Result, r.TookMS)
					return nil
				}
				name, err := oneArg(c, "VM")
				if err != nil {
					return err
				}
				r, err := daemon.NewClient(c.String("daemon")).Switchover(c.Context, name)
				if err != nil {
					return fmt.Errorf("switchover %s: %w", name, err)
				}
				fmt.Printf("%s (%.0f ms)\n", r.Result, r.TookMS)
				return nil
			},
		},
		{
			Name:      "unprotect",
			Usage:     "end a VM's protection on both hosts: the guest runs on here, unprotected",
			ArgsUsage: "VM",
			Description: "The primary agent's session says goodbye and waits for the backup's confirmation that it will not\n" +
				"resume the guest; the disk mirror job and its node are removed, the migration capabilities remusd\n" +
				"changed are restored, the guest's held output is let go, and the agent exits. Then the backup host's\n" +
				"daemon stops its agent and removes the standby domain. When the backup does not confirm (unreachable),\n" +
				"it may resume the guest: the primary's deadman then stops the guest here, and remusctl exits 1.\n" +
				"On the backup host (its primary gone), unprotect removes the standby, unless it runs the guest.\n" +
				"With --control, only that primary agent ends its session (the backup and its standby go on).",
			Flags: []cli.Flag{daemonFlag, controlFlag},
			Action: func(c *cli.Context) error {
				if c.IsSet("control") {
					var r agent.UnprotectResult
					if err := agent.CallControl(c.Context, c.String("control"), http.MethodPost, agent.ControlUnprotectPath, time.Minute, &r); err != nil {
						return fmt.Errorf("unprotect: %w", err)
					}
					fmt.Println(r.Result)
					if !r.Confirmed {
						return cli.Exit("", 1)
					}
					return nil
				}
				name, err := oneArg(c, "VM")
				if err != nil {
					return err
				}
				r, err := daemon.NewClient(c.String("daemon")).Unprotect(c.Context, name)
				if err != nil {
					return fmt.Errorf("unprotect %s: %w", name, err)
				}
				fmt.Println(r.Result)
				if !r.Complete {
					return cli.Exit("", 1)
				}
				return nil
			},
		},
	}
}

// printStatusOnce prints the status once: one agent's (--control), one
// VM's or every VM's (the daemon).
func printStatusOnce(c *cli.Context) error {
	var v any
	switch {
	case c.IsSet("control"):
		var answer []byte
		if err := agent.CallControl(c.Context, c.String("control"), http.MethodGet, agent.ControlStatusPath, 5*time.Second, &answer); err != nil {
			return err
		}
		if !c.Bool("json") {
			if err := printAnswer(os.Stdout, answer, time.Now()); err != nil {
				return fmt.Errorf("status answer from %s: %w", c.String("control"), err)
			}
			return nil
		}
		v = json.RawMessage(bytes.TrimSpace(answer))
	case c.NArg() > 0:
		st, err := daemon.NewClient(c.String("daemon")).Status(c.Context, c.Args().First())
		if err != nil {
			return err
		}
		if !c.Bool("json") {
			printVM(os.Stdout, st, time.Now())
			return nil
		}
		v = st
	default:
		vms, err := daemon.NewClient(c.String("daemon")).List(c.Context)
		if err != nil {
			return err
		}
		if !c.Bool("json") {
			printVMs(os.Stdout, vms)
			return nil
		}
		v = vms
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
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

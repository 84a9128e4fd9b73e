package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/internal/daemon"
)

// daemonFlag names the local remusd daemon's control socket.
var daemonFlag = &cli.StringFlag{Name: "daemon", Value: daemon.DefaultControl, EnvVars: []string{"REMUS_DAEMON"},
	Usage: "control socket of this host's remusd daemon"}

func protectCommand() *cli.Command {
	return &cli.Command{
		Name:      "protect",
		Usage:     "protect a running libvirt domain of this host, with --peer as its backup host",
		ArgsUsage: "DOMAIN",
		Description: "This host's remusd daemon looks DOMAIN up in libvirt and checks it as remusctl check does: a domain that\n" +
			"cannot be protected is refused with the XML that fixes it, and left as it is. Then the peer's daemon\n" +
			"defines and starts the standby domain (the same XML, paused, waiting with -incoming defer) and its backup\n" +
			"agent, and this host's daemon starts the primary agent, which copies guest RAM to the backup while the\n" +
			"guest runs, then checkpoints it every epoch. With --wait, remusctl shows that copy's progress and returns\n" +
			"once the first epoch is committed on the backup.",
		Flags: []cli.Flag{daemonFlag,
			&cli.StringFlag{Name: "peer", Usage: "the backup host's remusd, `HOST` or HOST:PORT (port 7790 by default); required the first time (a VM protected before, whose backup went, keeps its flags)"},
			&cli.StringFlag{Name: "tap", Usage: "for a NIC that is a -netdev stream socket: this host's tap device its frames are relayed to"},
			&cli.StringFlag{Name: "peer-tap", Usage: "the same on the backup host, for after a failover"},
			&cli.StringFlag{Name: "netns", Usage: "network namespace of --tap, as a path (/run/netns/NAME)"},
			&cli.StringFlag{Name: "peer-netns", Usage: "network namespace of --peer-tap on the backup host"},
			&cli.DurationFlag{Name: "epoch", Usage: "checkpoint interval (default remusd's, 25ms)"},
			&cli.BoolFlag{Name: "wait", Usage: "show the first sync's progress and return once protected"},
			&cli.DurationFlag{Name: "timeout", Value: 30 * time.Minute, Usage: "give up waiting after this long (with --wait)"},
		},
		Action: func(c *cli.Context) error {
			name, err := oneArg(c, "DOMAIN")
			if err != nil {
				return err
			}
			cl := daemon.NewClient(c.String("daemon"))
			st, err := cl.Protect(c.Context, name, daemon.ProtectRequest{Peer: c.String("peer"), Epoch: c.Duration("epoch"),
				Tap: c.String("tap"), PeerTap: c.String("peer-tap"), Netns: c.String("netns"), PeerNetns: c.String("peer-netns")})
			var refused *daemon.RefusedError
			if errors.As(err, &refused) {
				fmt.Fprintln(os.Stderr, refused.Error())
				printProblems(os.Stderr, refused.Problems)
				return cli.Exit("", 1)
			}
			if err != nil {
				return fmt.Errorf("protect %s: %w", name, err)
			}
			fmt.Printf("%s: protecting with %s as its backup (agent pid %d)\n", name, st.Peer, st.AgentPID)
			if !c.Bool("wait") {
				return nil
			}
			ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
			defer cancel()
			return waitProtected(ctx, cl, name, os.Stdout)
		},
	}
}

// waitProtected follows a VM's status until it is protected, showing
// the first sync's progress.
func waitProtected(ctx context.Context, cl *daemon.Client, name string, w io.Writer) error {
	last := ""
	for {
		st, err := cl.Status(ctx, name)
		if err != nil {
			return err
		}
		line := st.State
		switch st.State {
		case daemon.StateProtected:
			fmt.Fprintf(w, "%s: protected\n", name)
			return nil
		case daemon.StateSyncing:
			var ps agent.PrimaryStatus
			if json.Unmarshal(st.Agent, &ps) == nil && ps.Sync != nil {
				line = fmt.Sprintf("syncing %s %3.0f%% (round %d)", bar(ps.Sync.Percent, 30), ps.Sync.Percent, ps.Sync.Round)
			}
		case daemon.StateEnded, daemon.StateFailed, daemon.StateStopped:
			return fmt.Errorf("%s: %s: %s", name, st.State, st.Why)
		}
		if line != last {
			fmt.Fprintf(w, "%s: %s\n", name, line)
			last = line
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not protected yet (%s: %s): %w", name, st.State, st.Why, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func bar(percent float64, width int) string {
	n := min(max(int(percent*float64(width)/100+0.5), 0), width)
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

func oneArg(c *cli.Context, what string) (string, error) {
	if c.NArg() != 1 {
		return "", fmt.Errorf("want one %s (flags go before it), got %d arguments", what, c.NArg())
	}
	return c.Args().First(), nil
}

func hookCommand() *cli.Command {
	return &cli.Command{
		Name:      "hook",
		Usage:     "run by libvirt's qemu hook (make install: /etc/libvirt/hooks/qemu.d/remus): hands a marked domain's events to remusd",
		ArgsUsage: "DOMAIN OPERATION SUB-OPERATION EXTRA < DOMAIN-XML",
		Description: "libvirt runs its qemu hook with the domain's name, the operation and sub-operation, and the domain's XML\n" +
			"on standard input. For a domain with remus metadata (<remus:protect peer=... role=primary/> in <metadata>)\n" +
			"this hands the event to this host's remusd daemon, which answers at once: the domain is protected once it\n" +
			"runs. Other domains cost nothing. The hook never fails a domain's start: errors go to standard error\n" +
			"(libvirtd's log).",
		Flags: []cli.Flag{daemonFlag},
		Action: func(c *cli.Context) error {
			if c.NArg() < 3 {
				return fmt.Errorf("want DOMAIN OPERATION SUB-OPERATION, got %d arguments", c.NArg())
			}
			xml, err := io.ReadAll(io.LimitReader(os.Stdin, 16<<20))
			if err != nil {
				fmt.Fprintf(os.Stderr, "remusctl hook: read the domain XML: %v\n", err)
				return nil
			}
			if !strings.Contains(string(xml), "remus-kvm.org/xmlns/domain") {
				return nil // not marked: nothing to hand over
			}
			ctx, cancel := context.WithTimeout(c.Context, 10*time.Second)
			defer cancel()
			ev := daemon.HookEvent{Domain: c.Args().Get(0), Op: c.Args().Get(1), SubOp: c.Args().Get(2), XML: string(xml)}
			res, err := daemon.NewClient(c.String("daemon")).Hook(ctx, ev)
			if err != nil {
				fmt.Fprintf(os.Stderr, "remusctl hook: %s %s %s: %v\n", ev.Domain, ev.Op, ev.SubOp, err)
				return nil
			}
			fmt.Fprintf(os.Stderr, "remusctl hook: %s\n", res.Result)
			return nil
		},
	}
}

// printVMs prints the daemon's VMs, a line each.
func printVMs(w io.Writer, vms []daemon.VMStatus) {
	if len(vms) == 0 {
		fmt.Fprintln(w, "no VM is protected on this host")
		return
	}
	fmt.Fprintf(w, "%-20s %-8s %-14s %-20s %s\n", "VM", "ROLE", "STATE", "PEER", "DETAIL")
	for _, v := range vms {
		fmt.Fprintf(w, "%-20s %-8s %-14s %-20s %s\n", v.Name, v.Role, v.State, v.Peer, vmDetail(v))
	}
}

// vmDetail is a VM's status in a few words: the last commit and pause,
// the sync's progress, or why.
func vmDetail(v daemon.VMStatus) string {
	var a struct {
		CommittedEpoch uint64             `json:"committed_epoch"`
		Sync           *agent.SyncStatus  `json:"sync"`
		Recent         *agent.RecentStats `json:"recent"`
	}
	json.Unmarshal(v.Agent, &a)
	switch {
	case a.Sync != nil:
		return fmt.Sprintf("%.0f%% of RAM sent (round %d)", a.Sync.Percent, a.Sync.Round)
	case a.Recent != nil && a.Recent.EpochsPerS > 0:
		return fmt.Sprintf("epoch %d, %.0f epochs/s, pause p50 %.1f ms", a.CommittedEpoch, a.Recent.EpochsPerS, a.Recent.PauseP50MS)
	case a.CommittedEpoch > 0:
		return fmt.Sprintf("epoch %d", a.CommittedEpoch)
	}
	return v.Why
}

// printVM prints one VM: the daemon's view, then its agent's status.
func printVM(w io.Writer, v daemon.VMStatus, now time.Time) {
	fmt.Fprintf(w, "vm          %s\nrole        %s (domain %s, peer %s)\nstate       %s\n", v.Name, v.Role, v.Domain, v.Peer, v.State)
	if v.Why != "" {
		fmt.Fprintf(w, "why         %s\n", v.Why)
	}
	if v.AgentPID > 0 {
		fmt.Fprintf(w, "agent       pid %d since %s", v.AgentPID, v.Since.Format(time.RFC3339))
		if v.Restarts > 0 {
			fmt.Fprintf(w, ", started again %d times", v.Restarts)
		}
		fmt.Fprintln(w)
	}
	switch {
	case v.PeerView != nil:
		pv := v.PeerView
		fmt.Fprintf(w, "peer        %s on %s (domain %s)", pv.State, v.Peer, pv.Domain)
		if d := vmDetail(*pv); d != "" {
			fmt.Fprintf(w, ": %s", d)
		}
		fmt.Fprintln(w)
	case v.PeerError != "":
		fmt.Fprintf(w, "peer        %s: %s\n", v.Peer, v.PeerError)
	}
	if len(v.Agent) > 0 {
		fmt.Fprintln(w, "--- agent")
		if err := printAnswer(w, v.Agent, now); err != nil {
			fmt.Fprintf(w, "(unreadable: %v)\n", err)
		}
	}
}

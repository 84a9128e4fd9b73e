package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"github.com/urfave/cli/v2/altsrc"

	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/internal/daemon"
	"github.com/remus-kvm/remus/witness"
)

// DefaultConfig is the daemon's configuration file.
const DefaultConfig = "/etc/remus/remusd.toml"

// daemonCommand is `remusd daemon`: the per-host daemon. Each of its
// flags can be set in the configuration file (TOML, the flag's name as
// the key: listen = ":7790", witness = ["http://etcd1:2379"]); a flag on
// the command line wins.
func daemonCommand() *cli.Command {
	flags := []cli.Flag{
		&cli.StringFlag{Name: "config", Value: DefaultConfig, Usage: "configuration file (TOML; keys are these flags' names); a missing default file is no error"},
		altsrc.NewStringFlag(&cli.StringFlag{Name: "control", Value: daemon.DefaultControl, Usage: "unix socket of remusctl's API (mode 0660)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "group", Usage: "group that may use the control socket besides root (e.g. remus)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "listen", Value: ":" + strconv.Itoa(daemon.DefaultPeerPort), Usage: "address of the peer API, for the other host's remusd"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "state-dir", Value: daemon.DefaultStateDir, Usage: "where the daemon keeps its VM records and the agents' logs (NAME.log)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "images-dir", Usage: "where a backup keeps its copies of the guests' disks (raw, sparse, the disk's size; default STATE-DIR/images): a filesystem with room for them"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "run-dir", Value: daemon.DefaultRunDir, Usage: "tmpfs directory for the agents' state and the standby domains' sockets (RUN-DIR/NAME)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "connect", Value: "qemu:///system", Usage: "libvirt `URI` of this host's libvirtd"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "key-file", Usage: "pre-shared key (at least 16 bytes; the same file on both hosts) authenticating the peer API and the agents' link (required)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "agent-ports", Value: "7800-7899", Usage: "TCP ports for the backup agents (`FIRST-LAST`): open them between the hosts"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "standby-name", Value: "{name}", Usage: "name of a standby domain; {name} is the VM's"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "qemu-user", Value: "libvirt-qemu", Usage: "libvirt's QEMU user (qemu.conf), owner of the socket directories the daemon makes"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "host", Usage: "this host's name for its peer (default: the host name)"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: "witness", Usage: "etcd endpoints (`URL`s) of the witness (see remusd primary --help)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "witness-cacert", Usage: "CA certificate (PEM) of the witness"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "witness-cert", Usage: "client certificate (PEM) for the witness"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "witness-key", Usage: "key of --witness-cert (PEM)"}),
		altsrc.NewDurationFlag(&cli.DurationFlag{Name: "witness-ttl", Value: witness.DefaultTTL, Usage: "TTL of the witness lease"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "witness-id", Usage: "this host's name at the witness (default: the host name)"}),
		altsrc.NewBoolFlag(&cli.BoolFlag{Name: "assume-fail-stop", Usage: "protect without a witness (see remusd primary --help: a partition then leaves two live guests)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "fence-command", Usage: "the backup agents' --fence-command"}),
		altsrc.NewDurationFlag(&cli.DurationFlag{Name: "heartbeat-interval", Value: failover.DefaultHeartbeatInterval, Usage: "the agents' heartbeat interval"}),
		altsrc.NewDurationFlag(&cli.DurationFlag{Name: "heartbeat-timeout", Value: failover.DefaultHeartbeatTimeout, Usage: "the agents' heartbeat timeout"}),
		altsrc.NewDurationFlag(&cli.DurationFlag{Name: "heal", Value: daemon.DefaultHeal, Usage: "how often to look for protected VMs left without a backup (the backup host restarted) and have the peer stand by again (0: never)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "metrics", Usage: "also serve the metrics (the daemon's and every agent's) over HTTP at `ADDR` (host:port; path /metrics), for Prometheus"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error (the daemon's and the agents')"}),
		&cli.StringFlag{Name: "remusd", Usage: "remusd binary the agents run (default: this one)", Hidden: true},
	}
	return &cli.Command{
		Name:  "daemon",
		Usage: "run the per-host daemon: protects libvirt domains (remusctl protect) in either role, serves remusctl",
		Description: "One remusd daemon runs on each host (remusd.service). remusctl protect DOMAIN --peer HOST on the\n" +
			"domain's host checks the domain, has the peer's daemon define and start its standby domain and backup\n" +
			"agent, and starts the primary agent. Each agent is a process of its own: stopping or restarting the\n" +
			"daemon leaves protection running, and the next daemon adopts the agents (records in --state-dir).\n" +
			"Every flag can be set in --config (TOML, the flag's name as the key).",
		Flags:  flags,
		Before: loadConfig(flags),
		Action: runDaemon,
	}
}

// loadConfig reads --config into the flags not given on the command
// line; the default file may be missing.
func loadConfig(flags []cli.Flag) cli.BeforeFunc {
	load := altsrc.InitInputSourceWithContext(flags, altsrc.NewTomlSourceFromFlagFunc("config"))
	return func(c *cli.Context) error {
		if path := c.String("config"); !c.IsSet("config") {
			if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
				return nil
			}
		}
		if err := load(c); err != nil {
			return fmt.Errorf("--config %s: %w", c.String("config"), err)
		}
		return nil
	}
}

func runDaemon(c *cli.Context) error {
	log, err := logger(c)
	if err != nil {
		return err
	}
	k, err := key(c)
	if err != nil {
		return err
	}
	if k == nil {
		return errors.New("--key-file is required: it authenticates the peer daemon and the agents' link (e.g. head -c 32 /dev/urandom > /etc/remus/key, copied to both hosts)")
	}
	var ports [2]int
	first, last, _ := strings.Cut(c.String("agent-ports"), "-")
	if ports[0], err = strconv.Atoi(first); err == nil {
		ports[1], err = strconv.Atoi(last)
	}
	if err != nil {
		return fmt.Errorf("--agent-ports %q: want FIRST-LAST", c.String("agent-ports"))
	}
	self := c.String("remusd")
	if self == "" {
		if self, err = os.Executable(); err != nil {
			return fmt.Errorf("remusd binary: %w", err)
		}
	}
	agentArgs := []string{"--key-file", c.String("key-file"), "--log-level", c.String("log-level"),
		"--heartbeat-interval", c.Duration("heartbeat-interval").String(), "--heartbeat-timeout", c.Duration("heartbeat-timeout").String()}
	for _, w := range c.StringSlice("witness") {
		agentArgs = append(agentArgs, "--witness", w)
	}
	if len(c.StringSlice("witness")) > 0 {
		agentArgs = append(agentArgs, "--witness-ttl", c.Duration("witness-ttl").String())
		for _, f := range []string{"witness-cacert", "witness-cert", "witness-key", "witness-id"} {
			if v := c.String(f); v != "" {
				agentArgs = append(agentArgs, "--"+f, v)
			}
		}
	}
	if c.Bool("assume-fail-stop") {
		agentArgs = append(agentArgs, "--assume-fail-stop")
	}
	var backupArgs []string
	if f := c.String("fence-command"); f != "" {
		backupArgs = append(backupArgs, "--fence-command", f)
	}
	d, err := daemon.New(daemon.Config{Control: c.String("control"), Group: c.String("group"), Listen: c.String("listen"),
		StateDir: c.String("state-dir"), RunDir: c.String("run-dir"), ImagesDir: c.String("images-dir"), Connect: c.String("connect"), Key: k,
		AgentPorts: ports, StandbyName: c.String("standby-name"), QEMUUser: c.String("qemu-user"), Remusd: self,
		AgentArgs: agentArgs, BackupArgs: backupArgs, Host: c.String("host"), Metrics: c.String("metrics"), Heal: c.Duration("heal"), Clock: time.Now}, log.With("role", "daemon"))
	if err != nil {
		return err
	}
	return d.Run(c.Context)
}

// Command remusd is the remus-kvm agent. It runs on each of the two hosts of
// a protected VM: as primary beside the running QEMU, checkpointing the
// guest every epoch to the backup; as backup, holding the last committed
// checkpoint and resuming the guest from it when the primary dies.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/remus-kvm/remus/checkpoint"
	"github.com/remus-kvm/remus/failover"
	"github.com/remus-kvm/remus/internal/agent"
	"github.com/remus-kvm/remus/netbuffer"
	"github.com/remus-kvm/remus/transport"
	"github.com/remus-kvm/remus/witness"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := app().RunContext(ctx, os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "remusd: %v\n", err)
		os.Exit(1)
	}
}

func app() *cli.App {
	common := []cli.Flag{
		&cli.StringFlag{Name: "vm", Usage: "name of the protected VM (the same on both hosts)", Required: true},
		&cli.StringFlag{Name: "state-dir", Usage: "directory for checkpoint state (a tmpfs such as /dev/shm is best)", Required: true},
		&cli.DurationFlag{Name: "heartbeat-interval", Value: failover.DefaultHeartbeatInterval, Usage: "interval between heartbeats"},
		&cli.DurationFlag{Name: "heartbeat-timeout", Value: failover.DefaultHeartbeatTimeout, Usage: "silence after which the peer is declared dead"},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
		&cli.StringFlag{Name: "key-file", Usage: "pre-shared key (at least 16 bytes, e.g. 32 bytes from /dev/urandom) authenticating the link; the same file on both hosts"},
		&cli.StringFlag{Name: "net-guest", Usage: "`PATH` of the unix socket of the guest NIC (QEMU: -netdev stream,server=on,addr.type=unix,addr.path=PATH); remusd relays it to --net-tap"},
		&cli.StringFlag{Name: "net-tap", Usage: "tap device towards the network for the guest's NIC (with --net-guest)"},
		&cli.StringFlag{Name: "net-netns", Usage: "network namespace of --net-tap, as a path such as /run/netns/NAME (default: remusd's own)"},
		&cli.StringSliceFlag{Name: "witness", Usage: "etcd endpoints (`URL`s, comma-separated or repeated) of the witness that records which side runs the guest: the backup resumes it only after claiming the witness, and a primary cut off from both stops its guest first"},
		&cli.StringFlag{Name: "witness-cacert", Usage: "CA certificate (PEM) to verify the witness's TLS certificate"},
		&cli.StringFlag{Name: "witness-cert", Usage: "client certificate (PEM) for the witness"},
		&cli.StringFlag{Name: "witness-key", Usage: "key of --witness-cert (PEM)"},
		&cli.DurationFlag{Name: "witness-ttl", Value: witness.DefaultTTL, Usage: "TTL of the witness lease (whole seconds, at least etcd's minimum of 2s by default): a failover waits this long after the primary's last renewal"},
		&cli.StringFlag{Name: "witness-id", Usage: "name of this host at the witness, the same for its primary and backup agents, never shared by two hosts (default: the host name)"},
		&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics over HTTP at `ADDR` (host:port, e.g. 127.0.0.1:9477; path /metrics); remusd primary also serves them on its control socket"},
		&cli.BoolFlag{Name: "assume-fail-stop", Usage: "protect without a witness (and, on the backup, without --fence-command): a partition between the hosts, both alive, then leaves two live copies of the guest"},
	}
	return &cli.App{
		Name:  "remusd",
		Usage: "Remus-style high availability agent for a KVM/QEMU virtual machine",
		Commands: []*cli.Command{
			daemonCommand(),
			{
				Name:  "primary",
				Usage: "checkpoint a running VM to its backup every epoch",
				Description: "Attaches to the VM's QEMU through a QMP socket of its own (QEMU accepts several -qmp options),\n" +
					"maps its guest RAM (which must be in a memory-backend-file or memory-backend-memfd with share=on),\n" +
					"connects to the backup remusd and checkpoints the guest every epoch.",
				Flags: append([]cli.Flag{
					&cli.StringFlag{Name: "qmp", Usage: "QMP socket of the running QEMU", Required: true},
					&cli.StringFlag{Name: "peer", Usage: "backup remusd, host:port", Required: true},
					&cli.DurationFlag{Name: "epoch", Value: checkpoint.DefaultInterval, Usage: "checkpoint interval"},
					&cli.IntFlag{Name: "max-in-flight", Value: checkpoint.DefaultMaxInFlight, Usage: "epochs sent but not yet acknowledged before the next waits"},
					&cli.StringFlag{Name: "min-run", Value: "90%", Usage: "least share of time the guest runs: after a pause P the next checkpoint waits until the guest ran P×share/(1−share), so long pauses stretch the epoch instead of starving the guest (e.g. 90%, 0.5; off: checkpoint every --epoch whatever the pauses)"},
					&cli.StringFlag{Name: "tracker", Value: agent.TrackerAuto, Usage: "dirty-page tracker: auto (uffd where the kernel has userfaultfd write-protection and PAGEMAP_SCAN, else softdirty where the kernel tracks it and guest RAM is locked, else compare), uffd, softdirty or compare"},
					&cli.StringFlag{Name: "device-state", Value: "auto", Usage: "how to save device state: auto, xen (xen-save-devices-state) or migrate (migration with x-ignore-shared)"},
					&cli.DurationFlag{Name: "command-timeout", Value: checkpoint.DefaultCommandTimeout, Usage: "bound on each QMP command of a checkpoint (stop, save, cont); a guest whose stop does not return in time is stopped for good and the backup told to resume its last checkpoint"},
					&cli.DurationFlag{Name: "retry", Value: time.Second, Usage: "wait before protecting again after the backup was lost (0: exit instead)"},
					&cli.BoolFlag{Name: "compress", Value: true, Usage: "send dirty pages as XOR deltas against their last version, compressed with zstd or lz4 (whichever is smaller), and the device state with zstd; =false sends both raw"},
					&cli.Int64Flag{Name: "delta-cache", Value: 128 << 20, Usage: "`BYTES` of the pages last sent that --compress remembers to send XOR deltas against (the most recent ones; a page it forgot goes whole, compressed); 0: all of guest RAM, which costs its size in memory again"},
					&cli.BoolFlag{Name: "live-sync", Value: true, Usage: "copy guest RAM to the backup while the guest runs before a session's first epoch, so that its pause holds only what was written meanwhile (trackers that can: uffd, compare); =false copies all of RAM in that pause"},
					&cli.StringFlag{Name: "disk", Usage: "block node of the guest's disk (-blockdev ...,node-name=NODE), or the absolute path of its image (a libvirt domain's <source file>): QEMU mirrors it to remusd and its writes go to the backup with their epochs"},
					&cli.StringFlag{Name: "net-plug-tap", Usage: "for a guest whose NIC is a tap (-netdev tap, libvirt's default): hold its output in the kernel, with the sch_plug qdisc on an IFB device fed from this tap (one epoch in flight)"},
					&cli.Int64Flag{Name: "net-hold-cap", Value: netbuffer.DefaultHoldCap, Usage: "bytes of guest output held for commits at most; at the cap the guest waits"},
					&cli.BoolFlag{Name: "net-output-commit", Value: true, Usage: "hold the guest's output until its epoch commits; =false lets it straight through, and a failover can then take back replies clients saw"},
					&cli.StringFlag{Name: "epoch-log", Usage: "append one JSON line per committed epoch to this file"},
					&cli.StringFlag{Name: "control", Usage: "`PATH` of the control socket for remusctl status and switchover, and GET /metrics (default STATE-DIR/remusd.sock)"},
					&cli.StringFlag{Name: "trace", Usage: "benchmark aid: record the dirty pages of --trace-epochs epochs to this file", Hidden: true},
					&cli.IntFlag{Name: "trace-epochs", Value: 50, Usage: "benchmark aid: epochs to record with --trace", Hidden: true},
					&cli.StringFlag{Name: "fault", Usage: "testing aid: stop at POINT:EPOCH of the epoch cycle (paused, resumed, shipping, shipped, acked) until killed", Hidden: true},
					&cli.StringFlag{Name: "fault-trigger", Usage: "testing aid: --fault is armed only once this file exists", Hidden: true},
				}, common...),
				Action: runPrimary,
			},
			{
				Name:      "backup",
				Usage:     "hold the VM's last committed checkpoint and resume it when the primary dies",
				ArgsUsage: "[-- QEMU-BINARY QEMU-ARGS...]",
				Description: "Receives epochs from the primary remusd and applies each one whole to the RAM image and device state.\n" +
					"When the primary stops being heard for the heartbeat timeout, starts the QEMU command line given after --\n" +
					"(the primary's, with the RAM backend's mem-path set to --ram-image), loads the last committed device state\n" +
					"and resumes the guest. The guest keeps running after remusd exits; its QEMU's pid is written to\n" +
					"STATE-DIR/qemu.pid (its output to STATE-DIR/qemu.log) as soon as it starts.",
				Flags: append([]cli.Flag{
					&cli.StringFlag{Name: "listen", Usage: "address for the primary, host:port", Required: true},
					&cli.StringFlag{Name: "ram-image", Usage: "file holding the guest RAM of the last committed epoch (the QEMU command line's mem-path)"},
					&cli.StringFlag{Name: "qmp", Usage: "QMP socket created by the QEMU command line, for the restore"},
					&cli.StringFlag{Name: "standby-qmp", Usage: "instead of a QEMU command line, --ram-image and --qmp: the QMP socket of a standby QEMU that runs already, waiting with -incoming defer (libvirt's standby domain), guest RAM in a shared backend; committed epochs go into its RAM, and on failover it gets the device state (by descriptor) and runs"},
					&cli.Int64Flag{Name: "stage-memory", Value: 64 << 20, Usage: "`BYTES` of an epoch's pages held in memory while it arrives; beyond them they wait in a file of --state-dir until the epoch commits (0: all in memory; a first epoch may be all of guest RAM)"},
					&cli.StringFlag{Name: "disk-image", Usage: "the backup's copy of the guest's disk: a raw image the size of the primary's disk, used by the QEMU command line; it only ever holds committed epochs' writes"},
					&cli.StringFlag{Name: "report", Usage: "write a JSON failover report to this file"},
					&cli.StringFlag{Name: "fence-command", Usage: "shell command run before resuming the guest after the primary went silent (STONITH-style): it gets the VM name and the primary's address as arguments (also REMUS_VM, REMUS_PRIMARY) and must make sure the primary's guest runs no more; a non-zero exit or a timeout means no failover (tried again)"},
					&cli.DurationFlag{Name: "fence-timeout", Value: agent.DefaultFenceTimeout, Usage: "bound on one run of --fence-command"},
					&cli.StringFlag{Name: "control", Usage: "`PATH` of the control socket for remusctl status and GET /metrics (default STATE-DIR/remusd.sock)"},
				}, common...),
				Action: runBackup,
			},
			{
				Name:  "relay",
				Usage: "relay an unprotected guest's NIC (a -netdev stream socket) to its tap, nothing held (run by remusd daemon after unprotect)",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "vm", Usage: "name of the VM", Required: true},
					&cli.StringFlag{Name: "net-guest", Usage: "`PATH` of the unix socket of the guest NIC", Required: true},
					&cli.StringFlag{Name: "net-tap", Usage: "tap device towards the network", Required: true},
					&cli.StringFlag{Name: "net-netns", Usage: "network namespace of --net-tap, as a path"},
					&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
				},
				Action: func(c *cli.Context) error {
					log, err := logger(c)
					if err != nil {
						return err
					}
					return agent.RunRelay(c.Context, netConfig(c), log.With("vm", c.String("vm"), "role", "relay"))
				},
			},
			{
				Name:   agent.DeadmanCommand,
				Usage:  "started by remusd primary: stops the guest if that agent dies without ending its session",
				Hidden: true,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "qmp", Required: true},
					&cli.IntFlag{Name: "pid", Required: true},
					&cli.StringFlag{Name: "state-dir", Required: true},
					&cli.DurationFlag{Name: "budget", Value: agent.DefaultDeadmanBudget},
					&cli.StringFlag{Name: "log-level", Value: "info"},
				},
				Action: func(c *cli.Context) error {
					log, err := logger(c)
					if err != nil {
						return err
					}
					return agent.RunDeadman(c.Context, agent.DeadmanConfig{QMPSocket: c.String("qmp"), PID: c.Int("pid"),
						StateDir: c.String("state-dir"), Budget: c.Duration("budget")}, os.Stdin, log.With("role", "deadman"))
				},
			},
		},
	}
}

func logger(c *cli.Context) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})), nil
}

func heartbeat(c *cli.Context) failover.DetectorConfig {
	return failover.DetectorConfig{Interval: c.Duration("heartbeat-interval"), Timeout: c.Duration("heartbeat-timeout")}
}

// key reads --key-file, if given.
func key(c *cli.Context) ([]byte, error) {
	path := c.String("key-file")
	if path == "" {
		return nil, nil
	}
	k, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--key-file: %w", err)
	}
	if len(k) < transport.MinKeySize {
		return nil, fmt.Errorf("--key-file %s: %d bytes, want at least %d", path, len(k), transport.MinKeySize)
	}
	return k, nil
}

func witnessConfig(c *cli.Context) agent.WitnessConfig {
	var eps []string
	for _, e := range c.StringSlice("witness") {
		for _, p := range strings.Split(e, ",") {
			if p = strings.TrimSpace(p); p != "" {
				eps = append(eps, p)
			}
		}
	}
	return agent.WitnessConfig{ID: c.String("witness-id"), Config: witness.Config{Endpoints: eps,
		CACert: c.String("witness-cacert"), Cert: c.String("witness-cert"), Key: c.String("witness-key"), TTL: c.Duration("witness-ttl")}}
}

func netConfig(c *cli.Context) agent.NetConfig {
	return agent.NetConfig{Guest: c.String("net-guest"), Tap: c.String("net-tap"), Netns: c.String("net-netns")}
}

func runPrimary(c *cli.Context) error {
	log, err := logger(c)
	if err != nil {
		return err
	}
	cfg := agent.PrimaryConfig{
		VM: c.String("vm"), QMPSocket: c.String("qmp"), Peer: c.String("peer"), StateDir: c.String("state-dir"),
		Pipeline:  checkpoint.PipelineConfig{Interval: c.Duration("epoch"), MaxInFlight: c.Int("max-in-flight")},
		Heartbeat: heartbeat(c), Tracker: c.String("tracker"), DeviceState: c.String("device-state"), Retry: c.Duration("retry"), EpochLog: c.String("epoch-log"),
		CommandTimeout: c.Duration("command-timeout"),
		Net:            netConfig(c), Disk: c.String("disk"), Compress: c.Bool("compress"), NoLiveSync: !c.Bool("live-sync"), DeltaCache: c.Int64("delta-cache"),
		Trace: c.String("trace"), TraceEpochs: c.Int("trace-epochs"),
		Witness: witnessConfig(c), AssumeFailStop: c.Bool("assume-fail-stop"), Control: c.String("control"),
		Metrics: c.String("metrics"),
	}
	if cfg.Pipeline.MinRun, err = parseMinRun(c.String("min-run")); err != nil {
		return err
	}
	if cfg.Key, err = key(c); err != nil {
		return err
	}
	cfg.Net.HoldCap, cfg.Net.NoOutputCommit, cfg.Net.PlugTap = c.Int64("net-hold-cap"), !c.Bool("net-output-commit"), c.String("net-plug-tap")
	if f := c.String("fault"); f != "" {
		var point string
		var epoch uint64
		if _, err := fmt.Sscanf(strings.Replace(f, ":", " ", 1), "%s %d", &point, &epoch); err != nil {
			return fmt.Errorf("--fault %q: want POINT:EPOCH", f)
		}
		cfg.Fault = &agent.Fault{Point: checkpoint.FaultPoint(point), Epoch: epoch, Trigger: c.String("fault-trigger")}
	}
	return agent.RunPrimary(c.Context, cfg, log)
}

func runBackup(c *cli.Context) error {
	log, err := logger(c)
	if err != nil {
		return err
	}
	cfg := agent.BackupConfig{
		VM: c.String("vm"), Listen: c.String("listen"), RAMImage: c.String("ram-image"), StateDir: c.String("state-dir"),
		QEMU: c.Args().Slice(), QMPSocket: c.String("qmp"), Standby: c.String("standby-qmp"), Heartbeat: heartbeat(c), Report: c.String("report"),
		Net: netConfig(c), DiskImage: c.String("disk-image"), StageMemory: c.Int64("stage-memory"),
		FenceCommand: c.String("fence-command"), FenceTimeout: c.Duration("fence-timeout"),
		Witness: witnessConfig(c), AssumeFailStop: c.Bool("assume-fail-stop"), Metrics: c.String("metrics"),
		Control: c.String("control"),
	}
	if cfg.Key, err = key(c); err != nil {
		return err
	}
	r, err := agent.RunBackup(c.Context, cfg, log)
	if err != nil {
		return err
	}
	if r != nil {
		fmt.Printf("failed over: VM %s resumed epoch %d in QEMU pid %d (detection %.0f ms, restore %.0f ms)\n",
			r.VM, r.Epoch, r.QEMUPID, r.DetectionMS, r.RestoreMS)
	}
	return nil
}

// parseMinRun reads --min-run: a percentage ("90%"), a fraction ("0.9"),
// or "off" (no minimum: checkpoint.PipelineConfig.MinRun negative).
func parseMinRun(v string) (float64, error) {
	v = strings.TrimSpace(v)
	if v == "off" || v == "0" || v == "0%" {
		return -1, nil
	}
	num, scale := v, 1.0
	if s, ok := strings.CutSuffix(v, "%"); ok {
		num, scale = s, 100
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f/scale <= 0 || f/scale >= 0.99 {
		return 0, fmt.Errorf("--min-run %q: want a share of time above 0 and below 99%% (e.g. 90%% or 0.9), or off", v)
	}
	return f / scale, nil
}

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"github.com/urfave/cli/v2"

	"github.com/remus-kvm/remus/libvirtdom"
)

// connectFlag names the libvirt daemon a command talks to.
var connectFlag = &cli.StringFlag{Name: "connect", Aliases: []string{"c"}, Value: string(libvirt.QEMUSystem), EnvVars: []string{"LIBVIRT_DEFAULT_URI"},
	Usage: "libvirt `URI` of the domain's host (qemu:///system, qemu+ssh://root@HOST/system, ...)"}

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:      "check",
		Usage:     "check that a libvirt domain can be protected, and print the exact XML that fixes what cannot",
		ArgsUsage: "DOMAIN",
		Description: "Looks DOMAIN up in libvirt (--connect) and checks its definition against what protection needs:\n" +
			"guest RAM in a shared memory backend, a QMP socket for remusd, a NIC on a tap, one writable disk, no device\n" +
			"that writes guest RAM unseen (VFIO, vhost-user, virtiofs, ivshmem, memory devices, a VGA's video memory).\n" +
			"Each problem comes with the snippet to put into `virsh edit DOMAIN` (the domain must be restarted for it).\n" +
			"Exits 1 when anything blocks protection; warnings alone (a balloon: slower dirty-page tracking) exit 0.\n" +
			"Changes nothing.",
		Flags: []cli.Flag{connectFlag,
			&cli.BoolFlag{Name: "monitor-passthrough", Usage: "accept a domain without a QMP socket for remusd, reached through libvirt's monitor passthrough instead (~1.2 ms per command against ~0.3 ms; libvirt marks the domain tainted)"},
			&cli.BoolFlag{Name: "json", Usage: "print the domain's summary and its problems as JSON"},
		},
		Action: func(c *cli.Context) error {
			xml, err := argDomainXML(c)
			if err != nil {
				return err
			}
			dom, problems, err := libvirtdom.Check(xml, libvirtdom.CheckOptions{MonitorPassthrough: c.Bool("monitor-passthrough")})
			if err != nil {
				return err
			}
			if c.Bool("json") {
				enc := json.NewEncoder(c.App.Writer)
				enc.SetIndent("", "  ")
				if err := enc.Encode(struct {
					Domain   *libvirtdom.Domain   `json:"domain"`
					Problems []libvirtdom.Problem `json:"problems"`
				}{dom, problems}); err != nil {
					return err
				}
			} else {
				printCheck(c.App.Writer, dom, problems)
			}
			if n := len(libvirtdom.Blocking(problems)); n > 0 {
				return cli.Exit(fmt.Sprintf("remusctl check: %s cannot be protected: %d problem(s) to fix first", dom.Name, n), 1)
			}
			return nil
		},
	}
}

// argDomainXML returns the XML of the one DOMAIN the command was given.
func argDomainXML(c *cli.Context) (string, error) {
	if c.NArg() != 1 {
		return "", cli.Exit("remusctl "+c.Command.Name+": give one DOMAIN", 2)
	}
	return domainXML(c.String("connect"), c.Args().First())
}

// domainXML returns the persistent definition of domain name at uri (what
// takes effect at its next start: the fixes go there).
func domainXML(uri, name string) (string, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", fmt.Errorf("--connect %q: %w", uri, err)
	}
	l, err := libvirt.ConnectToURI(u)
	if err != nil {
		return "", fmt.Errorf("libvirt at %s: %w", uri, err)
	}
	defer l.Disconnect()
	d, err := l.DomainLookupByName(name)
	if err != nil {
		if libvirt.IsNotFound(err) {
			return "", cli.Exit(fmt.Sprintf("remusctl: no domain %q at %s (virsh -c %s list --all)", name, uri, uri), 1)
		}
		return "", fmt.Errorf("look up domain %q at %s: %w", name, uri, err)
	}
	xml, err := l.DomainGetXMLDesc(d, libvirt.DomainXMLInactive)
	if err != nil {
		return "", fmt.Errorf("domain %q at %s: read its XML: %w", name, uri, err)
	}
	return xml, nil
}

// printCheck prints the domain's summary and each problem with its fix.
func printCheck(w io.Writer, d *libvirtdom.Domain, problems []libvirtdom.Problem) {
	fmt.Fprintf(w, "domain %s (%s, %s, %d MiB, %d vCPU)\n", d.Name, d.Type, d.MachineType, d.MemoryBytes>>20, d.VCPUs)
	if len(problems) == 0 {
		fmt.Fprintln(w, "ready to protect: nothing to fix")
		return
	}
	printProblems(w, problems)
	if len(libvirtdom.Blocking(problems)) == 0 {
		fmt.Fprintln(w, "\nready to protect (warnings only)")
	}
}

// printProblems prints each problem with its fix.
func printProblems(w io.Writer, problems []libvirtdom.Problem) {
	for i, p := range problems {
		fmt.Fprintf(w, "\n%d. %s\n", i+1, p)
		if p.Fix.Note != "" {
			fmt.Fprintf(w, "   fix: %s\n", p.Fix.Note)
		}
		if p.Fix.XML != "" {
			fmt.Fprintln(w, indent(p.Fix.XML, "      "))
		}
	}
}

func indent(s, prefix string) string {
	return prefix + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n"+prefix)
}

func standbyCommand() *cli.Command {
	return &cli.Command{
		Name:      "standby-xml",
		Usage:     "print the standby domain's XML for the backup host, made from a libvirt domain's",
		ArgsUsage: "DOMAIN",
		Description: "Reads DOMAIN's persistent XML (--connect) and prints the XML of its standby for the backup host:\n" +
			"the same domain (name, UUID, machine, RAM backend, devices), with remusd's QMP socket at --agent-qmp,\n" +
			"QEMU waiting for the device state (-incoming defer; with --device-state xen, the default, expecting no\n" +
			"configuration section), the disks at the backup's copies (--disk TARGET=PATH), and remus metadata naming\n" +
			"the peer. Define it on the backup host and start it: it waits, paused, for `remusd backup --standby-qmp`\n" +
			"(virsh -c qemu+ssh://root@B/system define standby.xml && virsh ... start NAME). Refuses a domain\n" +
			"`remusctl check` refuses.",
		Flags: []cli.Flag{connectFlag,
			&cli.StringFlag{Name: "agent-qmp", Usage: "`PATH` of the backup remusd's QMP socket in the standby (default: the primary's)"},
			&cli.StringFlag{Name: "peer", Required: true, Usage: "the primary remusd's `HOST[:PORT]`, recorded in the standby's metadata"},
			&cli.StringSliceFlag{Name: "disk", Usage: "`TARGET=PATH`: the backup's copy of the disk at TARGET (vda=/var/lib/remus/web1/vda.raw); repeat per disk"},
			&cli.StringFlag{Name: "device-state", Value: "xen", Usage: "how the primary remusd saves device state (its --device-state: xen, the default where QEMU has it, or migrate)"},
		},
		Action: func(c *cli.Context) error {
			xml, err := argDomainXML(c)
			if err != nil {
				return err
			}
			o := libvirtdom.StandbyOptions{AgentQMP: c.String("agent-qmp"), Peer: c.String("peer"), DeviceStateXen: c.String("device-state") != "migrate"}
			if o.AgentQMP == "" {
				dom, _, err := libvirtdom.Check(xml, libvirtdom.CheckOptions{})
				if err != nil {
					return err
				}
				if o.AgentQMP = dom.AgentQMP; o.AgentQMP == "" {
					return cli.Exit("remusctl standby-xml: the domain has no agent QMP socket: give --agent-qmp (remusctl check says how to add one)", 1)
				}
			}
			for _, d := range c.StringSlice("disk") {
				target, path, ok := strings.Cut(d, "=")
				if !ok || target == "" || path == "" {
					return cli.Exit(fmt.Sprintf("remusctl standby-xml: --disk %q: want TARGET=PATH", d), 2)
				}
				if o.DiskPaths == nil {
					o.DiskPaths = map[string]string{}
				}
				o.DiskPaths[target] = path
			}
			out, err := libvirtdom.Standby(xml, o)
			if err != nil {
				return err
			}
			fmt.Fprintln(c.App.Writer, out)
			return nil
		},
	}
}

package libvirtdom

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// StandbyOptions say how the backup host's standby domain differs from
// the primary.
type StandbyOptions struct {
	// AgentQMP is the path of the backup agent's QMP socket (required).
	AgentQMP string
	// Peer is the primary agent's address, HOST[:PORT], written into the
	// standby's remus metadata (required).
	Peer string
	// DiskPaths maps a disk's target (vda) to the backup's image of it; the
	// disk then uses that file (or block device, if the primary's disk is
	// one) as a raw image, as the backup's copy always is. Disks not in it
	// keep their source.
	DiskPaths map[string]string
	// Name and UUID, when set, replace the primary's.
	Name, UUID string
	// Check is what the primary is checked with; Standby refuses a primary
	// with Errors.
	Check CheckOptions
	// DeviceStateXen: the primary agent saves device state with QMP
	// xen-save-devices-state (remusd's default where QEMU has it), whose
	// stream has no configuration section: the standby must not expect
	// one (-global migration.send-configuration=off).
	DeviceStateXen bool
	// ArgPaths rewrites the qemu:commandline arguments: each key (a path
	// on the primary's host, e.g. the directory of a -netdev stream
	// socket) becomes its value wherever it occurs, longest keys first.
	ArgPaths map[string]string
}

// Standby builds the backup host's standby domain from the primary's XML
// (best its inactive XML, `virsh dumpxml --inactive`): the same machine,
// RAM size and backend, devices, name and UUID, except that
//
//   - the agent's QMP socket is o.AgentQMP, the backup agent's;
//   - QEMU starts with -incoming defer: it waits, paused, for the device
//     state the backup agent loads at a failover;
//   - the disks in o.DiskPaths use the backup's raw images;
//   - its remus metadata says role standby, peer o.Peer (the epoch and
//     other attributes of the primary's are kept);
//   - it has no runtime id.
//
// Everything else means what it meant in the primary's XML: libvirtxml
// reads and writes it, and Standby refuses XML that libvirtxml would not
// write back whole (an element or attribute it does not know). Autostart
// is not part of a domain's XML: define the standby without it (a standby
// started at boot would wait for an agent that may not be there).
func Standby(doc string, o StandbyOptions) (string, error) {
	d, err := parse(doc)
	if err != nil {
		return "", err
	}
	fail := func(format string, a ...any) (string, error) {
		return "", fmt.Errorf("libvirtdom: domain %s: standby: "+format, append([]any{d.Name}, a...)...)
	}
	switch {
	case o.AgentQMP == "" || !strings.HasPrefix(o.AgentQMP, "/"):
		return fail("agent QMP socket %q: want an absolute path", o.AgentQMP)
	case checkPeer(o.Peer) != nil:
		return fail("peer %q: %w", o.Peer, checkPeer(o.Peer))
	}
	if err := lossless(doc, d); err != nil {
		return fail("%w", err)
	}
	_, problems, err := Check(doc, o.Check)
	if err != nil {
		return "", err
	}
	if bad := Blocking(problems); len(bad) > 0 {
		codes := make([]string, len(bad))
		for i, p := range bad {
			codes[i] = string(p.Code)
		}
		return fail("the primary cannot be protected: %s", strings.Join(codes, ", "))
	}
	meta, _, err := ParseMetadata(doc)
	if err != nil {
		return "", err
	}

	d.ID = nil
	if o.Name != "" {
		d.Name = o.Name
	}
	if o.UUID != "" {
		if !uuidRe.MatchString(o.UUID) {
			return fail("UUID %q is not a UUID", o.UUID)
		}
		d.UUID = o.UUID
	}
	args := qemuArgs(d)
	if s := findAgentSocket(args); s != nil && s.bad == "" {
		args = withSocketPath(args, s, o.AgentQMP)
	} else {
		args = append(args, agentArgs(o.AgentQMP)...)
	}
	args = withIncomingDefer(RewritePaths(args, o.ArgPaths))
	if o.DeviceStateXen && !slices.Contains(args, sendConfigurationOff) {
		args = append(args, "-global", sendConfigurationOff)
	}
	if d.QEMUCommandline == nil {
		d.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{}
	}
	d.QEMUCommandline.Args = make([]libvirtxml.DomainQEMUCommandlineArg, len(args))
	for i, a := range args {
		d.QEMUCommandline.Args[i].Value = a
	}
	if err := setDiskPaths(d, o.DiskPaths); err != nil {
		return fail("%w", err)
	}

	out, err := d.Marshal()
	if err != nil {
		return fail("write XML: %w", err)
	}
	m := Metadata{Role: RoleStandby, Peer: o.Peer}
	if meta != nil {
		m.Epoch, m.Attrs = meta.Epoch, meta.Attrs
	}
	return SetMetadata(out, m)
}

// sendConfigurationOff makes an incoming migration expect no
// configuration section.
const sendConfigurationOff = "migration.send-configuration=off"

// RewritePaths applies StandbyOptions.ArgPaths to args as Standby does to
// the qemu:commandline arguments: where a path of the primary's arguments
// is on the standby.
func RewritePaths(args []string, paths map[string]string) []string {
	keys := slices.SortedFunc(maps.Keys(paths), func(a, b string) int { return len(b) - len(a) })
	out := slices.Clone(args)
	for i := range out {
		for _, k := range keys {
			if k != "" {
				out[i] = strings.ReplaceAll(out[i], k, paths[k])
			}
		}
	}
	return out
}

// withIncomingDefer returns args with -incoming defer, replacing any other
// -incoming.
func withIncomingDefer(args []string) []string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "-incoming" || args[i] == "--incoming" {
			out := slices.Clone(args)
			out[i+1] = "defer"
			return out
		}
	}
	return append(args, "-incoming", "defer")
}

// setDiskPaths points the disks named in paths at the backup's raw images.
func setDiskPaths(d *libvirtxml.Domain, paths map[string]string) error {
	left := maps.Clone(paths)
	if d.Devices != nil {
		for i := range d.Devices.Disks {
			disk := &d.Devices.Disks[i]
			if disk.Target == nil {
				continue
			}
			p, ok := paths[disk.Target.Dev]
			if !ok {
				continue
			}
			delete(left, disk.Target.Dev)
			if !strings.HasPrefix(p, "/") {
				return fmt.Errorf("disk %s: backup image %q: want an absolute path", disk.Target.Dev, p)
			}
			src := &libvirtxml.DomainDiskSource{}
			if disk.Source != nil && disk.Source.Block != nil {
				src.Block = &libvirtxml.DomainDiskSourceBlock{Dev: p}
			} else {
				src.File = &libvirtxml.DomainDiskSourceFile{File: p}
			}
			disk.Source, disk.BackingStore = src, nil
			drv := libvirtxml.DomainDiskDriver{Name: "qemu"}
			if disk.Driver != nil {
				drv = *disk.Driver
			}
			drv.Type = "raw"
			disk.Driver = &drv
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("no disk with target %s", strings.Join(slices.Sorted(maps.Keys(left)), ", "))
	}
	return nil
}

// lossless checks that libvirtxml writes back everything the document
// says: the same elements, attributes and text, in the same namespaces
// (not the same bytes: quoting, prefixes and the order of attributes may
// differ).
func lossless(doc string, d *libvirtxml.Domain) error {
	out, err := d.Marshal()
	if err != nil {
		return fmt.Errorf("write XML: %w", err)
	}
	before, err := canonical(doc)
	if err != nil {
		return fmt.Errorf("read XML: %w", err)
	}
	after, err := canonical(out)
	if err != nil {
		return fmt.Errorf("read back libvirtxml's XML: %w", err)
	}
	lost := diff(before, after)
	if len(lost) > 0 {
		return fmt.Errorf("%w: %s", ErrLossy, strings.Join(lost, "; "))
	}
	return nil
}

// ErrLossy reports domain XML that libvirtxml does not write back whole,
// which a standby made from it would silently lack.
var ErrLossy = errors.New("libvirtxml does not keep all of this domain's XML")

// canonical lists a document's elements as lines, one per element: its
// path (with each element's place among its same-named siblings), its
// attributes sorted, and its text, trimmed. Names are namespace URIs, not
// prefixes; namespace declarations are left out.
func canonical(doc string) ([]string, error) {
	type frame struct {
		line  string
		text  strings.Builder
		count map[string]int
	}
	dec := xml.NewDecoder(strings.NewReader(doc))
	stack := []*frame{{count: map[string]int{}}}
	var lines []string
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		top := stack[len(stack)-1]
		switch t := tok.(type) {
		case xml.StartElement:
			name := t.Name.Local
			if t.Name.Space != "" {
				name = "{" + t.Name.Space + "}" + name
			}
			top.count[name]++
			var attrs []string
			for _, a := range t.Attr {
				if a.Name.Space == "xmlns" || (a.Name.Space == "" && a.Name.Local == "xmlns") {
					continue
				}
				an := a.Name.Local
				if a.Name.Space != "" {
					an = "{" + a.Name.Space + "}" + an
				}
				attrs = append(attrs, fmt.Sprintf("%s=%q", an, canonicalValue(a.Value)))
			}
			slices.Sort(attrs)
			line := fmt.Sprintf("%s/%s[%d]", top.line, name, top.count[name])
			stack = append(stack, &frame{line: line, count: map[string]int{}})
			lines = append(lines, line+" "+strings.Join(attrs, " "))
		case xml.CharData:
			top.text.Write(t)
		case xml.EndElement:
			if text := strings.TrimSpace(top.text.String()); text != "" {
				lines = append(lines, top.line+" text="+strconv.Quote(text))
			}
			stack = stack[:len(stack)-1]
		}
	}
	return lines, nil
}

// diff says what lines of before are missing from after and what lines
// after adds, at most a few of each.
func diff(before, after []string) []string {
	count := map[string]int{}
	for _, l := range before {
		count[l]++
	}
	for _, l := range after {
		count[l]--
	}
	var out []string
	for _, l := range before {
		if count[l] > 0 {
			out = append(out, "lost "+l)
			count[l]--
		}
	}
	for _, l := range after {
		if count[l] < 0 {
			out = append(out, "added "+l)
			count[l]++
		}
	}
	if len(out) > 5 {
		out = append(out[:5], fmt.Sprintf("and %d more", len(out)-5))
	}
	return out
}

// canonicalValue writes a hexadecimal number (0x10, as libvirt writes PCI
// addresses and ports) in decimal, as libvirtxml writes some of them back;
// libvirt reads both.
func canonicalValue(v string) string {
	if strings.HasPrefix(v, "0x") {
		if n, err := strconv.ParseUint(v[2:], 16, 64); err == nil {
			return strconv.FormatUint(n, 10)
		}
	}
	return v
}

package libvirtdom

import (
	"encoding/xml"
	"errors"
	"fmt"
	"math/bits"
	"path"
	"regexp"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// CheckOptions are what the operator accepts besides the defaults.
type CheckOptions struct {
	// MonitorPassthrough accepts libvirt's monitor passthrough
	// (QEMUDomainMonitorCommand) for the agent instead of a QMP socket of
	// its own; a missing socket is then a Warning.
	MonitorPassthrough bool
	// NoOutputCommit: the guest's output will not be held (remusd
	// --net-output-commit=false), so NICs without a tap and more than one
	// NIC are Warnings.
	NoOutputCommit bool
	// AgentQMPDir is where the suggested agent socket goes, as
	// AgentQMPDir/NAME/agent.qmp; default /run/remus.
	AgentQMPDir string
}

// DefaultAgentQMPDir is the default CheckOptions.AgentQMPDir.
const DefaultAgentQMPDir = "/run/remus"

// Domain summarises a domain for protection.
type Domain struct {
	Name        string
	UUID        string
	Type        string // kvm or qemu
	MemoryBytes uint64 // <memory>
	VCPUs       uint   // <vcpu>, the maximum
	MachineType string // e.g. pc-q35-7.2
	Arch        string
	Emulator    string
	// RAMBackend is "memfd" or "file" when guest RAM is in a shared backend
	// of that kind, else "".
	RAMBackend string
	// AgentQMP is the path of the agent's QMP socket, "" when there is none.
	AgentQMP string
	// NetSocket is the unix socket of a -netdev stream server in
	// <qemu:commandline>: a NIC whose frames remusd relays to a tap
	// (remusd --net-guest), "" when there is none.
	NetSocket string
	NICs      []NIC
	Disks     []Disk
	// Protect is the domain's remus metadata, nil when it has none.
	Protect *Metadata
}

// NIC is one <interface> of a domain.
type NIC struct {
	Type   string // network, bridge, ethernet, direct, user, vhostuser...
	MAC    string
	Model  string // virtio, e1000e...
	Source string // the network, bridge or host device it is attached to
	// Tap is the tap device (<target dev>); libvirt names it when the
	// domain starts, so it is empty in an inactive domain's XML.
	Tap    string
	Driver string // <driver name>: vhost or qemu; "" is libvirt's choice (vhost where it can)
	// Supported: a tap whose output remusd can hold (sch_plug on the tap).
	Supported bool
}

// Disk is one <disk> of a domain.
type Disk struct {
	Target string // vda, sda...
	Bus    string
	Device string // disk, cdrom, floppy, lun
	Type   string // file, block, network, volume...
	Source string // the file, device, volume (pool/volume) or network name; "" for empty media
	Format string // the driver type: raw, qcow2...
	// Raw: the image is raw (no driver type is raw too).
	Raw       bool
	ReadOnly  bool
	Shareable bool
	Cache     string
}

// Writable says whether remusd must mirror the disk.
func (d Disk) Writable() bool {
	return (d.Device == "disk" || d.Device == "lun") && !d.ReadOnly && d.Source != ""
}

// Check reads a domain's XML (as `virsh dumpxml` prints it) and reports
// every reason it cannot be protected (Problems of severity Error) and what
// protecting it would cost (Warnings), each with its fix. A domain without
// a name or UUID, or XML that is not a domain, is an error.
func Check(doc string, opts CheckOptions) (*Domain, []Problem, error) {
	d, err := parse(doc)
	if err != nil {
		return nil, nil, err
	}
	meta, err := scanMetadata(doc)
	if err != nil { // what libvirtxml let pass: content after </domain>, a namespace on <domain>
		return nil, nil, fmt.Errorf("libvirtdom: domain %s: parse XML: %w", d.Name, err)
	}
	if opts.AgentQMPDir == "" {
		opts.AgentQMPDir = DefaultAgentQMPDir
	}
	c := &checker{d: d, opts: opts, dom: &Domain{Name: d.Name, UUID: d.UUID, Type: d.Type}}
	if err := c.summarise(); err != nil {
		return nil, nil, fmt.Errorf("libvirtdom: domain %s: %w", d.Name, err)
	}
	if m, _, err := meta.metadata(); err != nil {
		c.add(Problem{Code: CodeMetadata, Severity: Error, Message: err.Error(),
			Fix: Fix{Note: "correct or remove the <remus:protect> element in <metadata> (virsh edit " + d.Name + ")"}})
	} else {
		c.dom.Protect = m
	}
	c.checkDomain()
	c.checkRAM()
	c.checkAgent()
	c.checkVideo()
	c.checkDevices()
	c.checkNICs()
	c.checkDisks()
	return c.dom, c.problems, nil
}

var uuidRe = regexp.MustCompile(`^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$`)

// parse unmarshals a domain and checks that it has a name and a UUID.
func parse(doc string) (*libvirtxml.Domain, error) {
	d := &libvirtxml.Domain{}
	if err := d.Unmarshal(doc); err != nil {
		if name := domainName(doc); name != "" {
			return nil, fmt.Errorf("libvirtdom: domain %s: parse XML: %w", name, err)
		}
		return nil, fmt.Errorf("libvirtdom: parse domain XML: %w", err)
	}
	switch {
	case strings.TrimSpace(d.Name) == "":
		return nil, errors.New("libvirtdom: parse domain XML: no <name>")
	case d.UUID == "":
		return nil, fmt.Errorf("libvirtdom: domain %s: parse XML: no <uuid>", d.Name)
	case !uuidRe.MatchString(d.UUID):
		return nil, fmt.Errorf("libvirtdom: domain %s: parse XML: <uuid> %q is not a UUID", d.Name, d.UUID)
	}
	return d, nil
}

// domainName returns the <name> of a domain document that may be
// malformed further on, or "".
func domainName(doc string) string {
	dec := xml.NewDecoder(strings.NewReader(doc))
	depth, in := 0, false
	var name strings.Builder
	for {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		switch t := tok.(type) {
		case xml.StartElement:
			depth++
			if depth == 1 && t.Name.Local != "domain" {
				return ""
			}
			in = depth == 2 && t.Name.Local == "name" && t.Name.Space == ""
		case xml.EndElement:
			if in {
				return strings.TrimSpace(name.String())
			}
			depth--
		case xml.CharData:
			if in {
				name.Write(t)
			}
		}
	}
}

// checker collects the problems of one domain.
type checker struct {
	d        *libvirtxml.Domain
	opts     CheckOptions
	dom      *Domain
	problems []Problem
}

func (c *checker) add(p Problem) { c.problems = append(c.problems, p) }

// devices returns the domain's device list, never nil.
func (c *checker) devices() *libvirtxml.DomainDeviceList {
	if c.d.Devices == nil {
		return &libvirtxml.DomainDeviceList{}
	}
	return c.d.Devices
}

// summarise fills in the Domain from the XML.
func (c *checker) summarise() error {
	d, dom := c.d, c.dom
	if d.Memory != nil {
		b, err := scaleBytes(uint64(d.Memory.Value), d.Memory.Unit)
		if err != nil {
			return fmt.Errorf("<memory>: %w", err)
		}
		dom.MemoryBytes = b
	}
	if d.VCPU != nil {
		dom.VCPUs = d.VCPU.Value
	}
	if d.OS != nil && d.OS.Type != nil {
		dom.MachineType, dom.Arch = d.OS.Type.Machine, d.OS.Type.Arch
	}
	devs := c.devices()
	dom.Emulator = devs.Emulator
	if s := findAgentSocket(qemuArgs(d)); s != nil && s.bad == "" {
		dom.AgentQMP = s.path
	}
	dom.NetSocket = findNetSocket(qemuArgs(d))
	for _, iface := range devs.Interfaces {
		dom.NICs = append(dom.NICs, describeNIC(iface))
	}
	for _, disk := range devs.Disks {
		dom.Disks = append(dom.Disks, describeDisk(disk))
	}
	return nil
}

// scaleBytes converts a libvirt scaled integer to bytes (KiB without a
// unit, as <memory> reads).
func scaleBytes(v uint64, unit string) (uint64, error) {
	var m uint64
	switch unit {
	case "b", "bytes":
		m = 1
	case "KB":
		m = 1000
	case "", "k", "KiB":
		m = 1 << 10
	case "MB":
		m = 1000 * 1000
	case "M", "MiB":
		m = 1 << 20
	case "GB":
		m = 1000 * 1000 * 1000
	case "G", "GiB":
		m = 1 << 30
	case "TB":
		m = 1000 * 1000 * 1000 * 1000
	case "T", "TiB":
		m = 1 << 40
	case "PB":
		m = 1000 * 1000 * 1000 * 1000 * 1000
	case "P", "PiB":
		m = 1 << 50
	case "EB":
		m = 1000 * 1000 * 1000 * 1000 * 1000 * 1000
	case "E", "EiB":
		m = 1 << 60
	default:
		return 0, fmt.Errorf("unknown unit %q", unit)
	}
	hi, lo := bits.Mul64(v, m)
	if hi != 0 {
		return 0, fmt.Errorf("%d %s does not fit in 64 bits", v, unit)
	}
	return lo, nil
}

// describeNIC summarises an <interface>.
func describeNIC(iface libvirtxml.DomainInterface) NIC {
	n := NIC{Type: interfaceType(iface)}
	if iface.MAC != nil {
		n.MAC = iface.MAC.Address
	}
	if iface.Model != nil {
		n.Model = iface.Model.Type
	}
	if iface.Target != nil {
		n.Tap = iface.Target.Dev
	}
	if iface.Driver != nil {
		n.Driver = iface.Driver.Name
	}
	if s := iface.Source; s != nil {
		switch {
		case s.Network != nil:
			n.Source = s.Network.Network
		case s.Bridge != nil:
			n.Source = s.Bridge.Bridge
		case s.Direct != nil:
			n.Source = s.Direct.Dev
		case s.VHostUser != nil && s.VHostUser.Chardev != nil && s.VHostUser.Chardev.UNIX != nil:
			n.Source = s.VHostUser.Chardev.UNIX.Path
		case s.VDPA != nil:
			n.Source = s.VDPA.Device
		}
	}
	switch n.Type {
	case "network", "bridge", "ethernet":
		n.Supported = true
	}
	return n
}

// interfaceType returns an interface's type attribute, which libvirtxml
// keeps only as the choice of source.
func interfaceType(iface libvirtxml.DomainInterface) string {
	s := iface.Source
	switch {
	case s == nil:
		return ""
	case s.User != nil:
		return "user"
	case s.Ethernet != nil:
		return "ethernet"
	case s.VHostUser != nil:
		return "vhostuser"
	case s.Server != nil:
		return "server"
	case s.Client != nil:
		return "client"
	case s.MCast != nil:
		return "mcast"
	case s.Network != nil:
		return "network"
	case s.Bridge != nil:
		return "bridge"
	case s.Internal != nil:
		return "internal"
	case s.Direct != nil:
		return "direct"
	case s.Hostdev != nil:
		return "hostdev"
	case s.UDP != nil:
		return "udp"
	case s.VDPA != nil:
		return "vdpa"
	case s.Null != nil:
		return "null"
	case s.VDS != nil:
		return "vds"
	}
	return ""
}

// describeDisk summarises a <disk>.
func describeDisk(disk libvirtxml.DomainDisk) Disk {
	out := Disk{Device: disk.Device, ReadOnly: disk.ReadOnly != nil, Shareable: disk.Shareable != nil}
	if out.Device == "" {
		out.Device = "disk"
	}
	if disk.Target != nil {
		out.Target, out.Bus = disk.Target.Dev, disk.Target.Bus
	}
	if disk.Driver != nil {
		out.Format, out.Cache = disk.Driver.Type, disk.Driver.Cache
	}
	out.Raw = out.Format == "" || out.Format == "raw"
	if s := disk.Source; s != nil {
		switch {
		case s.File != nil:
			out.Type, out.Source = "file", s.File.File
		case s.Block != nil:
			out.Type, out.Source = "block", s.Block.Dev
		case s.Dir != nil:
			out.Type, out.Source = "dir", s.Dir.Dir
		case s.Network != nil:
			out.Type, out.Source = "network", s.Network.Protocol+":"+s.Network.Name
		case s.Volume != nil:
			out.Type, out.Source = "volume", s.Volume.Pool+"/"+s.Volume.Volume
		case s.NVME != nil:
			out.Type, out.Source = "nvme", "nvme"
		case s.VHostUser != nil:
			out.Type, out.Source = "vhostuser", "vhostuser"
			if s.VHostUser.UNIX != nil {
				out.Source = s.VHostUser.UNIX.Path
			}
		case s.VHostVDPA != nil:
			out.Type, out.Source = "vhostvdpa", s.VHostVDPA.Dev
		}
	}
	return out
}

// checkDomain checks the hypervisor and the architecture.
func (c *checker) checkDomain() {
	if t := c.d.Type; t != "kvm" && t != "qemu" {
		c.add(Problem{Code: CodeDomainType, Severity: Error,
			Message: fmt.Sprintf("domain type is %q: remus-kvm protects QEMU guests, <domain type='kvm'> or <domain type='qemu'>", t),
			Fix:     Fix{Note: "define the guest as a QEMU domain (type='kvm', or type='qemu' where KVM cannot run it)"}})
	}
	if c.dom.Arch != "x86_64" {
		c.add(Problem{Code: CodeArch, Severity: Error,
			Message: fmt.Sprintf("architecture is %q: remus-kvm protects x86_64 guests", c.dom.Arch),
			Fix:     Fix{Note: "no fix: the guest's architecture cannot be changed (<os><type arch='x86_64'>)"}})
	}
}

// editNote is the note of a snippet added in virsh edit.
func (c *checker) editNote(parent, elem, extra string) string {
	s := fmt.Sprintf("virsh edit %s: put this inside <%s>, replacing any <%s> there", c.d.Name, parent, elem)
	if extra != "" {
		s += "; " + extra
	}
	return s
}

// removeNote is the note of an element to remove.
func (c *checker) removeNote(extra string) string {
	s := fmt.Sprintf("virsh detach-device %s FILE --config, FILE holding this element (or delete it in virsh edit %s)", c.d.Name, c.d.Name)
	if extra != "" {
		s += "; " + extra
	}
	return s
}

// checkRAM checks that guest RAM is in one shared memfd or file backend.
func (c *checker) checkRAM() {
	d := c.d
	mb := d.MemoryBacking
	var source, access string
	if mb != nil && mb.MemorySource != nil {
		source = mb.MemorySource.Type
	}
	if mb != nil && mb.MemoryAccess != nil {
		access = mb.MemoryAccess.Mode
	}
	var cells []libvirtxml.DomainCell
	if d.CPU != nil && d.CPU.Numa != nil {
		cells = d.CPU.Numa.Cell
	}
	// A cell's memAccess overrides memoryBacking's for its RAM.
	cellAccess := ""
	for i, cell := range cells {
		if i == 0 {
			cellAccess = cell.MemAccess
		} else if cell.MemAccess != cellAccess {
			cellAccess = "mixed"
		}
	}
	effective := access
	if cellAccess != "" {
		effective = cellAccess
	}
	if (source == "memfd" || source == "file") && effective == "shared" {
		c.dom.RAMBackend = source
	}
	if (source != "memfd" && source != "file") || (cellAccess == "" && access != "shared") {
		want := libvirtxml.DomainMemoryBacking{}
		if mb != nil {
			want = *mb
		}
		if source != "file" {
			want.MemorySource = &libvirtxml.DomainMemorySource{Type: "memfd"}
		}
		want.MemoryAccess = &libvirtxml.DomainMemoryAccess{Mode: "shared"}
		snippet, err := marshalElement(&want, "memoryBacking")
		msg := fmt.Sprintf("guest RAM is not in a shared memory backend (source %q, access %q): the agent cannot map it", orDefault(source, "anonymous"), orDefault(access, "private"))
		c.add(Problem{Code: CodeRAMNotShared, Severity: Error, Message: msg, Fix: c.setFix("domain", "memoryBacking", snippet, err,
			"libvirt then backs RAM with memory-backend-memfd,share=on (source type='file' with shared access works too)")})
	}
	switch {
	case len(cells) > 1:
		c.add(Problem{Code: CodeNUMA, Severity: Error,
			Message: fmt.Sprintf("%d NUMA cells: libvirt gives each its own RAM backend, the agent replicates one", len(cells)),
			Fix:     c.numaFix(cells)})
	case len(cells) == 1 && cellAccess != "" && cellAccess != "shared":
		c.add(Problem{Code: CodeNUMA, Severity: Error,
			Message: fmt.Sprintf("NUMA cell memAccess is %q: the cell's RAM is not shared, the agent cannot map it", cellAccess),
			Fix:     c.numaFix(cells)})
	}
}

// numaFix is the <cpu> with one NUMA cell holding all vCPUs and RAM,
// shared.
func (c *checker) numaFix(cells []libvirtxml.DomainCell) Fix {
	var kib uint64
	for _, cell := range cells {
		b, err := scaleBytes(uint64(cell.Memory), cell.Unit)
		if err != nil {
			return Fix{Note: fmt.Sprintf("NUMA cell memory: %v", err)}
		}
		kib += b >> 10
	}
	cpu := *c.d.CPU
	numa := *cpu.Numa
	zero := uint(0)
	cpus := "0"
	if n := c.dom.VCPUs; n > 1 {
		cpus = fmt.Sprintf("0-%d", n-1)
	}
	numa.Cell = []libvirtxml.DomainCell{{ID: &zero, CPUs: cpus, Memory: uint(kib), Unit: "KiB", MemAccess: "shared"}}
	numa.Interconnects = nil
	cpu.Numa = &numa
	snippet, err := marshalElement(&cpu, "cpu")
	return c.setFix("domain", "cpu", snippet, err, "one NUMA cell, one RAM backend")
}

// setFix is a FixSet of snippet, or a note saying it could not be made.
func (c *checker) setFix(in, elem, snippet string, err error, extra string) Fix {
	if err != nil {
		return Fix{Note: fmt.Sprintf("libvirtdom: cannot write the <%s> snippet: %v", elem, err)}
	}
	return Fix{Op: FixSet, In: in, XML: snippet, Note: c.editNote(in, elem, extra)}
}

// removeFix is a FixRemove of v (a pointer, so that libvirtxml's
// MarshalXML methods run), written as the element name.
func (c *checker) removeFix(v any, name, extra string) Fix {
	snippet, err := marshalElement(v, name)
	if err != nil {
		return Fix{Note: fmt.Sprintf("libvirtdom: cannot write the <%s> element: %v; remove it in virsh edit %s", name, err, c.d.Name)}
	}
	return Fix{Op: FixRemove, In: "devices", XML: snippet, Note: c.removeNote(extra)}
}

// checkAgent checks for the agent's QMP socket.
func (c *checker) checkAgent() {
	s := findAgentSocket(qemuArgs(c.d))
	if s != nil && s.bad == "" {
		return
	}
	sock := path.Join(c.opts.AgentQMPDir, c.d.Name, "agent.qmp")
	args := qemuArgs(c.d)
	if s != nil && s.path != "" { // a unix socket in the wrong mode: fix it in place
		if strings.HasPrefix(s.path, "/") {
			sock = s.path
		}
		args[s.arg] = fixSocketArg(args[s.arg], s, sock)
	} else {
		args = append(args, agentArgs(sock)...)
	}
	var b strings.Builder
	b.WriteString("<qemu:commandline>\n")
	for _, a := range args {
		b.WriteString("  <qemu:arg value='" + attrEscape(a) + "'/>\n")
	}
	if c.d.QEMUCommandline != nil {
		for _, e := range c.d.QEMUCommandline.Envs {
			b.WriteString("  <qemu:env name='" + attrEscape(e.Name) + "' value='" + attrEscape(e.Value) + "'/>\n")
		}
	}
	b.WriteString("</qemu:commandline>")
	dir := path.Dir(sock)
	fix := Fix{Op: FixSet, In: "domain", XML: b.String(), Note: c.editNote("domain", "qemu:commandline",
		"declare the namespace on the root: <domain type='"+c.d.Type+"' xmlns:qemu='"+qemuNS+"'>; "+
			"the directory must be writable by libvirt-qemu and exist at every start: install -d -o libvirt-qemu -g libvirt-qemu "+dir+
			" (a systemd-tmpfiles line keeps it across reboots); libvirt marks the domain tainted: custom-argv")}
	msg := "no agent QMP socket in <qemu:commandline> (-qmp unix:PATH,server=on,wait=off)"
	if s != nil {
		msg = s.bad
	}
	if c.opts.MonitorPassthrough {
		c.add(Problem{Code: CodeNoAgentQMP, Severity: Warning, Fix: fix, Message: msg +
			": the agent goes through libvirt's monitor passthrough, ~1.2 ms a QMP call instead of ~0.3 ms on its own socket (several calls per checkpoint), and libvirt marks the domain tainted: custom-monitor"})
		return
	}
	c.add(Problem{Code: CodeNoAgentQMP, Severity: Error, Message: msg, Fix: fix})
}

// attrEscape escapes a value for a single-quoted XML attribute.
func attrEscape(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s)) // cannot fail on a strings.Builder
	return b.String()
}

// checkVideo checks for video devices with RAM of their own.
func (c *checker) checkVideo() {
	devs := c.devices()
	primary := 0
	for i, v := range devs.Videos {
		if v.Model.Primary == "yes" {
			primary = i
			break
		}
	}
	var bad []string
	for i, v := range devs.Videos {
		switch t := v.Model.Type; {
		case t == "none", t == "ramfb", t == "virtio" && i != primary:
		case t == "virtio":
			bad = append(bad, "virtio (virtio-vga as the primary video)")
		case t == "":
			bad = append(bad, "libvirt's default model")
		default:
			bad = append(bad, t)
		}
	}
	const snippet = "<video>\n  <model type='none'/>\n</video>"
	extra := "the guest then has no display: use its serial console (virsh console " + c.d.Name + ") and drop <graphics>"
	switch {
	case len(bad) > 0:
		c.add(Problem{Code: CodeVideoRAM, Severity: Error, Element: "video " + strings.Join(bad, ", "),
			Message: "the video device has its own video RAM outside the shared backend: no checkpoint carries it, and the primary agent refuses it",
			Fix:     Fix{Op: FixSet, In: "devices", XML: snippet, Note: c.editNote("devices", "video", extra)}})
	case len(devs.Videos) == 0 && len(devs.Graphics) > 0:
		c.add(Problem{Code: CodeVideoRAM, Severity: Error, Element: "graphics",
			Message: "<graphics> without <video>: libvirt adds a VGA, whose video RAM is outside the shared backend",
			Fix:     Fix{Op: FixSet, In: "devices", XML: snippet, Note: c.editNote("devices", "video", extra)}})
	}
}

// checkDevices checks the devices that hold or write guest RAM besides
// the backend: firmware flash, balloon, memory devices, host devices,
// shared filesystems, ivshmem.
func (c *checker) checkDevices() {
	d, devs := c.d, c.devices()
	if o := d.OS; o != nil && (o.Firmware == "efi" || o.Loader != nil && o.Loader.Type == "pflash") {
		want := *o
		want.Firmware, want.FirmwareInfo, want.NVRam, want.VarStore = "", nil, nil, nil
		want.Loader = &libvirtxml.DomainLoader{Type: "rom", Path: "/usr/share/ovmf/OVMF.fd"}
		snippet, err := marshalElement(&want, "os")
		c.add(Problem{Code: CodePflash, Severity: Error, Element: "os loader",
			Message: "UEFI firmware in pflash: its variable store is writable RAM outside the shared backend (system.flash1), which the primary agent refuses",
			Fix: c.setFix("domain", "os", snippet, err,
				"OVMF as a ROM (Debian's ovmf package) keeps UEFI variables in RAM, lost at power-off, and has no secure boot; or remove <loader> and <nvram> for SeaBIOS")})
	}
	if b := devs.MemBalloon; b != nil && b.Model != "none" {
		c.add(Problem{Code: CodeUntrackedWrites, Severity: Warning, Element: "memballoon " + b.Model,
			Message: "a balloon drops the pages the guest gives back from RAM behind QEMU's page tables: remusd uses the compare tracker, a pass over all of RAM twice per checkpoint (~100 ms per GiB)",
			Fix:     Fix{Op: FixSet, In: "devices", XML: "<memballoon model='none'/>", Note: c.editNote("devices", "memballoon", "")}})
	}
	for _, m := range devs.Memorydevs {
		c.add(Problem{Code: CodeMemoryDevice, Severity: Error, Element: "memory " + m.Model,
			Message: "a memory device has a RAM backend of its own: the agent replicates one backend",
			Fix:     c.removeFix(&m, "memory", "give its size to <memory> instead")})
	}
	for _, h := range devs.Hostdevs {
		c.add(Problem{Code: CodeHostdev, Severity: Error, Element: "hostdev " + hostdevName(h),
			Message: "host device passthrough: the device writes guest RAM by DMA behind QEMU's page tables, and its state cannot be saved for a checkpoint",
			Fix:     c.removeFix(&h, "hostdev", "")})
	}
	for _, f := range devs.Filesystems {
		name := "filesystem"
		if f.Target != nil {
			name += " " + f.Target.Dir
		}
		c.add(Problem{Code: CodeSharedFS, Severity: Error, Element: name,
			Message: "a shared filesystem: QEMU cannot save its device state while the guest uses it (and virtiofsd writes guest RAM itself)",
			Fix:     c.removeFix(&f, "filesystem", "share files over the network instead")})
	}
	for _, s := range devs.Shmems {
		c.add(Problem{Code: CodeShmem, Severity: Error, Element: "shmem " + s.Name,
			Message: "ivshmem: shared memory outside the guest RAM backend, written by other processes",
			Fix:     c.removeFix(&s, "shmem", "")})
	}
}

// hostdevName names a host device by its type and address.
func hostdevName(h libvirtxml.DomainHostdev) string {
	switch {
	case h.SubsysPCI != nil && h.SubsysPCI.Source != nil && h.SubsysPCI.Source.Address != nil:
		return "pci " + pciAddr(h.SubsysPCI.Source.Address)
	case h.SubsysPCI != nil:
		return "pci"
	case h.SubsysUSB != nil:
		return "usb"
	case h.SubsysSCSI != nil, h.SubsysSCSIHost != nil:
		return "scsi"
	case h.SubsysMDev != nil:
		return "mdev"
	}
	return "caps"
}

// pciAddr formats a PCI address as 0000:03:00.0.
func pciAddr(a *libvirtxml.DomainAddressPCI) string {
	v := func(p *uint) uint {
		if p == nil {
			return 0
		}
		return *p
	}
	return fmt.Sprintf("%04x:%02x:%02x.%x", v(a.Domain), v(a.Bus), v(a.Slot), v(a.Function))
}

// useTap is the note on removing a NIC remusd cannot hold.
const useTap = "attach the guest with <interface type='bridge'> (a tap) instead"

// checkNICs checks that the guest has one NIC, a tap.
func (c *checker) checkNICs() {
	sev := Error
	if c.opts.NoOutputCommit {
		sev = Warning
	}
	devs := c.devices()
	for i, iface := range devs.Interfaces {
		n := c.dom.NICs[i]
		el := "interface " + orDefault(n.MAC, n.Type)
		switch n.Type {
		case "network", "bridge", "ethernet":
		case "hostdev", "vdpa":
			c.add(Problem{Code: CodeHostdev, Severity: Error, Element: el,
				Message: "a " + n.Type + " NIC: the device writes guest RAM by DMA behind QEMU's page tables, and its state cannot be saved for a checkpoint",
				Fix:     c.removeFix(&iface, "interface", useTap)})
		case "vhostuser":
			c.add(Problem{Code: CodeUntrackedWrites, Severity: Warning, Element: el,
				Message: "vhost-user: another process writes guest RAM: remusd uses the compare tracker, a pass over all of RAM twice per checkpoint (~100 ms per GiB)",
				Fix:     c.removeFix(&iface, "interface", useTap)})
			fallthrough
		default:
			c.add(Problem{Code: CodeNIC, Severity: sev, Element: el,
				Message: fmt.Sprintf("a %s NIC has no tap whose output remusd could hold until its checkpoint is on the backup", orDefault(n.Type, "typeless")),
				Fix:     c.removeFix(&iface, "interface", useTap)})
		}
	}
	if len(devs.Interfaces) > 1 {
		var macs []string
		for _, n := range c.dom.NICs {
			macs = append(macs, orDefault(n.MAC, n.Type))
		}
		c.add(Problem{Code: CodeNICCount, Severity: sev, Element: "interfaces " + strings.Join(macs, ", "),
			Message: fmt.Sprintf("%d NICs: remusd holds the output of one", len(devs.Interfaces)),
			Fix:     Fix{Note: fmt.Sprintf("detach all NICs but one (virsh detach-interface %s TYPE --mac MAC --config)", c.d.Name)}})
	}
}

// checkDisks checks that the guest has at most one writable disk and that
// remusd can mirror it.
func (c *checker) checkDisks() {
	devs := c.devices()
	var writable []string
	for i, disk := range devs.Disks {
		dd := c.dom.Disks[i]
		el := "disk " + orDefault(dd.Target, dd.Source)
		switch {
		case dd.Device == "lun":
			want := disk
			want.Device = "disk"
			c.add(Problem{Code: CodeDisk, Severity: Error, Element: el,
				Message: "device='lun' passes SCSI commands to the host device, so its writes bypass the mirror",
				Fix:     c.replaceFix(disk, want, "")})
		case dd.Type == "vhostuser" || dd.Type == "vhostvdpa":
			c.add(Problem{Code: CodeDisk, Severity: Error, Element: el,
				Message: "a " + dd.Type + " disk is served outside QEMU's block layer, which remusd mirrors",
				Fix:     c.removeFix(&disk, "disk", "")})
		case dd.Type == "nvme":
			c.add(Problem{Code: CodeHostdev, Severity: Error, Element: el,
				Message: "an NVMe disk driven by QEMU through VFIO: the device writes guest RAM by DMA behind QEMU's page tables",
				Fix:     c.removeFix(&disk, "disk", "")})
		}
		if dd.Writable() {
			writable = append(writable, el)
			if dd.Shareable {
				want := disk
				want.Shareable = nil
				c.add(Problem{Code: CodeDiskShareable, Severity: Error, Element: el,
					Message: "a shareable disk: writes by other guests bypass this guest's mirror, so the backup's copy would miss them",
					Fix:     c.replaceFix(disk, want, "only if no other guest uses the disk")})
			}
		} else if dd.Source != "" {
			c.add(Problem{Code: CodeDiskNotMirrored, Severity: Warning, Element: el,
				Message: fmt.Sprintf("%s is not mirrored (read-only or removable media): the backup needs the same content at the same path", dd.Source),
				Fix:     Fix{Note: fmt.Sprintf("copy %s to the backup host, or eject it (virsh change-media %s %s --eject --config)", dd.Source, c.d.Name, dd.Target)}})
		}
		if dd.Cache == "unsafe" {
			want := disk
			drv := *disk.Driver
			drv.Cache = "none"
			want.Driver = &drv
			c.add(Problem{Code: CodeDiskCacheUnsafe, Severity: Warning, Element: el,
				Message: "cache='unsafe' ignores the guest's flushes: writes it made durable can be lost when a host dies",
				Fix:     c.replaceFix(disk, want, "")})
		}
	}
	if len(writable) > 1 {
		c.add(Problem{Code: CodeDiskCount, Severity: Error, Element: strings.Join(writable, ", "),
			Message: fmt.Sprintf("%d writable disks: remusd mirrors one", len(writable)),
			Fix:     Fix{Note: fmt.Sprintf("detach all writable disks but one, or make them <readonly/> (virsh detach-disk %s TARGET --config)", c.d.Name)}})
	}
}

// replaceFix is a FixReplace of the disk old by want.
func (c *checker) replaceFix(old, want libvirtxml.DomainDisk, extra string) Fix {
	o, err := marshalElement(&old, "disk")
	if err != nil {
		return Fix{Note: fmt.Sprintf("libvirtdom: cannot write the <disk> element: %v", err)}
	}
	w, err := marshalElement(&want, "disk")
	if err != nil {
		return Fix{Note: fmt.Sprintf("libvirtdom: cannot write the <disk> element: %v", err)}
	}
	note := fmt.Sprintf("virsh edit %s: replace this <disk> with the snippet", c.d.Name)
	if extra != "" {
		note += "; " + extra
	}
	return Fix{Op: FixReplace, In: "devices", Old: o, XML: w, Note: note}
}

// marshalElement writes v as the element name, indented as libvirt does
// and with empty elements closed at once (<acpi/>). v must be a pointer:
// libvirtxml's MarshalXML methods (which write an element's type
// attribute) have pointer receivers, and encoding/xml skips them for
// values.
func marshalElement(v any, name string) (string, error) {
	var b strings.Builder
	enc := xml.NewEncoder(&b)
	enc.Indent("", "  ")
	if err := enc.EncodeElement(v, xml.StartElement{Name: xml.Name{Local: name}}); err != nil {
		return "", err
	}
	if err := enc.Close(); err != nil {
		return "", err
	}
	return emptyElement.ReplaceAllString(b.String(), "$1/>"), nil
}

// emptyElement matches an element with nothing inside as encoding/xml
// writes it; it escapes < and > in attribute values, so [^<>]* stays inside
// the tag.
var emptyElement = regexp.MustCompile(`(<[A-Za-z][^<>]*)></[A-Za-z][^<>]*>`)

// orDefault returns s, or def when s is empty.
func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

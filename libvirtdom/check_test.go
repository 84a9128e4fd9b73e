package libvirtdom

import (
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

// readDomain returns a testdata domain's XML.
func readDomain(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name + ".xml")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// codes lists the problems as "severity code element", sorted.
func codes(ps []Problem) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Severity.String()+" "+string(p.Code)+" "+p.Element)
	}
	slices.Sort(out)
	return out
}

// TestCheckTestdata checks the realistic domains: what each summary says
// and every problem found, no more.
func TestCheckTestdata(t *testing.T) {
	for _, tc := range []struct {
		file string
		want []string
		dom  func(t *testing.T, d *Domain)
	}{{
		file: "ready",
		want: nil,
		dom: func(t *testing.T, d *Domain) {
			want := &Domain{Name: "web1", UUID: "4f1c2a6e-8d3b-4c57-9a0e-2b7d6c1e9f30", Type: "kvm", MemoryBytes: 2 << 30, VCPUs: 2,
				MachineType: "pc-q35-7.2", Arch: "x86_64", Emulator: "/usr/bin/qemu-system-x86_64", RAMBackend: "memfd",
				AgentQMP: "/run/remus/web1/agent.qmp",
				NICs:     []NIC{{Type: "bridge", MAC: "52:54:00:6b:3c:58", Model: "virtio", Source: "br0", Tap: "vnet4", Supported: true}},
				Disks: []Disk{
					{Target: "vda", Bus: "virtio", Device: "disk", Type: "file", Source: "/var/lib/libvirt/images/web1.raw", Format: "raw", Raw: true, Cache: "none"},
					{Target: "sda", Bus: "sata", Device: "cdrom", Type: "file", Format: "raw", Raw: true, ReadOnly: true},
				},
				Protect: &Metadata{Peer: "backup1:7700", Role: RolePrimary, Epoch: 25e6},
			}
			if !reflect.DeepEqual(d, want) {
				t.Errorf("domain\n%+v\nwant\n%+v", d, want)
			}
		},
	}, {
		file: "default",
		want: []string{
			"error no-agent-qmp ",
			"error ram-not-shared ",
			"error video-ram video vga",
			"warning disk-not-mirrored disk sda",
			"warning untracked-writes memballoon virtio",
		},
		dom: func(t *testing.T, d *Domain) {
			if d.RAMBackend != "" || d.AgentQMP != "" || d.Protect != nil {
				t.Errorf("RAMBackend %q AgentQMP %q Protect %v, want none", d.RAMBackend, d.AgentQMP, d.Protect)
			}
			if len(d.Disks) != 2 || d.Disks[0].Format != "qcow2" || d.Disks[0].Raw || d.Disks[1].Device != "cdrom" ||
				d.Disks[1].Source != "/var/lib/libvirt/images/debian-12.5.0-amd64-netinst.iso" {
				t.Errorf("disks %+v", d.Disks)
			}
			if len(d.NICs) != 1 || d.NICs[0] != (NIC{Type: "network", MAC: "52:54:00:1d:77:a2", Model: "virtio", Source: "default", Tap: "vnet2", Supported: true}) {
				t.Errorf("NICs %+v", d.NICs)
			}
		},
	}, {
		file: "passthrough",
		want: []string{
			"error hostdev hostdev pci 0000:3b:02.1",
			"error nic-count interfaces 52:54:00:a0:10:01, 52:54:00:a0:10:02",
			"error nic-unsupported interface 52:54:00:a0:10:02",
			"error no-agent-qmp ",
			"error shared-fs filesystem config",
			"warning untracked-writes interface 52:54:00:a0:10:02",
		},
		dom: func(t *testing.T, d *Domain) {
			if d.RAMBackend != "memfd" || d.AgentQMP != "" {
				t.Errorf("RAMBackend %q AgentQMP %q, want memfd and none (wait=on)", d.RAMBackend, d.AgentQMP)
			}
			want := []NIC{
				{Type: "bridge", MAC: "52:54:00:a0:10:01", Model: "virtio", Source: "br-mgmt", Tap: "vnet7", Driver: "vhost", Supported: true},
				{Type: "vhostuser", MAC: "52:54:00:a0:10:02", Model: "virtio", Source: "/var/run/openvswitch/vhu-nfv1", Tap: "vhu-nfv1"},
			}
			if !reflect.DeepEqual(d.NICs, want) {
				t.Errorf("NICs %+v, want %+v", d.NICs, want)
			}
			if len(d.Disks) != 1 || d.Disks[0].Type != "block" || d.Disks[0].Source != "/dev/vg0/nfv1" {
				t.Errorf("disks %+v", d.Disks)
			}
		},
	}, {
		file: "edge",
		want: []string{
			"error disk-count disk vda, disk vdb",
			"error disk-shareable disk vdb",
			"error memory-device memory virtio-mem",
			"error nic-unsupported interface 52:54:00:e4:01:01",
			"error no-agent-qmp ",
			"error numa-cells ",
			"error pflash os loader",
			"error shmem shmem edge-ipc",
			"error video-ram graphics",
			"warning disk-cache-unsafe disk vda",
			"warning untracked-writes memballoon virtio",
		},
		dom: func(t *testing.T, d *Domain) {
			// Both cells say memAccess='shared', which overrides the
			// backing's default.
			if d.RAMBackend != "file" || d.MemoryBytes != 5<<30 {
				t.Errorf("RAMBackend %q MemoryBytes %d, want file and 5 GiB", d.RAMBackend, d.MemoryBytes)
			}
		},
	}} {
		t.Run(tc.file, func(t *testing.T) {
			d, ps, err := Check(readDomain(t, tc.file), CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := codes(ps); !slices.Equal(got, tc.want) {
				t.Errorf("problems\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
			for _, p := range ps {
				if p.Message == "" || strings.Contains(p.Message, "\n") {
					t.Errorf("%s: message %q: want one line", p.Code, p.Message)
				}
				if (p.Fix.Op == FixNone) != (p.Fix.XML == "") || p.Fix.Note == "" || strings.Contains(p.Fix.Note, "\n") {
					t.Errorf("%s: fix %+v: want a snippet exactly when it has an op, and a one-line note", p.Code, p.Fix)
				}
			}
			tc.dom(t, d)
		})
	}
}

// parsePart parses a fix's snippet as a person pasting it would have it:
// inside <domain> (which declares the qemu prefix) or inside <devices>. It
// returns the Domain or DeviceList holding it.
func parsePart(t *testing.T, in, snippet string) reflect.Value {
	t.Helper()
	doc := snippet
	if in == "devices" {
		doc = "<devices>" + snippet + "</devices>"
	} else if in != "domain" {
		t.Fatalf("fix goes in %q", in)
	}
	var part libvirtxml.Domain
	if err := part.Unmarshal("<domain xmlns:qemu='" + qemuNS + "'>" + doc + "</domain>"); err != nil {
		t.Fatalf("snippet does not parse: %v\n%s", err, snippet)
	}
	if in == "devices" {
		return reflect.ValueOf(part.Devices).Elem()
	}
	return reflect.ValueOf(&part).Elem()
}

// onlyField returns the index of the one field set in a parsed snippet.
func onlyField(t *testing.T, v reflect.Value, snippet string) int {
	t.Helper()
	found := -1
	for i := range v.NumField() {
		if v.Type().Field(i).Name == "XMLName" || v.Field(i).IsZero() {
			continue
		}
		if found >= 0 {
			t.Fatalf("snippet sets %s and %s:\n%s", v.Type().Field(found).Name, v.Type().Field(i).Name, snippet)
		}
		found = i
	}
	if found < 0 {
		t.Fatalf("snippet sets nothing:\n%s", snippet)
	}
	return found
}

// applyFix applies a fix to d: its snippet parsed into libvirtxml and
// merged where it says.
func applyFix(t *testing.T, d *libvirtxml.Domain, f Fix) {
	t.Helper()
	dst := reflect.ValueOf(d).Elem()
	if f.In == "devices" {
		if d.Devices == nil {
			d.Devices = &libvirtxml.DomainDeviceList{}
		}
		dst = reflect.ValueOf(d.Devices).Elem()
	}
	src := parsePart(t, f.In, f.XML)
	i := onlyField(t, src, f.XML)
	field := dst.Field(i)
	switch f.Op {
	case FixSet:
		field.Set(src.Field(i))
	case FixRemove, FixReplace:
		target := src.Field(i)
		if f.Op == FixReplace {
			old := parsePart(t, f.In, f.Old)
			if j := onlyField(t, old, f.Old); j != i {
				t.Fatalf("old and new elements differ in kind:\n%s\n%s", f.Old, f.XML)
			}
			target = old.Field(i)
		}
		if field.Kind() != reflect.Slice || target.Len() != 1 {
			t.Fatalf("fix %v on a %s", f.Op, field.Type())
		}
		// Elements are compared as libvirtxml writes them: a parse may
		// leave an empty slice where another leaves nil.
		want := marshalValue(t, target.Index(0))
		for k := range field.Len() {
			if marshalValue(t, field.Index(k)) != want {
				continue
			}
			if f.Op == FixReplace {
				field.Index(k).Set(src.Field(i).Index(0))
			} else {
				field.Set(reflect.AppendSlice(field.Slice(0, k), field.Slice(k+1, field.Len())))
			}
			return
		}
		t.Fatalf("the element to change is not in the domain:\n%s", want)
	default:
		t.Fatalf("fix op %v has no snippet", f.Op)
	}
}

// marshalValue writes an addressable element value as XML.
func marshalValue(t *testing.T, v reflect.Value) string {
	t.Helper()
	s, err := marshalElement(v.Addr().Interface(), "element")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestFixesMakeCheckPass applies every fix snippet to the domain it was
// made for and checks the domain again: each problem that had a snippet is
// gone, and the two domains whose problems all have one now pass.
func TestFixesMakeCheckPass(t *testing.T) {
	for _, tc := range []struct {
		file string
		opts CheckOptions
		left []string // problems without a snippet that stay
	}{
		{"default", CheckOptions{}, []string{"warning disk-not-mirrored disk sda"}},
		{"default", CheckOptions{MonitorPassthrough: true, AgentQMPDir: "/var/lib/remus/qmp"}, []string{"warning disk-not-mirrored disk sda"}},
		{"passthrough", CheckOptions{}, nil},
		{"edge", CheckOptions{}, []string{"error disk-count disk vda, disk vdb"}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			doc := readDomain(t, tc.file)
			_, ps, err := Check(doc, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			var d libvirtxml.Domain
			if err := d.Unmarshal(doc); err != nil {
				t.Fatal(err)
			}
			var applied []Fix
			for _, p := range ps {
				if p.Fix.Op == FixNone || slices.Contains(applied, p.Fix) { // a vhost-user NIC has two problems, one fix
					continue
				}
				applyFix(t, &d, p.Fix)
				applied = append(applied, p.Fix)
			}
			fixed, err := d.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			dom, after, err := Check(fixed, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := codes(after); !slices.Equal(got, tc.left) {
				t.Errorf("after the fixes\n%s\nwant\n%s\n%s", strings.Join(got, "\n"), strings.Join(tc.left, "\n"), fixed)
			}
			if dom.RAMBackend == "" || dom.AgentQMP == "" {
				t.Errorf("after the fixes RAMBackend %q AgentQMP %q", dom.RAMBackend, dom.AgentQMP)
			}
		})
	}
}

// ready returns the ready domain with each old string replaced by the new
// one that follows it; each must be there.
func ready(t *testing.T, oldnew ...string) string {
	t.Helper()
	doc := readDomain(t, "ready")
	for i := 0; i < len(oldnew); i += 2 {
		if !strings.Contains(doc, oldnew[i]) {
			t.Fatalf("ready.xml has no %q", oldnew[i])
		}
		doc = strings.Replace(doc, oldnew[i], oldnew[i+1], 1)
	}
	return doc
}

const (
	agentArg  = "<qemu:arg value='unix:/run/remus/web1/agent.qmp,server=on,wait=off'/>"
	videoNone = "<video>\n      <model type='none'/>\n      <alias name='video0'/>\n    </video>"
	nic       = "<interface type='bridge'>"
	nicEnd    = "</interface>"
	readyNIC  = `    <interface type='bridge'>
      <mac address='52:54:00:6b:3c:58'/>
      <source bridge='br0'/>
      <target dev='vnet4'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
`
)

// TestCheckRules: one change to the ready domain at a time, and what Check
// says of it.
func TestCheckRules(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edits []string // old, new, ... in ready.xml
		opts  CheckOptions
		want  []string // problems
		dom   func(d *Domain) bool
	}{
		{name: "ready"},
		{name: "type qemu", edits: []string{"type='kvm'", "type='qemu'"}},
		{name: "type xen", edits: []string{"type='kvm'", "type='xen'"},
			want: []string{"error domain-type "}},
		{name: "arch", edits: []string{"arch='x86_64'", "arch='aarch64'"},
			want: []string{"error arch "}},
		{name: "anonymous RAM", edits: []string{"<source type='memfd'/>", "<source type='anonymous'/>"},
			want: []string{"error ram-not-shared "}},
		{name: "private RAM", edits: []string{"<access mode='shared'/>", "<access mode='private'/>"},
			want: []string{"error ram-not-shared "}},
		{name: "shared RAM without a source", edits: []string{"<source type='memfd'/>", ""},
			want: []string{"error ram-not-shared "}},
		{name: "file RAM", edits: []string{"<source type='memfd'/>", "<source type='file'/>"},
			dom: func(d *Domain) bool { return d.RAMBackend == "file" }},
		{name: "one NUMA cell, private", edits: []string{"<cpu mode='host-passthrough' check='none' migratable='on'/>", "<cpu mode='host-passthrough'><numa><cell id='0' cpus='0-1' memory='2097152' unit='KiB' memAccess='private'/></numa></cpu>"}, want: []string{"error numa-cells "}},
		{name: "one NUMA cell, shared over private backing", edits: []string{"<access mode='shared'/>", "", "<cpu mode='host-passthrough' check='none' migratable='on'/>", "<cpu mode='host-passthrough'><numa><cell id='0' cpus='0-1' memory='2097152' unit='KiB' memAccess='shared'/></numa></cpu>"}, dom: func(d *Domain) bool { return d.RAMBackend == "memfd" }},
		{name: "no qemu:commandline", edits: []string{agentArg, "", "<qemu:arg value='-qmp'/>", ""},
			want: []string{"error no-agent-qmp "}, dom: func(d *Domain) bool { return d.AgentQMP == "" }},
		{name: "monitor passthrough", edits: []string{agentArg, "", "<qemu:arg value='-qmp'/>", ""},
			opts: CheckOptions{MonitorPassthrough: true}, want: []string{"warning no-agent-qmp "}},
		{name: "qmp over tcp", edits: []string{agentArg, "<qemu:arg value='tcp:127.0.0.1:4444,server=on,wait=off'/>"}, want: []string{"error no-agent-qmp "}},
		{name: "qmp as a client", edits: []string{agentArg, "<qemu:arg value='unix:/run/remus/web1/agent.qmp'/>"}, want: []string{"error no-agent-qmp "}},
		{name: "qmp relative path", edits: []string{agentArg, "<qemu:arg value='unix:agent.qmp,server=on,wait=off'/>"}, want: []string{"error no-agent-qmp "}},
		{name: "qmp legacy flags and --qmp", edits: []string{"<qemu:arg value='-qmp'/>", "<qemu:arg value='--qmp'/>", agentArg, "<qemu:arg value='unix:/run/a,,b.qmp,server,nowait'/>"}, dom: func(d *Domain) bool { return d.AgentQMP == "/run/a,b.qmp" }},
		{name: "chardev and mon", edits: []string{"<qemu:arg value='-qmp'/>", "<qemu:arg value='-chardev'/>", agentArg, "<qemu:arg value='socket,id=remus,path=/run/remus/web1/mon.sock,server=on,wait=off'/><qemu:arg value='-mon'/><qemu:arg value='chardev=remus,mode=control'/>"}, dom: func(d *Domain) bool { return d.AgentQMP == "/run/remus/web1/mon.sock" }},
		{name: "chardev and an HMP mon", edits: []string{"<qemu:arg value='-qmp'/>", "<qemu:arg value='-chardev'/>", agentArg, "<qemu:arg value='socket,id=remus,path=/run/remus/web1/mon.sock,server=on,wait=off'/><qemu:arg value='-mon'/><qemu:arg value='chardev=remus'/>"}, want: []string{"error no-agent-qmp "}},
		{name: "qxl video", edits: []string{"<model type='none'/>", "<model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1' primary='yes'/>"},
			want: []string{"error video-ram video qxl"}},
		{name: "virtio video", edits: []string{"<model type='none'/>", "<model type='virtio' heads='1' primary='yes'/>"},
			want: []string{"error video-ram video virtio (virtio-vga as the primary video)"}},
		{name: "virtio video, not primary", edits: []string{videoNone, "<video><model type='ramfb'/></video><video><model type='virtio'/></video>"}},
		{name: "graphics without video", edits: []string{videoNone, "<graphics type='vnc' port='-1' autoport='yes'/>"}, want: []string{"error video-ram graphics"}},
		{name: "balloon", edits: []string{"<memballoon model='none'/>", "<memballoon model='virtio'/>"},
			want: []string{"warning untracked-writes memballoon virtio"}},
		{name: "uefi", edits: []string{"<os>", "<os firmware='efi'>"},
			want: []string{"error pflash os loader"}},
		{name: "uefi rom", edits: []string{"<boot dev='hd'/>", "<loader type='rom'>/usr/share/ovmf/OVMF.fd</loader><boot dev='hd'/>"}},
		{name: "dimm", edits: []string{"<memballoon model='none'/>", "<memballoon model='none'/><memory model='dimm'><target><size unit='GiB'>1</size><node>0</node></target></memory>"}, want: []string{"error memory-device memory dimm"}},
		{name: "usb hostdev", edits: []string{"<memballoon model='none'/>", "<memballoon model='none'/><hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0xbeef'/></source></hostdev>"}, want: []string{"error hostdev hostdev usb"}},
		{name: "9p", edits: []string{"<memballoon model='none'/>", "<memballoon model='none'/><filesystem type='mount'><source dir='/srv'/><target dir='srv'/></filesystem>"}, want: []string{"error shared-fs filesystem srv"}},
		{name: "ivshmem", edits: []string{"<memballoon model='none'/>", "<memballoon model='none'/><shmem name='x'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>"}, want: []string{"error shmem shmem x"}},
		{name: "vhost-net", edits: []string{"<model type='virtio'/>", "<model type='virtio'/><driver name='vhost'/>"},
			dom: func(d *Domain) bool { return d.NICs[0].Driver == "vhost" && d.NICs[0].Supported }},
		{name: "ethernet tap", edits: []string{nic, "<interface type='ethernet'>", "<source bridge='br0'/>", "", "<target dev='vnet4'/>", "<target dev='tap-web1' managed='no'/>"}, dom: func(d *Domain) bool {
			return d.NICs[0].Type == "ethernet" && d.NICs[0].Tap == "tap-web1" && d.NICs[0].Supported
		}},
		{name: "user NIC", edits: []string{nic, "<interface type='user'>", "<source bridge='br0'/>", ""},
			want: []string{"error nic-unsupported interface 52:54:00:6b:3c:58"}},
		{name: "user NIC, no output commit", edits: []string{nic, "<interface type='user'>", "<source bridge='br0'/>", ""},
			opts: CheckOptions{NoOutputCommit: true}, want: []string{"warning nic-unsupported interface 52:54:00:6b:3c:58"}},
		{name: "hostdev NIC", edits: []string{nic, "<interface type='hostdev' managed='yes'>", "<source bridge='br0'/>", "<source><address type='pci' domain='0x0000' bus='0x3b' slot='0x10' function='0x2'/></source>"}, want: []string{"error hostdev interface 52:54:00:6b:3c:58"}},
		{name: "vdpa NIC", edits: []string{nic, "<interface type='vdpa'>", "<source bridge='br0'/>", "<source dev='/dev/vhost-vdpa-0'/>"},
			want: []string{"error hostdev interface 52:54:00:6b:3c:58"}},
		{name: "two NICs", edits: []string{nicEnd, nicEnd + "<interface type='bridge'><mac address='52:54:00:6b:3c:59'/><source bridge='br1'/><model type='virtio'/></interface>"}, want: []string{"error nic-count interfaces 52:54:00:6b:3c:58, 52:54:00:6b:3c:59"}},
		{name: "no NIC", edits: []string{readyNIC, ""}, dom: func(d *Domain) bool { return len(d.NICs) == 0 }},
		{name: "lun", edits: []string{"<disk type='file' device='disk'>", "<disk type='block' device='lun'>", "<source file='/var/lib/libvirt/images/web1.raw' index='2'/>", "<source dev='/dev/sdb'/>"}, want: []string{"error disk-unsupported disk vda"}},
		{name: "readonly disk", edits: []string{"<target dev='vda' bus='virtio'/>", "<target dev='vda' bus='virtio'/><readonly/>"}, want: []string{"warning disk-not-mirrored disk vda"}},
		{name: "shareable disk", edits: []string{"<target dev='vda' bus='virtio'/>", "<target dev='vda' bus='virtio'/><shareable/>"}, want: []string{"error disk-shareable disk vda"}},
		{name: "cache unsafe", edits: []string{"cache='none'", "cache='unsafe'"},
			want: []string{"warning disk-cache-unsafe disk vda"}},
		{name: "qcow2", edits: []string{"type='raw' cache='none'", "type='qcow2' cache='none'"},
			dom: func(d *Domain) bool { return d.Disks[0].Format == "qcow2" && !d.Disks[0].Raw }},
		{name: "bad metadata", edits: []string{`role="primary"`, `role="leader"`},
			want: []string{"error bad-metadata "}, dom: func(d *Domain) bool { return d.Protect == nil }},
		{name: "memory in GiB", edits: []string{"<memory unit='KiB'>2097152</memory>", "<memory unit='G'>3</memory>"},
			dom: func(d *Domain) bool { return d.MemoryBytes == 3<<30 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, ps, err := Check(ready(t, tc.edits...), tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := codes(ps); !slices.Equal(got, tc.want) {
				t.Errorf("problems %q, want %q", got, tc.want)
			}
			if tc.dom != nil && !tc.dom(d) {
				t.Errorf("domain %+v", d)
			}
		})
	}
}

// TestAgentFix: the agent socket's snippet keeps the other arguments, fixes
// a socket in the wrong mode in place, and says what it costs.
func TestAgentFix(t *testing.T) {
	doc := ready(t, agentArg, "<qemu:arg value='unix:/run/remus/web1/agent.qmp,server=on,wait=on'/><qemu:arg value='-d'/><qemu:arg value='guest_errors'/><qemu:env name='TZ' value='UTC'/>")
	_, ps, err := Check(doc, CheckOptions{})
	if err != nil || len(ps) != 1 {
		t.Fatalf("Check = %v, %v", ps, err)
	}
	want := "<qemu:commandline>\n" +
		"  <qemu:arg value='-qmp'/>\n" +
		"  <qemu:arg value='unix:/run/remus/web1/agent.qmp,server=on,wait=off'/>\n" +
		"  <qemu:arg value='-d'/>\n" +
		"  <qemu:arg value='guest_errors'/>\n" +
		"  <qemu:env name='TZ' value='UTC'/>\n" +
		"</qemu:commandline>"
	if ps[0].Fix.XML != want {
		t.Errorf("fix\n%s\nwant\n%s", ps[0].Fix.XML, want)
	}
	for _, s := range []string{"xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'", "libvirt-qemu", "/run/remus/web1", "custom-argv"} {
		if !strings.Contains(ps[0].Fix.Note, s) {
			t.Errorf("note %q does not say %q", ps[0].Fix.Note, s)
		}
	}
	_, ps, _ = Check(ready(t, agentArg, "", "<qemu:arg value='-qmp'/>", ""), CheckOptions{MonitorPassthrough: true})
	for _, s := range []string{"1.2 ms", "0.3 ms", "custom-monitor"} {
		if !strings.Contains(ps[0].Message, s) {
			t.Errorf("passthrough warning %q does not say %q", ps[0].Message, s)
		}
	}
}

// TestCheckErrors: what is not a domain, or lacks a name or UUID, is an
// error that says what failed on what.
func TestCheckErrors(t *testing.T) {
	for _, tc := range []struct {
		name, doc, want string
	}{
		{"empty", "", "libvirtdom: parse domain XML: EOF"},
		{"not XML", "domain", "libvirtdom: parse domain XML: EOF"},
		{"network", "<network><name>default</name></network>", "libvirtdom: parse domain XML: expected element type <domain> but have <network>"},
		{"no name", "<domain type='kvm'><uuid>4f1c2a6e-8d3b-4c57-9a0e-2b7d6c1e9f30</uuid></domain>", "libvirtdom: parse domain XML: no <name>"},
		{"no uuid", "<domain type='kvm'><name>web1</name></domain>", "libvirtdom: domain web1: parse XML: no <uuid>"},
		{"bad uuid", "<domain type='kvm'><name>web1</name><uuid>nope</uuid></domain>", `libvirtdom: domain web1: parse XML: <uuid> "nope" is not a UUID`},
		{"broken later", "<domain type='kvm'><name>web1</name><devices><interface></interface></devices></domain>", "libvirtdom: domain web1: parse XML: Missing interface type attribute"},
		{"bad memory unit", "<domain type='kvm'><name>web1</name><uuid>4f1c2a6e-8d3b-4c57-9a0e-2b7d6c1e9f30</uuid><memory unit='furlongs'>1</memory></domain>",
			`libvirtdom: domain web1: <memory>: unknown unit "furlongs"`},
		{"memory overflow", "<domain type='kvm'><name>web1</name><uuid>4f1c2a6e-8d3b-4c57-9a0e-2b7d6c1e9f30</uuid><memory unit='EiB'>4096</memory></domain>",
			"libvirtdom: domain web1: <memory>: 4096 EiB does not fit in 64 bits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, ps, err := Check(tc.doc, CheckOptions{})
			if err == nil || err.Error() != tc.want {
				t.Fatalf("Check = %v, %v, %v; want error %q", d, ps, err, tc.want)
			}
		})
	}
}

// TestSplitOpts: QEMU's ",," is a comma inside a value.
func TestSplitOpts(t *testing.T) {
	for in, want := range map[string][]string{
		"":                  {""},
		"a":                 {"a"},
		"unix:/a,,b,server": {"unix:/a,,b", "server"},
		"a,,,b":             {"a,,", "b"},
		"a,":                {"a", ""},
	} {
		if got := splitOpts(in); !slices.Equal(got, want) {
			t.Errorf("splitOpts(%q) = %q, want %q", in, got, want)
		}
	}
}

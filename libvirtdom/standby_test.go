package libvirtdom

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"
)

// TestStandby builds the ready domain's standby and checks that it differs
// from the primary in exactly the documented ways.
func TestStandby(t *testing.T) {
	primary := readDomain(t, "ready")
	out, err := Standby(primary, StandbyOptions{
		AgentQMP:  "/run/remus/web1/standby.qmp",
		Peer:      "primary1:7700",
		DiskPaths: map[string]string{"vda": "/var/lib/remus/web1/disk.raw"},
	})
	if err != nil {
		t.Fatal(err)
	}
	dom, ps, err := Check(out, CheckOptions{})
	if err != nil || len(ps) != 0 {
		t.Fatalf("Check(standby) = %v, %v\n%s", ps, err, out)
	}
	if dom.AgentQMP != "/run/remus/web1/standby.qmp" || dom.Name != "web1" || dom.UUID != "4f1c2a6e-8d3b-4c57-9a0e-2b7d6c1e9f30" {
		t.Errorf("standby %+v", dom)
	}
	if want := (Metadata{Peer: "primary1:7700", Role: RoleStandby, Epoch: 25 * time.Millisecond}); dom.Protect == nil || !sameMetadata(*dom.Protect, want) {
		t.Errorf("standby metadata %+v, want %+v", dom.Protect, want)
	}
	if !strings.Contains(out, `<libosinfo:os id="http://debian.org/debian/12"/>`) {
		t.Errorf("standby lost the other metadata:\n%s", out)
	}

	// The primary with the documented changes made by hand is the standby.
	var want, got libvirtxml.Domain
	if err := want.Unmarshal(primary); err != nil {
		t.Fatal(err)
	}
	if err := got.Unmarshal(out); err != nil {
		t.Fatal(err)
	}
	want.ID = nil
	want.QEMUCommandline.Args = []libvirtxml.DomainQEMUCommandlineArg{
		{Value: "-qmp"}, {Value: "unix:/run/remus/web1/standby.qmp,server=on,wait=off"}, {Value: "-incoming"}, {Value: "defer"}}
	want.Devices.Disks[0].Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: "/var/lib/remus/web1/disk.raw"}}
	want.Devices.Disks[0].BackingStore = nil
	want.Metadata, got.Metadata = nil, nil
	w, _ := want.Marshal()
	g, _ := got.Marshal()
	if w != g {
		a, _ := canonical(w)
		b, _ := canonical(g)
		t.Errorf("standby differs from the primary beyond the documented changes: %q", diff(a, b))
	}
}

// sameMetadata compares two Metadata values.
func sameMetadata(a, b Metadata) bool {
	return a.Peer == b.Peer && a.Role == b.Role && a.Epoch == b.Epoch && slices.Equal(a.Attrs, b.Attrs)
}

// TestStandbyChanges: the other cases Standby handles.
func TestStandbyChanges(t *testing.T) {
	opts := StandbyOptions{AgentQMP: "/run/remus/web1/standby.qmp", Peer: "primary1"}
	t.Run("qcow2 block disk becomes a raw block device", func(t *testing.T) {
		doc := ready(t, "<disk type='file' device='disk'>", "<disk type='block' device='disk'>",
			"type='raw' cache='none'", "type='qcow2' cache='none'",
			"<source file='/var/lib/libvirt/images/web1.raw' index='2'/>", "<source dev='/dev/vg0/web1' index='2'/>")
		o := opts
		o.DiskPaths = map[string]string{"vda": "/dev/vg1/web1-backup"}
		out, err := Standby(doc, o)
		if err != nil {
			t.Fatal(err)
		}
		d, _, err := Check(out, CheckOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if disk := d.Disks[0]; disk.Type != "block" || disk.Source != "/dev/vg1/web1-backup" || !disk.Raw || disk.Format != "raw" {
			t.Errorf("disk %+v", disk)
		}
	})
	t.Run("-incoming replaced, name and UUID overridden", func(t *testing.T) {
		doc := ready(t, agentArg, agentArg+"<qemu:arg value='-incoming'/><qemu:arg value='tcp:0:4444'/>")
		o := opts
		o.Name, o.UUID = "web1-standby", "11111111-2222-3333-4444-555555555555"
		out, err := Standby(doc, o)
		if err != nil {
			t.Fatal(err)
		}
		var d libvirtxml.Domain
		if err := d.Unmarshal(out); err != nil {
			t.Fatal(err)
		}
		if args := qemuArgs(&d); !slices.Equal(args, []string{"-qmp", "unix:/run/remus/web1/standby.qmp,server=on,wait=off", "-incoming", "defer"}) {
			t.Errorf("args %q", args)
		}
		if d.Name != o.Name || d.UUID != o.UUID {
			t.Errorf("name %q UUID %q", d.Name, d.UUID)
		}
	})
	t.Run("passthrough primary gets a socket", func(t *testing.T) {
		doc := ready(t, agentArg, "", "<qemu:arg value='-qmp'/>", "")
		o := opts
		o.Check.MonitorPassthrough = true
		out, err := Standby(doc, o)
		if err != nil {
			t.Fatal(err)
		}
		if d, _, err := Check(out, CheckOptions{}); err != nil || d.AgentQMP != o.AgentQMP {
			t.Errorf("standby agent socket %q, %v", d.AgentQMP, err)
		}
		if d, _, _ := Check(out, CheckOptions{}); d.Protect == nil || d.Protect.Epoch != 25*time.Millisecond || d.Protect.Role != RoleStandby {
			t.Errorf("standby metadata %+v", d.Protect)
		}
	})
	t.Run("chardev socket moved", func(t *testing.T) {
		doc := ready(t, "<qemu:arg value='-qmp'/>", "<qemu:arg value='-chardev'/>",
			agentArg, "<qemu:arg value='socket,id=remus,path=/run/remus/web1/mon.sock,server=on,wait=off'/><qemu:arg value='-mon'/><qemu:arg value='chardev=remus,mode=control'/>")
		out, err := Standby(doc, opts)
		if err != nil {
			t.Fatal(err)
		}
		var d libvirtxml.Domain
		if err := d.Unmarshal(out); err != nil {
			t.Fatal(err)
		}
		want := []string{"-chardev", "socket,id=remus,path=/run/remus/web1/standby.qmp,server=on,wait=off", "-mon", "chardev=remus,mode=control", "-incoming", "defer"}
		if args := qemuArgs(&d); !slices.Equal(args, want) {
			t.Errorf("args %q, want %q", args, want)
		}
	})
}

// TestStandbyRefuses: a primary that cannot be protected, bad options, and
// XML libvirtxml would not write back whole.
func TestStandbyRefuses(t *testing.T) {
	opts := StandbyOptions{AgentQMP: "/run/remus/web1/standby.qmp", Peer: "primary1:7700"}
	for _, tc := range []struct {
		name string
		doc  func(t *testing.T) string
		o    func(o *StandbyOptions)
		want string
	}{
		{"not protectable", func(t *testing.T) string { return readDomain(t, "default") }, nil,
			"libvirtdom: domain db1: standby: the primary cannot be protected: ram-not-shared, no-agent-qmp, video-ram"},
		{"relative socket", func(t *testing.T) string { return ready(t) }, func(o *StandbyOptions) { o.AgentQMP = "standby.qmp" },
			`libvirtdom: domain web1: standby: agent QMP socket "standby.qmp": want an absolute path`},
		{"bad peer", func(t *testing.T) string { return ready(t) }, func(o *StandbyOptions) { o.Peer = "primary1:0" },
			`libvirtdom: domain web1: standby: peer "primary1:0": port "0": want 1-65535`},
		{"unknown disk", func(t *testing.T) string { return ready(t) }, func(o *StandbyOptions) { o.DiskPaths = map[string]string{"vdz": "/x", "vda": "/y"} },
			"libvirtdom: domain web1: standby: no disk with target vdz"},
		{"relative disk", func(t *testing.T) string { return ready(t) }, func(o *StandbyOptions) { o.DiskPaths = map[string]string{"vda": "x.raw"} },
			`libvirtdom: domain web1: standby: disk vda: backup image "x.raw": want an absolute path`},
		{"bad UUID", func(t *testing.T) string { return ready(t) }, func(o *StandbyOptions) { o.UUID = "x" },
			`libvirtdom: domain web1: standby: UUID "x" is not a UUID`},
		{"lossy", func(t *testing.T) string {
			return ready(t, "<memballoon model='none'/>", "<memballoon model='none'/><frobnicator speed='11'/>")
		}, nil,
			`libvirtdom: domain web1: standby: libvirtxml does not keep all of this domain's XML: lost /domain[1]/devices[1]/frobnicator[1] speed="11"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := opts
			if tc.o != nil {
				tc.o(&o)
			}
			out, err := Standby(tc.doc(t), o)
			if err == nil || err.Error() != tc.want {
				t.Fatalf("Standby = %v\nwant error %q\n%s", err, tc.want, out)
			}
			if tc.name == "lossy" && !errors.Is(err, ErrLossy) {
				t.Errorf("%v is not ErrLossy", err)
			}
		})
	}
}

// TestLosslessTestdata: libvirtxml writes back everything in the testdata
// domains (what Standby relies on).
func TestLosslessTestdata(t *testing.T) {
	for _, f := range []string{"ready", "default", "passthrough", "edge"} {
		doc := readDomain(t, f)
		var d libvirtxml.Domain
		if err := d.Unmarshal(doc); err != nil {
			t.Fatal(err)
		}
		if err := lossless(doc, &d); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// TestStandbyArgs: the standby of a primary whose device state has no
// configuration section expects none, and per-host paths in the QEMU
// arguments are rewritten.
func TestStandbyArgs(t *testing.T) {
	primary := strings.Replace(readDomain(t, "ready"), "</qemu:commandline>",
		"<qemu:arg value='-netdev'/><qemu:arg value='stream,id=n0,server=on,addr.type=unix,addr.path=/run/remus/web1/net.sock'/></qemu:commandline>", 1)
	out, err := Standby(primary, StandbyOptions{
		AgentQMP: "/run/remus/web1-standby/agent.qmp", Peer: "primary1:7700", DeviceStateXen: true,
		ArgPaths: map[string]string{"/run/remus/web1/": "/run/remus/web1-standby/"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(out); err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, a := range d.QEMUCommandline.Args {
		args = append(args, a.Value)
	}
	want := []string{"-qmp", "unix:/run/remus/web1-standby/agent.qmp,server=on,wait=off",
		"-netdev", "stream,id=n0,server=on,addr.type=unix,addr.path=/run/remus/web1-standby/net.sock",
		"-incoming", "defer", "-global", "migration.send-configuration=off"}
	if !slices.Equal(args, want) {
		t.Fatalf("standby's QEMU arguments %q, want %q", args, want)
	}
}

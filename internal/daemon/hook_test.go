package daemon

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// domainXML is a domain's XML with metadata inside <metadata> ("" for
// none).
func domainXML(name, metadata string) string {
	meta := ""
	if metadata != "" {
		meta = "\n  <metadata>\n    " + metadata + "\n  </metadata>"
	}
	return fmt.Sprintf(`<domain type='kvm'>
  <name>%s</name>
  <uuid>4f1c2a6e-8d3b-4c57-9a0e-2b7d6c1e9f30</uuid>%s
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
`, name, meta)
}

func protectElement(role string) string {
	return `<remus:protect xmlns:remus="https://remus-kvm.org/xmlns/domain/1.0" peer="b:7790" role="` + role + `"/>`
}

func TestHookIgnores(t *testing.T) {
	d := newTestDaemon(t)
	for _, tc := range []struct {
		name string
		xml  string
		want string
	}{
		{"no metadata", domainXML("web", ""), "ignored: domain web has no remus metadata"},
		{"other metadata", domainXML("web", `<app:x xmlns:app="https://example.org/app"/>`), "ignored: domain web has no remus metadata"},
		{"bad role", domainXML("web", protectElement("tertiary")), "ignored: domain web: remus metadata: "},
		{"bad peer", domainXML("web", `<remus:protect xmlns:remus="https://remus-kvm.org/xmlns/domain/1.0" peer="b:99999" role="primary"/>`),
			"ignored: domain web: remus metadata: "},
		{"two elements", domainXML("web", protectElement("primary")+protectElement("primary")), "ignored: domain web: remus metadata: "},
		{"not XML", "<domain><name>web", "ignored: domain web: remus metadata: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, op := range [][2]string{{"stopped", "end"}, {"started", "begin"}, {"prepare", "begin"}} {
				got := d.Hook(HookEvent{Domain: "web", Op: op[0], SubOp: op[1], XML: tc.xml})
				if !strings.HasPrefix(got, tc.want) {
					t.Errorf("%s %s: %q, want %q...", op[0], op[1], got, tc.want)
				}
			}
		})
	}
}

func TestHookStoppedEnd(t *testing.T) {
	d := newTestDaemon(t)
	web := addVM(d, record{Name: "web", Role: RolePrimary, Domain: "web", Peer: "b:7790", Args: []string{"primary"}, Wanted: true})
	got := d.Hook(HookEvent{Domain: "web", Op: "stopped", SubOp: "end", XML: domainXML("web", protectElement("primary"))})
	if got != "domain web: stopped; its agent is not started again" {
		t.Errorf("stopped end of a primary: %q", got)
	}
	if web.snapshot().Wanted {
		t.Error("stopped end of a primary: its agent is still wanted")
	}
	rec := waitRecord(t, d, "web", func(record) bool { return true })
	if rec.Wanted || rec.Role != RolePrimary || rec.Peer != "b:7790" {
		t.Errorf("saved record: %+v; want web, primary, not wanted", rec)
	}

	// On the backup host the standby domain's events change nothing: its
	// agent decides itself.
	db := addVM(d, record{Name: "db", Role: RoleBackup, Domain: "db", Wanted: true})
	got = d.Hook(HookEvent{Domain: "db", Op: "stopped", SubOp: "end", XML: domainXML("db", protectElement("standby"))})
	if got != "nothing to do for stopped end" || !db.snapshot().Wanted {
		t.Errorf("stopped end of a standby domain: %q, wanted %v", got, db.snapshot().Wanted)
	}
	if _, err := os.Stat(d.recordPath("db")); !os.IsNotExist(err) {
		t.Errorf("stopped end of a standby domain saved its record: %v", err)
	}

	// A domain the daemon has no record of.
	got = d.Hook(HookEvent{Domain: "ghost", Op: "stopped", SubOp: "end", XML: domainXML("ghost", protectElement("primary"))})
	if got != "nothing to do for stopped end" {
		t.Errorf("stopped end of an unknown domain: %q", got)
	}
	if d.get("ghost") != nil {
		t.Error("stopped end of an unknown domain made a record")
	}
}

func TestHookOtherEvents(t *testing.T) {
	d := newTestDaemon(t)
	for _, tc := range []struct {
		op, subOp, role string
		want            string
	}{
		{"started", "begin", "standby", "nothing to do for started begin"},
		{"stopped", "begin", "primary", "nothing to do for stopped begin"},
		{"release", "end", "primary", "nothing to do for release end"},
	} {
		got := d.Hook(HookEvent{Domain: "web", Op: tc.op, SubOp: tc.subOp, XML: domainXML("web", protectElement(tc.role))})
		if got != tc.want {
			t.Errorf("%s %s of a %s domain: %q, want %q", tc.op, tc.subOp, tc.role, got, tc.want)
		}
	}
	// started begin of a primary answers at once; protecting it goes on
	// in the background (until the test's daemon context ends).
	got := d.Hook(HookEvent{Domain: "web", Op: "started", SubOp: "begin", XML: domainXML("web", protectElement("primary"))})
	if got != "domain web: protecting it with b:7790 as its backup once it runs" {
		t.Errorf("started begin of a primary: %q", got)
	}
}

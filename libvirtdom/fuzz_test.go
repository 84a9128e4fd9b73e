package libvirtdom

import (
	"strings"
	"testing"
)

// FuzzCheck: no domain XML makes Check, ParseMetadata, SetMetadata or
// Standby panic, and what Check accepts has well-formed problems.
func FuzzCheck(f *testing.F) {
	for _, name := range []string{"ready", "default", "passthrough", "edge"} {
		f.Add(readDomain(f, name))
	}
	f.Add("<domain type='kvm'><name>a</name><uuid>4f1c2a6e-8d3b-4c57-9a0e-2b7d6c1e9f30</uuid></domain>")
	f.Add("<domain type='qemu' xmlns:qemu='" + qemuNS + "'><name>a</name><uuid>4f1c2a6e8d3b4c579a0e2b7d6c1e9f30</uuid><os><type arch='x86_64'>hvm</type></os>" +
		"<qemu:commandline><qemu:arg value='-chardev'/><qemu:arg value='socket,id=m,path=/a,,b,server,nowait'/><qemu:arg value='-mon'/><qemu:arg value='m,mode=control'/></qemu:commandline></domain>")
	f.Add("<domain><name>a</name><metadata/><cpu><numa><cell memory='1' unit='EiB'/><cell memory='99999999999' unit='EiB'/></numa></cpu></domain>")
	f.Fuzz(func(t *testing.T, doc string) {
		m, _, _ := ParseMetadata(doc)
		if m != nil {
			if _, err := SetMetadata(doc, *m); err != nil {
				t.Fatalf("SetMetadata of what ParseMetadata read: %v", err)
			}
		}
		d, ps, err := Check(doc, CheckOptions{})
		if err != nil {
			if !strings.HasPrefix(err.Error(), "libvirtdom: ") {
				t.Fatalf("error %q does not say where it comes from", err)
			}
			return
		}
		if d == nil {
			t.Fatal("no domain and no error")
		}
		for _, p := range ps {
			if p.Code == "" || p.Message == "" || p.Fix.Note == "" || (p.Fix.Op != FixNone && p.Fix.XML == "") {
				t.Fatalf("malformed problem %+v", p)
			}
		}
		if len(Blocking(ps)) == 0 {
			if _, err := Standby(doc, StandbyOptions{AgentQMP: "/run/s.qmp", Peer: "p"}); err != nil && !strings.HasPrefix(err.Error(), "libvirtdom: ") {
				t.Fatalf("Standby error %q does not say where it comes from", err)
			}
		}
	})
}

// TestCheckMangled is FuzzCheck's property on cheap deterministic
// mutations of the testdata domains (every prefix at a stride, one byte
// dropped or doubled), so that plain `go test` covers more than the seeds.
func TestCheckMangled(t *testing.T) {
	for _, name := range []string{"ready", "default", "passthrough", "edge"} {
		doc := readDomain(t, name)
		for i := 0; i < len(doc); i += 11 {
			for _, m := range []string{doc[:i], doc[:i] + doc[i+1:], doc[:i+1] + doc[i:]} {
				_, _, err := Check(m, CheckOptions{})
				if err != nil && !strings.HasPrefix(err.Error(), "libvirtdom: ") {
					t.Fatalf("error %q does not say where it comes from", err)
				}
				ParseMetadata(m)
			}
		}
	}
}

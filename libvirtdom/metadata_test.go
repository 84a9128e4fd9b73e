package libvirtdom

import (
	"encoding/xml"
	"strings"
	"testing"
	"time"
)

// withoutLines returns doc without the lines that contain any of subs.
func withoutLines(doc string, subs ...string) string {
	var keep []string
	for _, l := range strings.Split(doc, "\n") {
		drop := false
		for _, s := range subs {
			drop = drop || strings.Contains(l, s)
		}
		if !drop {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// TestSetMetadata: the element is added, or replaces the one there, and
// nothing else in the document changes.
func TestSetMetadata(t *testing.T) {
	m := Metadata{Peer: "backup1:7700", Role: RolePrimary, Epoch: 40 * time.Millisecond}
	for _, tc := range []struct {
		name    string
		doc     string
		changed []string // the lines that may differ
	}{
		{"into existing metadata", readDomain(t, "default"), []string{"remus:protect"}},
		{"no metadata", readDomain(t, "edge"), []string{"remus:protect", "metadata>"}},
		{"replaces", readDomain(t, "ready"), []string{"remus:protect"}},
		{"empty metadata element", "<domain type='kvm'>\n  <name>a</name>\n  <metadata/>\n</domain>", []string{"metadata", "remus:protect"}},
		{"empty metadata", "<domain type='kvm'><name>a</name><metadata></metadata></domain>", nil},
		{"two elements", "<domain type='kvm'><name>a</name><metadata><remus:protect xmlns:remus='" + Namespace + "' peer='x' role='primary'/><remus:protect xmlns:remus='" + Namespace + "' peer='y' role='standby'/></metadata></domain>", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := SetMetadata(tc.doc, m)
			if err != nil {
				t.Fatal(err)
			}
			got, ok, err := ParseMetadata(out)
			if err != nil || !ok || !sameMetadata(*got, m) {
				t.Fatalf("ParseMetadata = %+v, %v, %v, want %+v\n%s", got, ok, err, m, out)
			}
			if tc.changed != nil && withoutLines(out, tc.changed...) != withoutLines(tc.doc, tc.changed...) {
				t.Errorf("more than the metadata changed:\n%s", out)
			}
			if strings.Count(out, "<remus:protect") != 1 {
				t.Errorf("want one element:\n%s", out)
			}
		})
	}
	if _, err := SetMetadata(readDomain(t, "ready"), Metadata{Peer: "b", Role: "leader"}); err == nil ||
		err.Error() != `libvirtdom: domain web1: remus metadata: role "leader": want "primary" or "standby"` {
		t.Errorf("SetMetadata with a bad role: %v", err)
	}
	if _, err := SetMetadata("<network/>", m); err == nil || err.Error() != "libvirtdom: parse domain XML: root element is <network>, not <domain>" {
		t.Errorf("SetMetadata on a network: %v", err)
	}
}

// TestParseMetadata: present, absent, malformed, a prefix declared on the
// root, attributes of a newer version kept.
func TestParseMetadata(t *testing.T) {
	wrap := func(el string) string {
		return "<domain type='kvm' xmlns:r='" + Namespace + "'><name>a</name><metadata>" + el + "</metadata></domain>"
	}
	for _, tc := range []struct {
		name, doc string
		want      *Metadata
		err       string
	}{
		{"absent", readDomain(t, "default"), nil, ""},
		{"present", readDomain(t, "ready"), &Metadata{Peer: "backup1:7700", Role: RolePrimary, Epoch: 25 * time.Millisecond}, ""},
		{"prefix on the root", wrap("<r:protect peer='[fe80::1]:7700' role='standby'/>"), &Metadata{Peer: "[fe80::1]:7700", Role: RoleStandby}, ""},
		{"newer attributes", wrap("<r:protect peer='b' role='primary' witness='etcd1:2379'><r:future/></r:protect>"),
			&Metadata{Peer: "b", Role: RolePrimary, Attrs: []xml.Attr{{Name: xml.Name{Local: "witness"}, Value: "etcd1:2379"}}}, ""},
		{"other namespace", wrap("<protect xmlns='urn:other' peer='b' role='leader'/>"), nil, ""},
		{"outside metadata", "<domain xmlns:r='" + Namespace + "'><name>a</name><devices><r:protect peer='b' role='leader'/></devices></domain>", nil, ""},
		{"bad role", wrap("<r:protect peer='b' role='leader'/>"), nil, `libvirtdom: domain a: <remus:protect>: role "leader": want "primary" or "standby"`},
		{"bad epoch", wrap("<r:protect peer='b' role='primary' epoch='fast'/>"), nil, `libvirtdom: domain a: <remus:protect>: epoch "fast": want a positive duration such as 25ms`},
		{"no peer", wrap("<r:protect role='primary'/>"), nil, `libvirtdom: domain a: <remus:protect>: peer "": empty`},
		{"two", wrap("<r:protect peer='b' role='primary'/><r:protect peer='c' role='primary'/>"), nil, "libvirtdom: domain a: 2 <remus:protect> elements in <metadata>, want one"},
		{"malformed XML", "<domain><name>a</name><metadata>", nil, "libvirtdom: parse domain XML: XML syntax error on line 1: unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok, err := ParseMetadata(tc.doc)
			switch {
			case tc.err != "":
				if err == nil || err.Error() != tc.err {
					t.Fatalf("ParseMetadata = %+v, %v, want error %q", got, err, tc.err)
				}
			case err != nil:
				t.Fatal(err)
			case ok != (tc.want != nil) || (ok && !sameMetadata(*got, *tc.want)):
				t.Fatalf("ParseMetadata = %+v, %v, want %+v", got, ok, tc.want)
			}
		})
	}
}

// TestMetadataRoundTrip: what ParseMetadata reads, SetMetadata writes back
// the same, other attributes included.
func TestMetadataRoundTrip(t *testing.T) {
	m := Metadata{Peer: "[2001:db8::7]:7700", Role: RoleStandby, Epoch: 10 * time.Millisecond,
		Attrs: []xml.Attr{{Name: xml.Name{Local: "witness"}, Value: `etcd1:2379 & "etcd2"`}}}
	out, err := SetMetadata(readDomain(t, "edge"), m)
	if err != nil {
		t.Fatal(err)
	}
	got, ok, err := ParseMetadata(out)
	if err != nil || !ok || !sameMetadata(*got, m) {
		t.Fatalf("ParseMetadata = %+v, %v, %v, want %+v", got, ok, err, m)
	}
	if _, ps, err := Check(out, CheckOptions{}); err != nil || len(ps) == 0 {
		t.Fatalf("Check after SetMetadata: %v, %v", ps, err)
	}
}

// TestMetadataValidate: the peer forms and the attributes accepted.
func TestMetadataValidate(t *testing.T) {
	for _, tc := range []struct {
		m  Metadata
		ok bool
	}{
		{Metadata{Peer: "backup1", Role: RolePrimary}, true},
		{Metadata{Peer: "backup1:7700", Role: RoleStandby}, true},
		{Metadata{Peer: "10.0.0.2:7700", Role: RolePrimary}, true},
		{Metadata{Peer: "[fe80::1]:7700", Role: RolePrimary}, true},
		{Metadata{Peer: "fe80::1", Role: RolePrimary}, true},
		{Metadata{Peer: "", Role: RolePrimary}, false},
		{Metadata{Peer: ":7700", Role: RolePrimary}, false},
		{Metadata{Peer: "b:0", Role: RolePrimary}, false},
		{Metadata{Peer: "b:http", Role: RolePrimary}, false},
		{Metadata{Peer: "a b", Role: RolePrimary}, false},
		{Metadata{Peer: "[fe80::1]", Role: RolePrimary}, false},
		{Metadata{Peer: "b", Role: ""}, false},
		{Metadata{Peer: "b", Role: RolePrimary, Epoch: -1}, false},
		{Metadata{Peer: "b", Role: RolePrimary, Attrs: []xml.Attr{{Name: xml.Name{Local: "peer"}, Value: "c"}}}, false},
		{Metadata{Peer: "b", Role: RolePrimary, Attrs: []xml.Attr{{Name: xml.Name{Local: "xmlns"}, Value: "c"}}}, false},
		{Metadata{Peer: "b", Role: RolePrimary, Attrs: []xml.Attr{{Name: xml.Name{Local: "a b"}, Value: "c"}}}, false},
		{Metadata{Peer: "b", Role: RolePrimary, Attrs: []xml.Attr{{Name: xml.Name{Space: "urn:x", Local: "a"}, Value: "c"}}}, false},
	} {
		if err := tc.m.Validate(); (err == nil) != tc.ok {
			t.Errorf("Validate(%+v) = %v, want ok %v", tc.m, err, tc.ok)
		}
	}
}

package libvirtdom

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Namespace is the XML namespace of remus-kvm's element in a domain's
// <metadata>; its usual prefix is "remus".
const Namespace = "https://remus-kvm.org/xmlns/domain/1.0"

// Role is the side a domain plays in its protection.
type Role string

// The roles of a protected domain.
const (
	RolePrimary Role = "primary" // the domain that runs the guest
	RoleStandby Role = "standby" // the backup host's copy, waiting for a failover
)

// Metadata is remus-kvm's element in a domain's <metadata>:
//
//	<remus:protect xmlns:remus="https://remus-kvm.org/xmlns/domain/1.0" peer="backup1:7700" role="primary" epoch="25ms"/>
//
// The libvirt hook protects the domains that carry it.
type Metadata struct {
	// Peer is the other side's agent, HOST or HOST:PORT (an IPv6 host with
	// a port in brackets).
	Peer string
	// Role is this domain's side.
	Role Role
	// Epoch is the checkpoint interval; 0 leaves it out (remusd's default,
	// 25 ms).
	Epoch time.Duration
	// Attrs are further attributes without a namespace, kept in order: what
	// a newer remus-kvm wrote is not lost by an older one rewriting the
	// element.
	Attrs []xml.Attr
}

var attrName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9._-]*$`)

// Validate reports what is wrong with m, if anything.
func (m Metadata) Validate() error {
	if m.Role != RolePrimary && m.Role != RoleStandby {
		return fmt.Errorf("role %q: want %q or %q", m.Role, RolePrimary, RoleStandby)
	}
	if err := checkPeer(m.Peer); err != nil {
		return fmt.Errorf("peer %q: %w", m.Peer, err)
	}
	if m.Epoch < 0 {
		return fmt.Errorf("epoch %v: negative", m.Epoch)
	}
	for _, a := range m.Attrs {
		switch {
		case a.Name.Space != "" || !attrName.MatchString(a.Name.Local) || strings.HasPrefix(strings.ToLower(a.Name.Local), "xml"):
			return fmt.Errorf("attribute %q: not a plain attribute name", a.Name.Local)
		case a.Name.Local == "peer" || a.Name.Local == "role" || a.Name.Local == "epoch":
			return fmt.Errorf("attribute %q: set it through its field", a.Name.Local)
		}
	}
	return nil
}

// checkPeer accepts HOST, HOST:PORT, [IPv6]:PORT and a bare IPv6 address.
func checkPeer(p string) error {
	if p == "" {
		return errors.New("empty")
	}
	host, port, err := net.SplitHostPort(p)
	if err != nil {
		if net.ParseIP(p) != nil {
			return nil
		}
		if strings.ContainsAny(p, ":[]") {
			return err
		}
		host, port = p, ""
	}
	if host == "" || strings.ContainsAny(host, " \t\r\n/'\"<>&") {
		return errors.New("not a host name or address")
	}
	if port != "" {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("port %q: want 1-65535", port)
		}
	}
	return nil
}

// element renders m as the <remus:protect> element, with its namespace
// declared on it as libvirt requires of metadata elements.
func (m Metadata) element() string {
	var b strings.Builder
	b.WriteString(`<remus:protect xmlns:remus="` + Namespace + `"`)
	attr := func(name, value string) {
		b.WriteString(" " + name + `="`)
		xml.EscapeText(&b, []byte(value)) // cannot fail on a strings.Builder
		b.WriteString(`"`)
	}
	attr("peer", m.Peer)
	attr("role", string(m.Role))
	if m.Epoch > 0 {
		attr("epoch", m.Epoch.String())
	}
	for _, a := range m.Attrs {
		attr(a.Name.Local, a.Value)
	}
	b.WriteString("/>")
	return b.String()
}

// parseProtect reads a <remus:protect> start element.
func parseProtect(start xml.StartElement) (*Metadata, error) {
	m := &Metadata{}
	for _, a := range start.Attr {
		switch {
		case a.Name.Space == "xmlns" || (a.Name.Space == "" && a.Name.Local == "xmlns"):
		case a.Name.Space != "":
		case a.Name.Local == "peer":
			m.Peer = a.Value
		case a.Name.Local == "role":
			m.Role = Role(a.Value)
		case a.Name.Local == "epoch":
			d, err := time.ParseDuration(a.Value)
			if err != nil || d <= 0 {
				return nil, fmt.Errorf("epoch %q: want a positive duration such as 25ms", a.Value)
			}
			m.Epoch = d
		default:
			m.Attrs = append(m.Attrs, xml.Attr{Name: xml.Name{Local: a.Name.Local}, Value: a.Value})
		}
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return m, nil
}

// span is a byte range of the document.
type span struct{ start, end int64 }

// metaScan is what scanMetadata found in a domain document.
type metaScan struct {
	name      string // the domain's <name>
	meta      *span  // the <metadata> element, nil when there is none
	inner     span   // its content
	insertAt  int64  // where a new <metadata> goes: after <name>, <uuid>, <title>...
	protects  []span // the <remus:protect> elements in <metadata>
	protectEl []*xml.StartElement
}

// scanMetadata reads a whole domain document (so that a malformed one is
// refused) and notes where its metadata and remus elements are.
func scanMetadata(doc string) (*metaScan, error) {
	s := &metaScan{}
	d := xml.NewDecoder(strings.NewReader(doc))
	depth, inMeta, inName := 0, false, false
	for {
		off := d.InputOffset()
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		switch t := tok.(type) {
		case xml.StartElement:
			switch {
			case depth == 0 && (t.Name.Local != "domain" || t.Name.Space != ""):
				return nil, fmt.Errorf("root element is <%s>, not <domain>", t.Name.Local)
			case depth == 0 && s.insertAt != 0:
				return nil, errors.New("more than one root element")
			case depth == 0:
				s.insertAt = d.InputOffset()
			case depth == 1 && t.Name.Space == "" && t.Name.Local == "metadata":
				if s.meta != nil {
					return nil, errors.New("more than one <metadata>")
				}
				s.meta, s.inner.start, inMeta = &span{start: off}, d.InputOffset(), true
			case depth == 1 && t.Name.Space == "" && t.Name.Local == "name":
				inName = true
			case depth == 2 && inMeta && t.Name.Space == Namespace && t.Name.Local == "protect":
				if err := d.Skip(); err != nil {
					return nil, err
				}
				s.protects = append(s.protects, span{off, d.InputOffset()})
				s.protectEl = append(s.protectEl, &t)
				continue
			}
			depth++
		case xml.EndElement:
			depth--
			if depth == 1 && inMeta {
				s.inner.end, s.meta.end, inMeta = off, d.InputOffset(), false
			}
			if depth == 1 {
				inName = false
				switch t.Name.Local {
				case "name", "uuid", "genid", "title", "description":
					if t.Name.Space == "" {
						s.insertAt = d.InputOffset()
					}
				}
			}
		case xml.CharData:
			if inName {
				s.name += string(t)
			}
		}
	}
	if s.insertAt == 0 {
		return nil, errors.New("no <domain> element")
	}
	s.name = strings.TrimSpace(s.name)
	return s, nil
}

// ParseMetadata returns the remus element of a domain's XML, and whether
// the domain has one; a malformed element is an error.
func ParseMetadata(doc string) (*Metadata, bool, error) {
	s, err := scanMetadata(doc)
	if err != nil {
		return nil, false, fmt.Errorf("libvirtdom: parse domain XML: %w", err)
	}
	m, ok, err := s.metadata()
	if err != nil {
		return nil, ok, fmt.Errorf("libvirtdom: domain %s: %w", s.name, err)
	}
	return m, ok, nil
}

// metadata reads the remus element scanMetadata found.
func (s *metaScan) metadata() (*Metadata, bool, error) {
	switch len(s.protects) {
	case 0:
		return nil, false, nil
	case 1:
	default:
		return nil, true, fmt.Errorf("%d <remus:protect> elements in <metadata>, want one", len(s.protects))
	}
	m, err := parseProtect(*s.protectEl[0])
	if err != nil {
		return nil, true, fmt.Errorf("<remus:protect>: %w", err)
	}
	return m, true, nil
}

// SetMetadata returns the domain's XML with m as its remus element,
// replacing the one it had (or all of them, if several) or adding one,
// and a <metadata> if needed. The rest of the document is left as it was,
// byte for byte.
func SetMetadata(doc string, m Metadata) (string, error) {
	s, err := scanMetadata(doc)
	if err != nil {
		return "", fmt.Errorf("libvirtdom: parse domain XML: %w", err)
	}
	if err := m.Validate(); err != nil {
		return "", fmt.Errorf("libvirtdom: domain %s: remus metadata: %w", s.name, err)
	}
	el := m.element()
	switch {
	case len(s.protects) > 0:
		var b strings.Builder
		b.WriteString(doc[:s.protects[0].start])
		b.WriteString(el)
		prev := s.protects[0].end
		for _, p := range s.protects[1:] {
			b.WriteString(doc[prev:p.start])
			prev = p.end
		}
		b.WriteString(doc[prev:])
		return b.String(), nil
	case s.meta == nil:
		return doc[:s.insertAt] + "\n  <metadata>\n    " + el + "\n  </metadata>" + doc[s.insertAt:], nil
	case strings.HasSuffix(doc[:s.inner.start], "/>"): // <metadata/>
		return doc[:s.meta.start] + "<metadata>\n    " + el + "\n  </metadata>" + doc[s.meta.end:], nil
	default:
		inner := doc[s.inner.start:s.inner.end]
		ws := inner[len(strings.TrimRight(inner, " \t\r\n")):]
		at := s.inner.end - int64(len(ws))
		if ws == "" {
			return doc[:at] + el + doc[at:], nil
		}
		return doc[:at] + ws + "  " + el + doc[at:], nil
	}
}

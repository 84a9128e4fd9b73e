package libvirtdom

import (
	"strings"

	"libvirt.org/go/libvirtxml"
)

// qemuNS is libvirt's namespace for QEMU passthrough (qemu:commandline).
const qemuNS = "http://libvirt.org/schemas/domain/qemu/1.0"

// agentSocket is a QMP socket found among a domain's qemu:arg values.
type agentSocket struct {
	path    string
	arg     int    // the index of the argument that names the path
	item    int    // the option item in it that holds the path
	chardev bool   // -chardev (with -mon) rather than -qmp
	bad     string // why the agent cannot use it; "" when it can
}

// qemuArgs returns a domain's qemu:arg values.
func qemuArgs(d *libvirtxml.Domain) []string {
	if d.QEMUCommandline == nil {
		return nil
	}
	args := make([]string, len(d.QEMUCommandline.Args))
	for i, a := range d.QEMUCommandline.Args {
		args[i] = a.Value
	}
	return args
}

// findAgentSocket looks for a QMP monitor on a unix socket in QEMU's
// arguments: -qmp unix:PATH,server=on,wait=off, or -chardev
// socket,id=ID,path=PATH,server=on,wait=off with -mon chardev=ID,mode=control.
// It returns the first usable one, else the first one found (with why it
// is not usable), else nil.
func findAgentSocket(args []string) *agentSocket {
	var found []*agentSocket
	chardevs := map[string]*agentSocket{}
	var mons []string
	for i := 0; i+1 < len(args); i++ {
		opt, val := args[i], args[i+1]
		if strings.HasPrefix(opt, "--") {
			opt = opt[1:] // QEMU takes --qmp for -qmp
		}
		switch opt {
		case "-qmp":
			items := splitOpts(val)
			s := &agentSocket{arg: i + 1}
			addr := unescapeOpt(items[0])
			if !strings.HasPrefix(addr, "unix:") {
				s.bad = "-qmp " + val + " is not a unix socket"
			} else {
				s.path = strings.TrimPrefix(addr, "unix:")
				s.bad = socketIssue(s.path, items[1:])
			}
			found = append(found, s)
			i++
		case "-chardev":
			items := splitOpts(val)
			id, _ := optValue(items, "id", false)
			for k, it := range items {
				key, v, ok := strings.Cut(unescapeOpt(it), "=")
				if backend, _ := optValue(items, "backend", true); ok && key == "path" && backend == "socket" {
					chardevs[id] = &agentSocket{path: v, arg: i + 1, item: k, chardev: true, bad: socketIssue(v, items[1:])}
				}
			}
			i++
		case "-mon":
			items := splitOpts(val)
			if mode, _ := optValue(items, "mode", false); mode == "control" {
				id, _ := optValue(items, "chardev", true)
				mons = append(mons, id)
			}
			i++
		}
	}
	for _, id := range mons {
		if s := chardevs[id]; s != nil {
			found = append(found, s)
		}
	}
	for _, s := range found {
		if s.bad == "" {
			return s
		}
	}
	if len(found) > 0 {
		return found[0]
	}
	return nil
}

// findNetSocket returns the unix socket of the first -netdev stream
// server among QEMU's arguments (-netdev
// stream,id=ID,server=on,addr.type=unix,addr.path=PATH): a guest NIC whose
// frames remusd relays, holding them until their epoch commits. "" when
// there is none.
func findNetSocket(args []string) string {
	for i := 0; i+1 < len(args); i++ {
		if opt := strings.TrimPrefix(args[i], "-"); opt != "-netdev" && opt != "netdev" {
			continue
		}
		items := splitOpts(args[i+1])
		i++
		if backend, _ := optValue(items, "type", true); backend != "stream" {
			continue
		}
		server, _ := optValue(items, "server", false)
		typ, _ := optValue(items, "addr.type", false)
		p, _ := optValue(items, "addr.path", false)
		if isOn(server) && typ == "unix" && p != "" {
			return p
		}
	}
	return ""
}

// socketIssue says why a unix socket with these options cannot serve the
// agent, or "" when it can.
func socketIssue(path string, items []string) string {
	server, wait := false, true
	for _, it := range items {
		key, v, hasValue := strings.Cut(unescapeOpt(it), "=")
		switch {
		case key == "server" && !hasValue:
			server = true
		case key == "server":
			server = isOn(v)
		case key == "nowait" && !hasValue:
			wait = false
		case key == "wait" && !hasValue:
			wait = true
		case key == "wait":
			wait = isOn(v)
		}
	}
	switch {
	case !strings.HasPrefix(path, "/"):
		return "the QMP socket " + path + " is not an absolute path"
	case !server:
		return "QEMU connects to the QMP socket " + path + " as a client instead of listening on it (server=on)"
	case wait:
		return "QEMU waits for a client on the QMP socket " + path + " before it starts the guest (wait=off)"
	}
	return ""
}

// isOn reads a QEMU boolean option value.
func isOn(v string) bool {
	switch v {
	case "on", "yes", "true", "y":
		return true
	}
	return false
}

// splitOpts splits a QEMU option string at its commas; ",," is a comma
// inside an item and stays escaped. There is always at least one item.
func splitOpts(s string) []string {
	var items []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == ',' && i+1 < len(s) && s[i+1] == ',':
			cur.WriteString(",,")
			i++
		case s[i] == ',':
			items = append(items, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(s[i])
		}
	}
	return append(items, cur.String())
}

// unescapeOpt turns an item of splitOpts back into its text.
func unescapeOpt(item string) string { return strings.ReplaceAll(item, ",,", ",") }

// escapeOpt escapes the commas of a value for a QEMU option string.
func escapeOpt(v string) string { return strings.ReplaceAll(v, ",", ",,") }

// optValue returns the value of key among the items; implied says that a
// first item without "=" is that key's value.
func optValue(items []string, key string, implied bool) (string, bool) {
	for i, it := range items {
		k, v, ok := strings.Cut(unescapeOpt(it), "=")
		if !ok && i == 0 && implied {
			return k, true
		}
		if ok && k == key {
			return v, true
		}
	}
	return "", false
}

// withSocketPath returns args with the socket s pointing at path instead.
func withSocketPath(args []string, s *agentSocket, path string) []string {
	out := append([]string(nil), args...)
	items := splitOpts(out[s.arg])
	if s.chardev {
		items[s.item] = "path=" + escapeOpt(path)
	} else {
		items[0] = "unix:" + escapeOpt(path)
	}
	out[s.arg] = strings.Join(items, ",")
	return out
}

// fixSocketArg returns the argument of socket s listening on path with
// server=on,wait=off, its other options kept.
func fixSocketArg(arg string, s *agentSocket, path string) string {
	items := splitOpts(arg)
	var out []string
	if !s.chardev {
		out, items = []string{"unix:" + escapeOpt(path)}, items[1:]
	}
	for i, it := range items {
		key, _, _ := strings.Cut(unescapeOpt(it), "=")
		switch {
		case s.chardev && i == s.item, key == "server", key == "wait", key == "nowait":
			continue
		}
		out = append(out, it)
	}
	if s.chardev {
		out = append(out, "path="+escapeOpt(path))
	}
	return strings.Join(append(out, "server=on", "wait=off"), ",")
}

// agentArgs are the qemu:arg values of an agent QMP socket at path.
func agentArgs(path string) []string {
	return []string{"-qmp", "unix:" + escapeOpt(path) + ",server=on,wait=off"}
}

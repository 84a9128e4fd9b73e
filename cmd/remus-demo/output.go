package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
)

// printer writes the demo's lines, each stamped with the time since the
// demo started. The agents' logs arrive on other goroutines, hence the lock.
type printer struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
}

func newPrinter(w io.Writer) *printer { return &printer{w: w, start: time.Now()} }

func (p *printer) write(indent, s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	stamp := fmt.Sprintf("[%5.1fs] ", time.Since(p.start).Seconds())
	for _, line := range strings.Split(s, "\n") {
		fmt.Fprintf(p.w, "%s%s%s\n", stamp, indent, line)
	}
}

// step starts a stage of the demo.
func (p *printer) step(format string, args ...any) { p.write("", fmt.Sprintf(format, args...)) }

// info is a detail of the current stage.
func (p *printer) info(format string, args ...any) { p.write("    ", fmt.Sprintf(format, args...)) }

// plain writes without a time stamp (the banner).
func (p *printer) plain(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, format+"\n", args...)
}

// agentLog is the Echo writer given to lab.Protect: it gets one line per
// Write, "  [remusd ROLE] LINE", and shows the agents' start-up steps and
// warnings in a short form, leaving out debug output and the progress of
// the first checkpoint's transfer (the demo reports that itself).
type agentLog struct{ p *printer }

func (a agentLog) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		if s, ok := formatAgentLine(line); ok {
			a.p.write("    ", s)
		}
	}
	return len(b), nil
}

// formatAgentLine turns "  [remusd backup] time=... level=INFO msg=... k=v"
// into "backup  | msg  k=v", or reports that the line is not worth showing.
func formatAgentLine(line string) (string, bool) {
	line = strings.TrimSpace(line)
	role := "remusd"
	if rest, ok := strings.CutPrefix(line, "["); ok {
		// "[BINARY ROLE] ": the binary's name is whatever --remusd named.
		if name, l, ok := strings.Cut(rest, "] "); ok {
			role, line = name[strings.LastIndexByte(name, ' ')+1:], l
		}
	}
	role = fmt.Sprintf("%-8s|", role)
	attrs, ok := parseLogfmt(line)
	if !ok || attrs.get("msg") == "" {
		// remusd backup's closing summary repeats its last log record.
		if line == "" || strings.HasPrefix(line, "failed over:") {
			return "", false
		}
		return role + " " + line, true // not a log record (e.g. remusd's final summary)
	}
	level := attrs.get("level")
	msg := attrs.get("msg")
	switch {
	case level == "DEBUG":
		return "", false
	case msg == "shipping epoch":
		return "", false
	}
	var b strings.Builder
	b.WriteString(role)
	if level != "INFO" {
		b.WriteString(" " + level)
	}
	b.WriteString(" " + msg)
	sep := "  "
	for _, kv := range attrs {
		switch kv[0] {
		case "time", "level", "msg", "vm":
			continue
		}
		v := kv[1]
		if v == "" || strings.ContainsAny(v, " \"=") {
			v = strconv.Quote(v)
		}
		b.WriteString(sep + kv[0] + "=" + v)
		sep = " "
	}
	return b.String(), true
}

type logAttrs [][2]string

func (a logAttrs) get(k string) string {
	for _, kv := range a {
		if kv[0] == k {
			return kv[1]
		}
	}
	return ""
}

// parseLogfmt splits a log/slog text record into its key=value pairs,
// unquoting quoted values. ok is false for anything else.
func parseLogfmt(s string) (attrs logAttrs, ok bool) {
	for s = strings.TrimLeft(s, " "); s != ""; s = strings.TrimLeft(s, " ") {
		eq := strings.IndexByte(s, '=')
		if eq <= 0 || strings.ContainsAny(s[:eq], " \"") {
			return nil, false
		}
		key, rest := s[:eq], s[eq+1:]
		var val string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return nil, false
			}
			if val, err = strconv.Unquote(q); err != nil {
				return nil, false
			}
			rest = rest[len(q):]
		} else {
			val, rest, _ = strings.Cut(rest, " ")
		}
		attrs = append(attrs, [2]string{key, val})
		s = rest
	}
	return attrs, len(attrs) > 0
}

package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// kind says which of QMP's four server messages a message is.
type kind uint8

const (
	kindGreeting kind = iota + 1 // {"QMP": {"version": ..., "capabilities": [...]}}
	kindReturn                   // {"return": VALUE, "id": ID}
	kindError                    // {"error": {"class": ..., "desc": ...}, "id": ID}
	kindEvent                    // {"event": NAME, "data": {...}, "timestamp": {...}}
)

func (k kind) String() string {
	switch k {
	case kindGreeting:
		return "greeting"
	case kindReturn:
		return "return"
	case kindError:
		return "error"
	case kindEvent:
		return "event"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// message is one decoded message from the server. Which fields are set
// depends on kind. Raw JSON members (id, ret, Event.Data) are kept compacted.
type message struct {
	kind kind

	// greeting
	version      Version
	capabilities []string

	// return and error: the id echoed by QEMU, nil when absent
	id json.RawMessage
	// return
	ret json.RawMessage
	// error
	errClass, errDesc string

	// event
	event Event
}

// kindKeys are the top-level members that decide a message's kind.
var kindKeys = [...]struct {
	key  string
	kind kind
}{
	{"QMP", kindGreeting},
	{"return", kindReturn},
	{"error", kindError},
	{"event", kindEvent},
}

// decodeMessage parses one JSON value received from QEMU and classifies it.
// It is a pure function: it keeps no reference to b. Members that QMP does
// not define are ignored, as the QMP specification asks of clients; a value
// that is not a JSON object, has none or more than one of the members
// "QMP", "return", "error" and "event", or has one of the wrong type is an
// error.
func decodeMessage(b []byte) (message, error) {
	if !isObject(b) {
		return message{}, fmt.Errorf("not a JSON object: %s", truncate(b, 40))
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return message{}, err
	}
	var m message
	for _, kk := range kindKeys {
		if _, ok := top[kk.key]; !ok {
			continue
		}
		if m.kind != 0 {
			return message{}, fmt.Errorf("ambiguous message: has both %q and %q", kindKeyOf(m.kind), kk.key)
		}
		m.kind = kk.kind
	}
	var err error
	switch m.kind {
	case kindGreeting:
		err = m.decodeGreeting(top["QMP"])
	case kindReturn:
		m.ret, err = compact(top["return"])
		if err == nil {
			m.id, err = decodeID(top)
		}
	case kindError:
		err = m.decodeError(top["error"])
		if err == nil {
			m.id, err = decodeID(top)
		}
	case kindEvent:
		err = m.decodeEvent(top)
	default:
		return message{}, errors.New(`not a QMP message: no "QMP", "return", "error" or "event" member`)
	}
	if err != nil {
		return message{}, fmt.Errorf("%s message: %w", m.kind, err)
	}
	return m, nil
}

func kindKeyOf(k kind) string {
	for _, kk := range kindKeys {
		if kk.kind == k {
			return kk.key
		}
	}
	return ""
}

func (m *message) decodeGreeting(raw json.RawMessage) error {
	if !isObject(raw) {
		return errors.New(`"QMP" is not an object`)
	}
	var g struct {
		Version      *Version `json:"version"`
		Capabilities []string `json:"capabilities"`
	}
	if err := json.Unmarshal(raw, &g); err != nil {
		return err
	}
	if g.Version == nil {
		return errors.New(`no "version" member`)
	}
	m.version = *g.Version
	m.capabilities = g.Capabilities
	return nil
}

func (m *message) decodeError(raw json.RawMessage) error {
	if !isObject(raw) {
		return errors.New(`"error" is not an object`)
	}
	var e struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	}
	if err := json.Unmarshal(raw, &e); err != nil {
		return err
	}
	m.errClass, m.errDesc = e.Class, e.Desc
	return nil
}

func (m *message) decodeEvent(top map[string]json.RawMessage) error {
	raw := top["event"]
	if len(raw) == 0 || raw[0] != '"' {
		return errors.New(`"event" is not a string`)
	}
	if err := json.Unmarshal(raw, &m.event.Name); err != nil {
		return err
	}
	if m.event.Name == "" {
		return errors.New("empty event name")
	}
	if data, ok := top["data"]; ok {
		c, err := compact(data)
		if err != nil {
			return err
		}
		m.event.Data = c
	}
	if ts, ok := top["timestamp"]; ok {
		if !isObject(ts) {
			return errors.New(`"timestamp" is not an object`)
		}
		var t struct {
			Seconds      int64 `json:"seconds"`
			Microseconds int64 `json:"microseconds"`
		}
		if err := json.Unmarshal(ts, &t); err != nil {
			return fmt.Errorf("timestamp: %w", err)
		}
		m.event.Time = time.Unix(t.Seconds, t.Microseconds*int64(time.Microsecond))
	}
	return nil
}

// decodeID returns the message's "id" member, compacted, or nil if absent.
func decodeID(top map[string]json.RawMessage) (json.RawMessage, error) {
	raw, ok := top["id"]
	if !ok {
		return nil, nil
	}
	return compact(raw)
}

// parseID returns the numeric id that this client put in a command, or
// false when raw is absent or not such an id.
func parseID(raw json.RawMessage) (uint64, bool) {
	if len(raw) == 0 {
		return 0, false
	}
	id, err := strconv.ParseUint(string(raw), 10, 64)
	return id, err == nil
}

// compact returns a compacted copy of the JSON value raw.
func compact(raw json.RawMessage) (json.RawMessage, error) {
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// isObject reports whether the JSON text b starts, after white space, with
// an object.
func isObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{'
}

// truncate quotes b for an error message, cut to at most n bytes.
func truncate(b []byte, n int) string {
	if len(b) <= n {
		return strconv.Quote(string(b))
	}
	return strconv.Quote(string(b[:n])) + "..."
}

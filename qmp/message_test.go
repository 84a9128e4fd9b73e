package qmp

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

// Lines as QEMU 7.2.22 (Debian 12) writes them.
const (
	realGreeting   = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}`
	realReturn     = `{"return": {"status": "running", "singlestep": false, "running": true}, "id": 4}`
	realEmpty      = `{"return": {}, "id": 6}`
	realError      = `{"id": 10, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}`
	realParseError = `{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'json'"}}`
	realStop       = `{"timestamp": {"seconds": 1795423054, "microseconds": 313043}, "event": "STOP"}`
	realShutdown   = `{"timestamp": {"seconds": 1795423663, "microseconds": 295966}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}`
)

func TestDecodeMessage(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    message
		wantErr string // substring; empty means success
	}{
		{
			name: "greeting",
			in:   realGreeting,
			want: message{kind: kindGreeting,
				version:      Version{Major: 7, Minor: 2, Micro: 22, Package: "Debian 1:7.2+dfsg-7+deb12u18+b3"},
				capabilities: []string{"oob"}},
		},
		{
			name: "greeting without capabilities",
			in:   `{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}}}`,
			want: message{kind: kindGreeting, version: Version{Major: 10, Micro: 2}},
		},
		{
			name: "return with value",
			in:   realReturn,
			want: message{kind: kindReturn, id: json.RawMessage(`4`),
				ret: json.RawMessage(`{"status":"running","singlestep":false,"running":true}`)},
		},
		{
			name: "empty return",
			in:   realEmpty,
			want: message{kind: kindReturn, id: json.RawMessage(`6`), ret: json.RawMessage(`{}`)},
		},
		{
			name: "array return and string id",
			in:   `{"return": [ {"name": "stop"} ], "id": "x"}`,
			want: message{kind: kindReturn, id: json.RawMessage(`"x"`), ret: json.RawMessage(`[{"name":"stop"}]`)},
		},
		{
			name: "error",
			in:   realError,
			want: message{kind: kindError, id: json.RawMessage(`10`),
				errClass: "CommandNotFound", errDesc: "The command nope has not been found"},
		},
		{
			name: "error without id",
			in:   realParseError,
			want: message{kind: kindError, errClass: "GenericError", errDesc: "JSON parse error, invalid keyword 'json'"},
		},
		{
			name: "event without data",
			in:   realStop,
			want: message{kind: kindEvent, event: Event{Name: "STOP", Time: time.Unix(1795423054, 313043000)}},
		},
		{
			name: "event with data",
			in:   realShutdown,
			want: message{kind: kindEvent, event: Event{Name: "SHUTDOWN",
				Data: json.RawMessage(`{"guest":false,"reason":"host-qmp-quit"}`),
				Time: time.Unix(1795423663, 295966000)}},
		},
		{
			name: "event without timestamp",
			in:   `{"event": "RESUME"}`,
			want: message{kind: kindEvent, event: Event{Name: "RESUME"}},
		},
		{
			name: "unknown members are ignored",
			in:   `{"return": {}, "id": 1, "future": [1, 2]}`,
			want: message{kind: kindReturn, id: json.RawMessage(`1`), ret: json.RawMessage(`{}`)},
		},
		{name: "not an object", in: `[1, 2]`, wantErr: "not a JSON object"},
		{name: "null", in: `null`, wantErr: "not a JSON object"},
		{name: "invalid JSON", in: `{"return": }`, wantErr: "invalid character"},
		{name: "no kind member", in: `{"id": 1}`, wantErr: "not a QMP message"},
		{name: "return and error", in: `{"return": {}, "error": {}, "id": 1}`, wantErr: "ambiguous"},
		{name: "greeting not an object", in: `{"QMP": null}`, wantErr: `greeting message: "QMP" is not an object`},
		{name: "greeting without version", in: `{"QMP": {"capabilities": []}}`, wantErr: `no "version"`},
		{name: "greeting version not an object", in: `{"QMP": {"version": "7.2"}}`, wantErr: "version: want a JSON object"},
		{name: "greeting version without qemu", in: `{"QMP": {"version": {"package": "x"}}}`, wantErr: `no "qemu" member`},
		{name: "greeting major not a number", in: `{"QMP": {"version": {"qemu": {"major": "7"}}}}`, wantErr: "cannot unmarshal"},
		{name: "error not an object", in: `{"error": "boom", "id": 1}`, wantErr: `"error" is not an object`},
		{name: "error class not a string", in: `{"error": {"class": 1}, "id": 1}`, wantErr: "cannot unmarshal"},
		{name: "event name not a string", in: `{"event": 5}`, wantErr: `"event" is not a string`},
		{name: "empty event name", in: `{"event": ""}`, wantErr: "empty event name"},
		{name: "timestamp not an object", in: `{"event": "STOP", "timestamp": 5}`, wantErr: `"timestamp" is not an object`},
		{name: "fractional timestamp", in: `{"event": "STOP", "timestamp": {"seconds": 1.5}}`, wantErr: "timestamp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeMessage([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("decodeMessage(%s) error = %v, want one containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("decodeMessage(%s): %v", tt.in, err)
			}
			if !messagesEqual(got, tt.want) {
				t.Fatalf("decodeMessage(%s)\n got  %+v\n want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseID(t *testing.T) {
	tests := []struct {
		raw    string
		want   uint64
		wantOK bool
	}{
		{"7", 7, true},
		{"18446744073709551615", 1<<64 - 1, true},
		{"", 0, false},
		{`"7"`, 0, false},
		{"7.0", 0, false},
		{"-1", 0, false},
		{"null", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.raw, func(t *testing.T) {
			got, ok := parseID(json.RawMessage(tt.raw))
			if got != tt.want || ok != tt.wantOK {
				t.Fatalf("parseID(%q) = %d, %v; want %d, %v", tt.raw, got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	v := Version{Major: 7, Minor: 2, Micro: 22, Package: "Debian 1:7.2+dfsg-7+deb12u18+b3"}
	if got, want := v.String(), "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got, want := (Version{Major: 10}).String(), "10.0.0"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"qemu":{"major":7,"minor":2,"micro":22},"package":"Debian 1:7.2+dfsg-7+deb12u18+b3"}`; string(b) != want {
		t.Errorf("Marshal = %s, want %s", b, want)
	}
	var back Version
	if err := json.Unmarshal(b, &back); err != nil || back != v {
		t.Errorf("Unmarshal(Marshal(v)) = %+v, %v; want %+v", back, err, v)
	}
	for _, tt := range []struct {
		w    Version
		want bool
	}{
		{Version{Major: 7, Minor: 2, Micro: 22}, true},
		{Version{Major: 7, Minor: 2, Micro: 23}, false},
		{Version{Major: 7, Minor: 1, Micro: 99}, true},
		{Version{Major: 7, Minor: 3}, false},
		{Version{Major: 6, Minor: 9}, true},
		{Version{Major: 10}, false},
	} {
		if got := v.AtLeast(tt.w); got != tt.want {
			t.Errorf("%v.AtLeast(%v) = %v, want %v", v, tt.w, got, tt.want)
		}
	}
}

// messagesEqual compares decoded messages; event times compare as instants.
func messagesEqual(a, b message) bool {
	if !a.event.Time.Equal(b.event.Time) {
		return false
	}
	a.event.Time, b.event.Time = time.Time{}, time.Time{}
	return reflect.DeepEqual(a, b)
}

// encodeMessage renders m as QEMU would send it, for round-trip tests.
func encodeMessage(m message) ([]byte, error) {
	obj := map[string]any{}
	switch m.kind {
	case kindGreeting:
		obj["QMP"] = map[string]any{"version": m.version, "capabilities": m.capabilities}
	case kindReturn:
		obj["return"] = m.ret
	case kindError:
		obj["error"] = map[string]string{"class": m.errClass, "desc": m.errDesc}
	case kindEvent:
		obj["event"] = m.event.Name
		if m.event.Data != nil {
			obj["data"] = m.event.Data
		}
		if !m.event.Time.IsZero() {
			obj["timestamp"] = map[string]int64{
				"seconds":      m.event.Time.Unix(),
				"microseconds": int64(m.event.Time.Nanosecond() / 1000),
			}
		}
	}
	if m.id != nil {
		obj["id"] = m.id
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(obj); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func FuzzDecodeMessage(f *testing.F) {
	for _, s := range []string{
		realGreeting, realReturn, realEmpty, realError, realParseError, realStop, realShutdown,
		`{"timestamp": {"seconds": 1795423054, "microseconds": 314746}, "event": "RESUME"}`,
		`{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "id": 5}`,
		`{"return": [{"name": "device_add"}, {"name": "query-status"}], "id": 17}`,
		`{"id": {"a": [1]}, "return": {}}`,
		`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_READY", "data": {"device": "mirror0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}`,
		`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "completed"}}`,
		`{"event": "X", "timestamp": {"seconds": -1, "microseconds": -1}}`,
		`{"return": {}, "error": {}}`,
		`[]`, `null`, `"QMP"`, `{`, `{"event": null}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMessage(b)
		if err != nil {
			return
		}
		if m.kind < kindGreeting || m.kind > kindEvent {
			t.Fatalf("decodeMessage(%q) accepted with kind %d", b, m.kind)
		}
		enc, err := encodeMessage(m)
		if err != nil {
			t.Fatalf("encode %+v (from %q): %v", m, b, err)
		}
		back, err := decodeMessage(enc)
		if err != nil {
			t.Fatalf("decode of re-encoded %q (from %q): %v", enc, b, err)
		}
		if !messagesEqual(m, back) {
			t.Fatalf("round trip of %q via %q:\n got  %+v\n want %+v", b, enc, back, m)
		}
	})
}

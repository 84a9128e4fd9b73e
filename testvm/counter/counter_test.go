package counter

import (
	"bytes"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

const bootA = "0f3c9a2e-5b1d-4c8e-9a7f-1234567890ab"

func TestReplyRoundTrip(t *testing.T) {
	for _, r := range []Reply{
		{Value: 0, BootID: bootA},
		{Value: 1, BootID: bootA, Uptime: 1500 * time.Millisecond},
		{Value: 1<<64 - 1, BootID: bootA, Uptime: 72 * time.Hour},
	} {
		line := string(AppendReply(nil, r))
		got, err := ParseReply(line)
		if err != nil {
			t.Fatalf("ParseReply(%q): %v", line, err)
		}
		if got != r {
			t.Fatalf("round trip of %+v gave %+v", r, got)
		}
	}
}

func TestParseReplyRejects(t *testing.T) {
	for name, line := range map[string]string{
		"empty":         "",
		"no OK":         "YES 1 " + bootA + " 5",
		"missing field": "OK 1 " + bootA,
		"extra field":   "OK 1 " + bootA + " 5 6",
		"double space":  "OK  1 " + bootA + " 5",
		"bad value":     "OK x " + bootA + " 5",
		"negative":      "OK -1 " + bootA + " 5",
		"bad boot id":   "OK 1 not-a-boot-id 5",
		"upper hex":     "OK 1 " + strings.ToUpper(bootA) + " 5",
		"bad uptime":    "OK 1 " + bootA + " -5",
		"too long":      "OK 1 " + bootA + " " + strings.Repeat("1", MaxLine),
	} {
		t.Run(name, func(t *testing.T) {
			if r, err := ParseReply(line); err == nil {
				t.Fatalf("ParseReply(%q) = %+v, want an error", line, r)
			}
		})
	}
	_, err := ParseReply("ERR disk full\n")
	if !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("ERR reply gave %v, want ErrRemote with the message", err)
	}
}

func TestParseRequest(t *testing.T) {
	for line, want := range map[string]string{"INC\n": CmdInc, "GET": CmdGet, " INC \r\n": CmdInc, "WORK\n": CmdWork, "CHECK": CmdCheck} {
		if got, err := ParseRequest(line); err != nil || got != want {
			t.Errorf("ParseRequest(%q) = %q, %v; want %q", line, got, err, want)
		}
	}
	for _, line := range []string{"", "inc", "INCR", "DELETE everything"} {
		if _, err := ParseRequest(line); err == nil {
			t.Errorf("ParseRequest(%q) succeeded, want an error", line)
		}
	}
}

func TestRecordRoundTripAndCorruption(t *testing.T) {
	id, err := ParseBootID(bootA)
	if err != nil {
		t.Fatal(err)
	}
	if FormatBootID(id) != bootA {
		t.Fatalf("FormatBootID(ParseBootID(%s)) = %s", bootA, FormatBootID(id))
	}
	rec := Record{Value: 42, BootID: id}
	b := MarshalRecord(rec)
	got, err := UnmarshalRecord(b[:])
	if err != nil || got != rec {
		t.Fatalf("UnmarshalRecord = %+v, %v; want %+v", got, err, rec)
	}
	for i := range b {
		c := b
		c[i] ^= 0x40
		if _, err := UnmarshalRecord(c[:]); err == nil {
			t.Fatalf("flipping byte %d went unnoticed", i)
		}
	}
	var zero [RecordSize]byte
	if _, err := UnmarshalRecord(zero[:]); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("zero block: %v, want ErrNoRecord", err)
	}
}

func TestReadRecords(t *testing.T) {
	id, _ := ParseBootID(bootA)
	img := make([]byte, 16*RecordSize)
	for v := uint64(1); v <= 5; v++ {
		r := MarshalRecord(Record{Value: v, BootID: id})
		copy(img[Offset(v):], r[:])
	}
	recs, err := ReadRecords(bytes.NewReader(img), int64(len(img)))
	if err != nil || len(recs) != 5 || recs[4].Value != 5 {
		t.Fatalf("ReadRecords = %d records, %v; want 5", len(recs), err)
	}
	// A record out of sequence is reported.
	r := MarshalRecord(Record{Value: 9, BootID: id})
	copy(img[Offset(6):], r[:])
	recs, err = ReadRecords(bytes.NewReader(img), int64(len(img)))
	if err == nil || len(recs) != 5 {
		t.Fatalf("out-of-sequence record: %d records, %v; want 5 and an error", len(recs), err)
	}
}

func TestClientOverPipe(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		defer b.Close()
		buf := make([]byte, MaxLine)
		var v uint64
		for {
			n, err := b.Read(buf)
			if err != nil {
				return
			}
			cmd, err := ParseRequest(string(buf[:n]))
			if err != nil {
				b.Write(AppendError(nil, err.Error()))
				continue
			}
			if cmd == CmdInc {
				v++
			}
			b.Write(AppendReply(nil, Reply{Value: v, BootID: bootA, Uptime: time.Second}))
		}
	}()
	c := NewClient(a)
	for want := uint64(1); want <= 3; want++ {
		r, err := c.Inc()
		if err != nil || r.Value != want || r.BootID != bootA {
			t.Fatalf("Inc = %+v, %v; want value %d", r, err, want)
		}
	}
	if r, err := c.Get(); err != nil || r.Value != 3 {
		t.Fatalf("Get = %+v, %v; want 3", r, err)
	}
}

func FuzzParseReply(f *testing.F) {
	f.Add("OK 1 " + bootA + " 5\n")
	f.Add("ERR boom\n")
	f.Add("OK 18446744073709551615 " + bootA + " 0")
	f.Fuzz(func(t *testing.T, line string) {
		r, err := ParseReply(line)
		if err != nil {
			return
		}
		again, err := ParseReply(string(AppendReply(nil, r)))
		if err != nil || again != r {
			t.Fatalf("accepted %q as %+v but its re-encoding gives %+v, %v", line, r, again, err)
		}
	})
}

func FuzzUnmarshalRecord(f *testing.F) {
	id, _ := ParseBootID(bootA)
	good := MarshalRecord(Record{Value: 7, BootID: id})
	f.Add(good[:])
	f.Add(make([]byte, RecordSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := UnmarshalRecord(b)
		if err != nil {
			return
		}
		if m := MarshalRecord(r); !bytes.Equal(m[:], b) {
			t.Fatalf("accepted a block that does not re-encode to itself")
		}
	})
}

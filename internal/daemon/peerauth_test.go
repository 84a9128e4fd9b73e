package daemon

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPeerAuth(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	now := time.Unix(1_800_000_000, 0)
	body := []byte(`{"vm":"web"}`)
	good := SignRequest(key, "POST", pathStandby, now, body)
	if err := VerifyRequest(key, good, "POST", pathStandby, now.Add(30*time.Second), body); err != nil {
		t.Fatalf("a signed request: %v", err)
	}
	for _, tc := range []struct {
		name, header, method, path string
		now                        time.Time
		body                       string
		want                       string
	}{
		{"no header", "", "POST", pathStandby, now, string(body), "no Remus-Auth header"},
		{"other body", good, "POST", pathStandby, now, `{"vm":"db"}`, "wrong MAC"},
		{"other path", good, "POST", pathRelease, now, string(body), "wrong MAC"},
		{"other method", good, "GET", pathStandby, now, string(body), "wrong MAC"},
		{"other key", SignRequest([]byte("another key of 32 bytes........."), "POST", pathStandby, now, body), "POST", pathStandby, now, string(body), "wrong MAC"},
		{"too old", good, "POST", pathStandby, now.Add(2 * time.Minute), string(body), "from this host's clock"},
		{"from the future", good, "POST", pathStandby, now.Add(-2 * time.Minute), string(body), "from this host's clock"},
		{"garbage", "Bearer xyz", "POST", pathStandby, now, string(body), "want t=UNIX-SECONDS,mac=HEX"},
		{"short mac", "t=1800000000,mac=abcd", "POST", pathStandby, now, string(body), "want 32 bytes"},
		{"negative time", "t=-5,mac=" + strings.Repeat("00", 32), "POST", pathStandby, now, string(body), "not unix seconds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := VerifyRequest(key, tc.header, tc.method, tc.path, tc.now, []byte(tc.body))
			if !errors.Is(err, ErrUnauthenticated) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrUnauthenticated saying %q", err, tc.want)
			}
		})
	}
}

func FuzzParseAuth(f *testing.F) {
	key := []byte("0123456789abcdef")
	f.Add(SignRequest(key, "GET", pathHello, time.Unix(1_800_000_000, 0), nil))
	f.Add("t=1,mac=")
	f.Add(",")
	f.Fuzz(func(t *testing.T, v string) {
		ts, mac, err := ParseAuth(v)
		if err != nil {
			return
		}
		if ts < 0 || len(mac) != 32 {
			t.Fatalf("ParseAuth(%q) = %d, %d bytes: accepted out of range", v, ts, len(mac))
		}
		// What parses verifies or is refused, never panics.
		VerifyRequest(key, v, "GET", pathHello, time.Unix(ts, 0), nil)
	})
}

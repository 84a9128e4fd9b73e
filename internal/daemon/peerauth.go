package daemon

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// AuthHeader is the HTTP header that authenticates a request on the peer
// API:
//
//	Remus-Auth: t=UNIX-SECONDS,mac=HEX
//
// where HEX is HMAC-SHA256, under the hosts' shared key (remusd's
// --key-file, the one that authenticates the agents' link), of
//
//	"remus-peer-v1\n" METHOD "\n" PATH "\n" UNIX-SECONDS "\n" hex(SHA-256(body))
//
// A request whose time is further than AuthSkew from the receiver's clock
// is refused, which bounds how long a captured request can be replayed;
// the peer API's requests are idempotent, so a replay within that time
// repeats what was done. The body is not encrypted: run the peer API on a
// network the hosts trust, as the agents' link.
const AuthHeader = "Remus-Auth"

// AuthSkew is the most a request's time may differ from the receiver's.
const AuthSkew = time.Minute

// authTag is what the MAC covers.
func authTag(key []byte, method, path string, t int64, body []byte) []byte {
	sum := sha256.Sum256(body)
	m := hmac.New(sha256.New, key)
	fmt.Fprintf(m, "remus-peer-v1\n%s\n%s\n%d\n%s", method, path, t, hex.EncodeToString(sum[:]))
	return m.Sum(nil)
}

// SignRequest returns the AuthHeader value for a request.
func SignRequest(key []byte, method, path string, now time.Time, body []byte) string {
	t := now.Unix()
	return "t=" + strconv.FormatInt(t, 10) + ",mac=" + hex.EncodeToString(authTag(key, method, path, t, body))
}

// ParseAuth reads an AuthHeader value.
func ParseAuth(v string) (t int64, mac []byte, err error) {
	ts, rest, ok := strings.Cut(v, ",")
	if !ok {
		return 0, nil, errors.New("want t=UNIX-SECONDS,mac=HEX")
	}
	ts, ok1 := strings.CutPrefix(ts, "t=")
	ms, ok2 := strings.CutPrefix(rest, "mac=")
	if !ok1 || !ok2 {
		return 0, nil, errors.New("want t=UNIX-SECONDS,mac=HEX")
	}
	if t, err = strconv.ParseInt(ts, 10, 64); err != nil || t < 0 {
		return 0, nil, fmt.Errorf("time %q: not unix seconds", ts)
	}
	if mac, err = hex.DecodeString(ms); err != nil || len(mac) != sha256.Size {
		return 0, nil, fmt.Errorf("mac: want %d bytes in hex", sha256.Size)
	}
	return t, mac, nil
}

// ErrUnauthenticated is what VerifyRequest's errors wrap.
var ErrUnauthenticated = errors.New("peer request not authenticated")

// VerifyRequest checks a request's AuthHeader value against key.
func VerifyRequest(key []byte, header, method, path string, now time.Time, body []byte) error {
	if header == "" {
		return fmt.Errorf("%w: no %s header (is the peer's --key-file set?)", ErrUnauthenticated, AuthHeader)
	}
	t, mac, err := ParseAuth(header)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrUnauthenticated, AuthHeader, err)
	}
	if d := now.Sub(time.Unix(t, 0)); d > AuthSkew || d < -AuthSkew {
		return fmt.Errorf("%w: request time %s is %v from this host's clock (at most %v: are the clocks synchronised?)",
			ErrUnauthenticated, time.Unix(t, 0).UTC().Format(time.RFC3339), d.Round(time.Second), AuthSkew)
	}
	if !hmac.Equal(mac, authTag(key, method, path, t, body)) {
		return fmt.Errorf("%w: wrong MAC (the hosts' key files differ?)", ErrUnauthenticated)
	}
	return nil
}

// Package counter is the wire format of the test guest's counter service and
// of the records it appends to its disk. The guest program (testvm/guestinit)
// and the host-side tests and demo share it, so both ends agree by
// construction.
//
// The service speaks one line per request and one line per reply over TCP:
//
//	request:  INC\n                 increment the counter, persist, reply
//	request:  GET\n                 reply with the current value
//	reply:    OK <value> <boot-id> <uptime-ms>\n
//	reply:    ERR <message>\n
//
// <boot-id> is the guest kernel's /proc/sys/kernel/random/boot_id: a guest
// that resumes from a checkpoint keeps it, a rebooted guest does not.
//
// When a disk is attached, INC writes record number value-1 (RecordSize bytes
// at offset (value-1)*RecordSize) and fsyncs it before replying, so the disk
// holds one contiguous run of records, one per acknowledged increment.
package counter

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strconv"
	"strings"
	"time"
)

// Requests understood by the service.
const (
	CmdInc = "INC"
	CmdGet = "GET"
	// CmdWork asks how much background work the guest has done since it
	// booted (its remus.work workload's units: files compressed); the
	// reply's Value carries it. Sampled twice, it gives the workload's
	// throughput.
	CmdWork = "WORK"
	// CmdCheck asks the guest to check its dirtier's memory (remus.dirty):
	// the reply's Value counts the pages out of order, 0 when guest RAM is
	// consistent (a resumed checkpoint missed no write there); an ERR
	// reply when no dirtier runs.
	CmdCheck = "CHECK"
)

// MaxLine caps a request or reply line; longer input is rejected.
const MaxLine = 256

// Reply is the service's answer to one request.
type Reply struct {
	Value  uint64
	BootID string
	Uptime time.Duration // guest uptime at the time of the reply, in ms resolution
}

// ErrRemote is wrapped by errors the guest reported with an ERR reply.
var ErrRemote = errors.New("counter service error")

// AppendReply encodes r as one reply line.
func AppendReply(b []byte, r Reply) []byte {
	b = append(b, "OK "...)
	b = strconv.AppendUint(b, r.Value, 10)
	b = append(b, ' ')
	b = append(b, r.BootID...)
	b = append(b, ' ')
	b = strconv.AppendInt(b, r.Uptime.Milliseconds(), 10)
	return append(b, '\n')
}

// AppendError encodes an ERR reply line; newlines in msg are replaced.
func AppendError(b []byte, msg string) []byte {
	b = append(b, "ERR "...)
	b = append(b, strings.ReplaceAll(msg, "\n", " ")...)
	return append(b, '\n')
}

// ParseReply decodes one reply line (with or without its trailing newline).
func ParseReply(line string) (Reply, error) {
	line = strings.TrimSuffix(line, "\n")
	if len(line) > MaxLine {
		return Reply{}, fmt.Errorf("counter: reply of %d bytes exceeds %d", len(line), MaxLine)
	}
	if msg, ok := strings.CutPrefix(line, "ERR "); ok {
		return Reply{}, fmt.Errorf("%w: %s", ErrRemote, msg)
	}
	f := strings.Fields(line)
	if len(f) != 4 || f[0] != "OK" || strings.Join(f, " ") != line {
		return Reply{}, fmt.Errorf("counter: malformed reply %q", line)
	}
	v, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return Reply{}, fmt.Errorf("counter: malformed value in reply %q: %w", line, err)
	}
	if !validBootID(f[2]) {
		return Reply{}, fmt.Errorf("counter: malformed boot id in reply %q", line)
	}
	ms, err := strconv.ParseInt(f[3], 10, 64)
	if err != nil || ms < 0 {
		return Reply{}, fmt.Errorf("counter: malformed uptime in reply %q", line)
	}
	return Reply{Value: v, BootID: f[2], Uptime: time.Duration(ms) * time.Millisecond}, nil
}

// ParseRequest decodes one request line (with or without its newline).
func ParseRequest(line string) (string, error) {
	cmd := strings.TrimSpace(line)
	switch cmd {
	case CmdInc, CmdGet, CmdWork, CmdCheck:
		return cmd, nil
	}
	if len(cmd) > 32 {
		cmd = cmd[:32] + "..."
	}
	return "", fmt.Errorf("counter: unknown request %q", cmd)
}

// validBootID accepts the kernel's boot id form: 36 characters of hex digits
// and dashes (8-4-4-4-12).
func validBootID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// Client talks to the counter service over one connection. It is not safe
// for concurrent use.
type Client struct {
	rw io.ReadWriter
	r  *bufio.Reader
}

// NewClient wraps an established connection.
func NewClient(rw io.ReadWriter) *Client {
	return &Client{rw: rw, r: bufio.NewReaderSize(rw, MaxLine)}
}

// Inc increments the counter and returns the guest's reply.
func (c *Client) Inc() (Reply, error) { return c.do(CmdInc) }

// Get returns the current value without changing it.
func (c *Client) Get() (Reply, error) { return c.do(CmdGet) }

// Check returns the number of pages of the guest's dirtier found out of
// order (0: consistent), in the reply's Value.
func (c *Client) Check() (Reply, error) { return c.do(CmdCheck) }

// Work returns the units of background work the guest has done since it
// booted, in the reply's Value.
func (c *Client) Work() (Reply, error) { return c.do(CmdWork) }

func (c *Client) do(cmd string) (Reply, error) {
	if _, err := io.WriteString(c.rw, cmd+"\n"); err != nil {
		return Reply{}, fmt.Errorf("counter: send %s: %w", cmd, err)
	}
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		return Reply{}, fmt.Errorf("counter: read reply to %s: %w", cmd, err)
	}
	return ParseReply(string(line))
}

// RecordSize is the size of one disk record.
const RecordSize = 64

var recordMagic = [8]byte{'R', 'M', 'C', 'N', 'T', 'R', '0', '1'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one acknowledged increment as persisted on the guest's disk.
type Record struct {
	Value  uint64
	BootID [16]byte
}

// Offset is where the record for value lives on the disk.
func Offset(value uint64) int64 { return int64(value-1) * RecordSize }

// MarshalRecord encodes r into a RecordSize-byte block:
// magic[8] | value u64 | boot id [16] | zero padding | crc32c u32 (last 4 bytes).
func MarshalRecord(r Record) [RecordSize]byte {
	var b [RecordSize]byte
	copy(b[0:8], recordMagic[:])
	binary.BigEndian.PutUint64(b[8:16], r.Value)
	copy(b[16:32], r.BootID[:])
	binary.BigEndian.PutUint32(b[RecordSize-4:], crc32.Checksum(b[:RecordSize-4], castagnoli))
	return b
}

// ErrNoRecord reports a block that holds no record (all zero: never written).
var ErrNoRecord = errors.New("counter: no record")

// UnmarshalRecord decodes a RecordSize-byte block. An all-zero block gives
// ErrNoRecord; anything else that is not a valid record is an error.
func UnmarshalRecord(b []byte) (Record, error) {
	if len(b) != RecordSize {
		return Record{}, fmt.Errorf("counter: record of %d bytes, want %d", len(b), RecordSize)
	}
	zero := true
	for _, c := range b {
		if c != 0 {
			zero = false
			break
		}
	}
	if zero {
		return Record{}, ErrNoRecord
	}
	if [8]byte(b[0:8]) != recordMagic {
		return Record{}, fmt.Errorf("counter: bad record magic %q", b[0:8])
	}
	if got, want := binary.BigEndian.Uint32(b[RecordSize-4:]), crc32.Checksum(b[:RecordSize-4], castagnoli); got != want {
		return Record{}, fmt.Errorf("counter: record checksum %08x, want %08x", got, want)
	}
	for _, c := range b[32 : RecordSize-4] {
		if c != 0 {
			return Record{}, errors.New("counter: record padding is not zero")
		}
	}
	var r Record
	r.Value = binary.BigEndian.Uint64(b[8:16])
	copy(r.BootID[:], b[16:32])
	return r, nil
}

// ParseBootID converts the kernel's textual boot id to 16 bytes.
func ParseBootID(s string) ([16]byte, error) {
	var id [16]byte
	if !validBootID(s) {
		return id, fmt.Errorf("counter: malformed boot id %q", s)
	}
	hex := strings.ReplaceAll(s, "-", "")
	for i := range id {
		v, err := strconv.ParseUint(hex[2*i:2*i+2], 16, 8)
		if err != nil {
			return id, fmt.Errorf("counter: malformed boot id %q: %w", s, err)
		}
		id[i] = byte(v)
	}
	return id, nil
}

// FormatBootID is the inverse of ParseBootID.
func FormatBootID(id [16]byte) string {
	const digits = "0123456789abcdef"
	var b []byte
	for i, c := range id {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			b = append(b, '-')
		}
		b = append(b, digits[c>>4], digits[c&15])
	}
	return string(b)
}

// ReadRecords reads the records from the start of a disk image until the
// first never-written block, checking that record i holds value i+1. It
// returns the records found and an error for the first block that is corrupt
// or out of sequence.
func ReadRecords(r io.ReaderAt, size int64) ([]Record, error) {
	var out []Record
	var b [RecordSize]byte
	for off := int64(0); off+RecordSize <= size; off += RecordSize {
		if _, err := r.ReadAt(b[:], off); err != nil {
			return out, fmt.Errorf("counter: read record at offset %d: %w", off, err)
		}
		rec, err := UnmarshalRecord(b[:])
		if errors.Is(err, ErrNoRecord) {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("counter: record at offset %d: %w", off, err)
		}
		if want := uint64(len(out)) + 1; rec.Value != want {
			return out, fmt.Errorf("counter: record at offset %d holds value %d, want %d", off, rec.Value, want)
		}
		out = append(out, rec)
	}
	return out, nil
}

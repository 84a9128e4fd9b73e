package transport

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors, for errors.Is. The errors returned carry more detail.
var (
	// ErrCorrupt reports a frame that fails its checks: bad magic or a
	// checksum mismatch. The stream cannot be trusted after it.
	ErrCorrupt = errors.New("transport: corrupt frame")
	// ErrTooLarge reports a frame or message beyond one of the hard caps
	// (MaxPayload, MaxPagesPerFrame, MaxDeviceState, ...).
	ErrTooLarge = errors.New("transport: over size limit")
	// ErrVersion reports a protocol version outside MinVersion..MaxVersion.
	ErrVersion = errors.New("transport: unsupported protocol version")
	// ErrSequence reports a frame whose seq is not the previous one plus one:
	// a gap, a repeat or a reorder.
	ErrSequence = errors.New("transport: frame out of sequence")
	// ErrUnsupported reports a well-formed frame of a type, or with flags,
	// that this version does not know or does not implement.
	ErrUnsupported = errors.New("transport: unsupported frame")
	// ErrMalformed reports a payload that does not decode as its type's
	// message, or a message that cannot be encoded.
	ErrMalformed = errors.New("transport: malformed message")
	// ErrEpoch reports an epoch that Stage rejects: a frame for another
	// epoch, a page outside the VM's RAM, or a Commit that does not match
	// what arrived.
	ErrEpoch = errors.New("transport: epoch rejected")
	// ErrAuth reports a connection that failed authentication: the peer
	// has another key, sent a frame without or with a wrong tag, or does
	// not authenticate at all.
	ErrAuth = errors.New("transport: authentication failed")
	// ErrBroken reports a Conn whose send side is unusable because an
	// earlier write stopped part-way through a frame.
	ErrBroken = errors.New("transport: connection broken")
)

// FrameError is a frame-level error from Reader: where the frame started,
// what it was if its header verified, and what is wrong with it. It unwraps
// to its Kind (one of the sentinel errors) and to Err (such as
// io.ErrUnexpectedEOF for a truncated frame).
type FrameError struct {
	// Offset is the stream offset of the frame's first byte.
	Offset int64
	// Header reports whether Seq, Type and Epoch come from a header whose
	// checksum verified; when false they are zero.
	Header bool
	// Seq is the frame's sequence number.
	Seq uint64
	// Type is the frame's type.
	Type Type
	// Epoch is the frame's epoch.
	Epoch uint64
	// Kind is the sentinel error for the problem, or nil.
	Kind error
	// Detail says what is wrong, e.g. "payload checksum 0x1234abcd, want
	// 0x00000000".
	Detail string
	// Err is an underlying cause, or nil.
	Err error
}

// Error implements error, e.g.
// "transport: frame seq 12 (RAMPages, epoch 812) at byte 4096: payload checksum 0x1234abcd, want 0x89abcdef".
func (e *FrameError) Error() string {
	var b strings.Builder
	if e.Header {
		fmt.Fprintf(&b, "transport: frame seq %d (%s, epoch %d) at byte %d: %s", e.Seq, e.Type, e.Epoch, e.Offset, e.Detail)
	} else {
		fmt.Fprintf(&b, "transport: frame at byte %d: %s", e.Offset, e.Detail)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns Kind and Err, those that are set.
func (e *FrameError) Unwrap() []error {
	var errs []error
	if e.Kind != nil {
		errs = append(errs, e.Kind)
	}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

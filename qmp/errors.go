package qmp

import (
	"errors"
	"fmt"
)

// ErrClosed is wrapped by every error that reports that the connection to
// QEMU is gone: QEMU closed its end (EOF), the socket failed, the peer broke
// the protocol, or [Client.Close] was called. The error text says which.
var ErrClosed = errors.New("qmp: connection closed")

// ErrProtocol is wrapped, together with [ErrClosed], when the client closed
// the connection because the peer sent something that is not QMP: invalid
// JSON, a JSON value that is not a QMP message, a first message that is not
// the greeting, or a message larger than the configured limit.
var ErrProtocol = errors.New("qmp: protocol error")

// errClosedByClient is the cause recorded when Close is called.
var errClosedByClient = errors.New("closed by client")

// Error is a QMP error response: QEMU received the command and refused or
// failed it. Use errors.As to get at it:
//
//	var qe *qmp.Error
//	if errors.As(err, &qe) && qe.Class == "CommandNotFound" { ... }
type Error struct {
	// Command is the command that failed.
	Command string
	// Class is QEMU's error class, for example "GenericError",
	// "CommandNotFound", "DeviceNotFound" or "DeviceNotActive".
	Class string
	// Desc is QEMU's human-readable description.
	Desc string
}

// Error returns "qmp: COMMAND: CLASS: DESC".
func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s: %s", e.Command, e.Class, e.Desc)
}

// closedError records why the connection closed. It matches ErrClosed with
// errors.Is and unwraps to the cause.
type closedError struct {
	cause error
}

func (e *closedError) Error() string { return "connection closed: " + e.cause.Error() }

func (e *closedError) Is(target error) bool { return target == ErrClosed }

func (e *closedError) Unwrap() error { return e.cause }

// protocolError is the cause recorded when the peer broke the protocol. It
// matches ErrProtocol with errors.Is.
type protocolError struct {
	msg string
	err error // may be nil
}

func (e *protocolError) Error() string {
	if e.err == nil {
		return "protocol error: " + e.msg
	}
	return "protocol error: " + e.msg + ": " + e.err.Error()
}

func (e *protocolError) Is(target error) bool { return target == ErrProtocol }

func (e *protocolError) Unwrap() error { return e.err }

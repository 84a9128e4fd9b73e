package qmp

import "log/slog"

// DefaultMaxMessageSize is the largest single message accepted from QEMU
// unless WithMaxMessageSize says otherwise. The largest real replies
// (query-qmp-schema) are a few hundred KiB.
const DefaultMaxMessageSize = 16 << 20

// DefaultEventBuffer is how many events a subscription holds for a consumer
// that has not read them yet, unless WithEventBuffer says otherwise.
const DefaultEventBuffer = 64

// Option configures a Client; pass options to Dial or New.
type Option func(*options)

type options struct {
	logger      *slog.Logger
	maxMessage  int64
	eventBuffer int
	minVersion  *Version
}

func defaultOptions() options {
	return options{
		logger:      slog.New(slog.DiscardHandler),
		maxMessage:  DefaultMaxMessageSize,
		eventBuffer: DefaultEventBuffer,
	}
}

// WithLogger sets where the client logs what it drops: events that a full
// subscription could not take (Warn), replies that match no command (Warn),
// and late replies to commands whose caller gave up (Debug). By default
// nothing is logged.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// WithMaxMessageSize caps the size in bytes of one message from QEMU; a
// larger one closes the connection with ErrProtocol. Values below 1 KiB are
// raised to 1 KiB.
func WithMaxMessageSize(n int64) Option {
	return func(o *options) {
		o.maxMessage = max(n, 1024)
	}
}

// WithEventBuffer sets how many unread events each subscription holds before
// further events to it are dropped. Values below 1 are raised to 1.
func WithEventBuffer(n int) Option {
	return func(o *options) {
		o.eventBuffer = max(n, 1)
	}
}

// WithMinVersion makes the handshake fail when the greeting announces a
// QEMU older than v (Package is ignored).
func WithMinVersion(v Version) Option {
	return func(o *options) {
		o.minVersion = &v
	}
}

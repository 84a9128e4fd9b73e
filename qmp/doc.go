// Package qmp is a client for the QEMU Machine Protocol (QMP), the JSON
// protocol of QEMU's control monitor (`-qmp unix:PATH,server=on,wait=off`
// or `-chardev socket,...` with `-mon chardev=ID,mode=control`).
//
// # Design
//
// Dial (or New, on any net.Conn) reads QEMU's greeting, which carries the
// QEMU version and the capabilities on offer, sends qmp_capabilities and
// waits for its return; none of the offered capabilities (OOB) is enabled,
// so QEMU runs commands one at a time in the order it reads them.
//
// One goroutine owns reading the socket. It decodes the stream with a
// json.Decoder, so messages need not be one per line, and caps the size of
// any one message (DefaultMaxMessageSize, WithMaxMessageSize) so that a
// runaway peer cannot exhaust memory. Each command written by
// Client.Execute carries a unique numeric id; the reader hands each reply
// to the caller waiting for that id. Writes are serialized.
//
// When a caller's context ends before QEMU answers, Execute returns at once
// with the context's error, but the command stays registered as abandoned:
// its reply, when it comes, is read and discarded. A reply is therefore never
// matched to a command other than the one that asked for it; a `stop` that
// timed out cannot hand its return to the next `cont`. An abandoned command
// is remembered until its reply arrives or the connection closes. (The
// command may still have taken effect in QEMU: a context error means the
// outcome is unknown.) A context that ends while the command is still being
// written, because QEMU is not reading its socket, returns "not sent" if no
// byte went out; a write cut part way closes the connection, since the
// stream can no longer be parsed by QEMU.
//
// Asynchronous events (STOP, RESUME, SHUTDOWN, BLOCK_JOB_READY, ...) go to
// any number of independent Subscriptions, each with its own bounded buffer.
// The reader never blocks on a subscriber: when a buffer is full the event
// is dropped for that subscriber, counted (Subscription.Dropped) and logged
// at Warn through the logger given with WithLogger. To wait for the event a
// command causes, subscribe first, then execute, then Subscription.Wait:
// QEMU 7.2 emits STOP before the return of `stop`, so subscribing after
// Execute returns would miss it.
//
// # Closing
//
// When the connection ends, for any reason, every pending and later Execute
// fails promptly with an error wrapping ErrClosed that says why, for example
// "qmp: query-status: connection closed: EOF". Done is closed, Err reports
// the reason and every subscription's channel is closed. Reasons are EOF or
// a socket error (QEMU exited or was killed), Close, or a protocol error
// (ErrProtocol): input that is not valid JSON, a JSON value that is not a
// QMP message, a first message that is not the greeting, or an oversized
// message. A protocol error is fatal because the stream cannot be trusted
// or resynchronized after it; the error quotes the start of the bad input.
// Replies that are well formed but carry no id of this client, such as the
// id-less error QEMU sends for input it cannot parse, are logged at Warn
// and dropped.
//
// QMP error replies are returned as *Error, which keeps QEMU's error class.
package qmp

// Package transport is the wire format between the primary and the backup
// agent, and a connection wrapper that speaks it.
//
// Each protected VM has one TCP connection between the two agents. Both
// directions carry a stream of frames. On an authenticated connection each
// side first sends Auth. The primary sends Hello, the disk's initial copy
// as DiskWrite frames of epoch 0, the live first sync of RAM (copied while
// the guest runs) as RAMPages or RAMDelta frames of epoch 0, which the
// backup writes into its image at once, then for every epoch its DiskWrite,
// RAMPages (or RAMDelta) and DeviceState (or DeviceStateZ) frames followed
// by a Commit; the backup sends Hello and an Ack for every epoch it
// verified and applied. Both send Heartbeats, and an Error that ends the
// session (a goodbye, a takeover, a refusal: see ErrorCode).
//
// # Frame layout
//
// All integers are big-endian. CRC32C is CRC-32 with the Castagnoli
// polynomial (hash/crc32.Castagnoli).
//
//	offset  size  field        meaning
//	------  ----  -----------  ---------------------------------------------
//	     0     4  magic        "RMUS"
//	     4     1  version      MinVersion..MaxVersion (2 now; version 1 had
//	                           no disk size in Hello)
//	     5     1  type         Type; unknown types are rejected
//	     6     2  flags        Flags; unknown or unsupported bits are rejected
//	     8     8  epoch        epoch the frame belongs to, 0 when none
//	    16     8  seq          per-direction sequence number: 1, 2, 3, ...
//	    24     4  length       payload length n, at most MaxPayload
//	    28     4  header CRC   CRC32C of bytes 0..27
//	    32     n  payload      the message, n bytes (see Payloads)
//	  32+n     4  payload CRC  CRC32C of the payload
//
// A frame is Overhead (36) bytes longer than its payload. The magic and the
// version byte are the only fields every protocol version keeps in place;
// the reader checks them first, so a peer speaking another version is told
// apart from a corrupt stream. The header has its own checksum so that the
// length is trusted before the payload is read: a frame that announces more
// than MaxPayload is rejected before anything is allocated, and a bit flip
// in the length cannot make the reader wait for bytes that never come.
//
// Size rule: MaxPayload (8 MiB) caps the payload as it travels, the
// TagSize (32) byte tag of an authenticated frame included, on both ends
// (writer and Reader). The message inside is capped at MaxMessage =
// MaxPayload - TagSize whether the connection is authenticated or not:
// NewFrame and Decode refuse a longer one and every message cap
// (MaxDeviceChunk, MaxDiskChunk, MaxPagesPerFrame) stays within it, so a
// message that encodes also fits once tagged.
//
// # Payloads
//
// Each frame type's payload, decoded strictly (trailing bytes and fields out
// of range are rejected):
//
//	type             payload
//	---------------  -----------------------------------------------------
//	1 Hello          version u8 | role u8 | name length u8 | name (1..255
//	                 bytes of UTF-8) | RAM size u64 | page size u32 |
//	                 last committed epoch u64 | disk size u64 (0: none)
//	2 RAMPages       count u16 (1..256) | count × page index u64, strictly
//	                 ascending | count × 4096 bytes of page data; epoch 0:
//	                 the live first sync
//	3 DeviceState    offset u32 | total u32 (1..64 MiB) | data (1 byte to
//	                 MaxMessage-8, ending at or before total)
//	4 Commit         page count u64 | device state length u64 | digest u32
//	5 Ack            empty
//	6 Heartbeat      sent time i64 (Unix ns) | last committed epoch u64
//	7 Error          code u16 (not 0) | message length u16 (0..1024) |
//	                 message (UTF-8); codes 6 goodbye, 7 takeover and 8
//	                 failed-over end a session on purpose (see ErrorCode)
//	8 DiskWrite      offset u64 | length u32 | flags u8 | data (none for a
//	                 zero write); epoch 0: the initial disk copy
//	9 RAMDelta       count u16 | codec u8 | index u64 × count | kind u8 ×
//	                 count | raw length u32 | compressed blob (zstd: one
//	                 frame that declares the raw length; lz4: a block)
//	10 Auth          nonce [32]byte (first frame each way on an authenticated
//	                 connection; every later frame has FlagAuthenticated)
//	11 DeviceStateZ  as DeviceState; the chunks together are one zstd frame
//	                 that declares its content size (1..64 MiB) and
//	                 decompresses to the device state
//
// Sequence numbers start at 1 in each direction and grow by exactly one per
// frame; Reader rejects a gap, a repeat or a reorder (ErrSequence). They are
// the basis for replay protection on an authenticated connection.
//
// # Authentication
//
// With a pre-shared key (Conn.Authenticate) each side first sends an Auth
// frame with a fresh nonce; each direction then has its own key, derived
// from the key and both nonces (see auth.go), and every later frame has
// FlagAuthenticated and ends in a TagSize-byte HMAC-SHA256 tag made with
// the key of the direction it travels in. A frame sent back to its sender
// (reflection) therefore fails the tag check, and so does a peer that sends
// back this side's own nonce as its own.
//
// # Compatibility rules
//
// The Type, Flags, Role and ErrorCode numbers are the protocol: values are
// appended, never renumbered or reused. A change to any layout needs a new
// version number; a decoder accepts the range MinVersion..MaxVersion.
//
// The primary and the backup agent ship together, so this package reads
// only the version it writes: MinVersion = MaxVersion = Version. A peer of
// another version is refused at its first frame with ErrVersion (the
// version byte is checked before anything else of the header), and nothing
// of an older layout is decoded. Version 2 changed, from version 1:
//
//   - Hello ends in a disk size u64 (0: no disk);
//   - authentication keys are per direction (see Authentication);
//   - a message is at most MaxMessage = MaxPayload - TagSize bytes, so a
//     DeviceState chunk carries at most MaxMessage-8 bytes;
//   - a zstd blob (RAMDelta, DeviceStateZ) is one frame that declares its
//     content size.
//
// # Epochs
//
// An epoch is sent as its disk writes (DiskWrite), its pages (RAMPages, or
// RAMDelta when compressed; in ascending index order, each page at most
// once per epoch), its device state in chunks in offset order
// (DeviceState, or DeviceStateZ when compressed), and a Commit carrying
// the page count, the device state length and a CRC32C digest of the
// content in send order (see Digest). All of them carry the
// epoch number in the header. The backup feeds them to a Stage, which hands
// the epoch out only when the Commit verifies; the backup applies it and
// sends an Ack with the same epoch number. Epochs are numbered from 1 and
// committed consecutively.
//
// # Errors
//
// Reader and the decoders report errors usable with errors.Is: ErrCorrupt,
// ErrTooLarge, ErrVersion, ErrSequence, ErrUnsupported, ErrMalformed,
// ErrEpoch, and io.ErrUnexpectedEOF for a stream that ends inside a frame.
// Frame-level errors are *FrameError values that say where the frame
// started and, once its header verified, its seq, type and epoch.
package transport

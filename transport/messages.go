package transport

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/bits"
	"unicode/utf8"
)

// Message caps and sizes.
const (
	// PageSize is the size of a guest page in RAMPages.
	PageSize = 4096
	// MaxPagesPerFrame caps the pages in one RAMPages frame (about 1 MiB of
	// payload).
	MaxPagesPerFrame = 256
	// MaxPageIndex is the largest page index whose byte offset
	// (index*PageSize) fits in a uint64.
	MaxPageIndex = (1<<64 - 1) / PageSize
	// MaxVMName caps Hello.VMName, in bytes.
	MaxVMName = 255
	// MaxDeviceState caps an epoch's whole device state: 64 MiB.
	MaxDeviceState = 64 << 20
	// MaxDeviceChunk caps the data in one DeviceState frame: what fits in
	// MaxMessage after the chunk's offset and total (so an authenticated
	// frame's tag still fits within MaxPayload).
	MaxDeviceChunk = MaxMessage - deviceStateHeader
	// MaxErrorMessage caps Error.Message, in bytes.
	MaxErrorMessage = 1024

	deviceStateHeader = 8
	helloFixed        = 1 + 1 + 1 + 8 + 4 + 8 + 8
	pageEntry         = 8 + PageSize
	commitSize        = 8 + 8 + 4
	heartbeatSize     = 8 + 8
)

// Message is a frame payload's decoded form, one type per frame Type:
// Hello, RAMPages, DeviceState, Commit, Ack, Heartbeat, Error, DiskWrite,
// RAMDelta, Auth or DeviceStateZ.
type Message interface {
	// Type is the frame type that carries the message.
	Type() Type
	// AppendPayload validates the message and appends its encoding to dst.
	AppendPayload(dst []byte) ([]byte, error)
}

// NewFrame encodes m as the payload of a frame of m's type for epoch. The
// seq is left zero for Conn.Send to assign.
func NewFrame(epoch uint64, m Message) (Frame, error) {
	p, err := m.AppendPayload(nil)
	if err != nil {
		return Frame{}, err
	}
	if len(p) > MaxMessage { // the message caps keep payloads below it
		return Frame{}, fmt.Errorf("%w: %s message of %d bytes exceeds MaxMessage (%d)", ErrTooLarge, m.Type(), len(p), MaxMessage)
	}
	return Frame{Version: Version, Type: m.Type(), Epoch: epoch, Payload: p}, nil
}

// Decode decodes f's payload as the Message of f's type. Decoding is
// strict: a payload with trailing bytes or a field outside its range is
// rejected (ErrMalformed, ErrTooLarge), and so is a payload over
// MaxMessage. Byte slices in the result alias f.Payload.
func Decode(f Frame) (Message, error) {
	if f.Flags != 0 {
		return nil, fmt.Errorf("%w: %s with flags %s", ErrUnsupported, f.Type, f.Flags)
	}
	if len(f.Payload) > MaxMessage {
		return nil, fmt.Errorf("%w: %s message of %d bytes exceeds MaxMessage (%d)", ErrTooLarge, f.Type, len(f.Payload), MaxMessage)
	}
	switch f.Type {
	case TypeHello:
		return DecodeHello(f.Payload)
	case TypeRAMPages:
		return DecodeRAMPages(f.Payload)
	case TypeDeviceState:
		return DecodeDeviceState(f.Payload)
	case TypeCommit:
		return DecodeCommit(f.Payload)
	case TypeAck:
		return DecodeAck(f.Payload)
	case TypeHeartbeat:
		return DecodeHeartbeat(f.Payload)
	case TypeError:
		return DecodeError(f.Payload)
	case TypeDiskWrite:
		return DecodeDiskWrite(f.Payload)
	case TypeRAMDelta:
		return DecodeRAMDelta(f.Payload)
	case TypeAuth:
		return DecodeAuth(f.Payload)
	case TypeDeviceStateZ:
		m, err := DecodeDeviceState(f.Payload)
		return DeviceStateZ{m}, err
	}
	return nil, fmt.Errorf("%w: unknown frame type %d", ErrUnsupported, uint8(f.Type))
}

func malformed(t Type, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrMalformed, t, fmt.Sprintf(format, args...))
}

func tooLarge(t Type, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrTooLarge, t, fmt.Sprintf(format, args...))
}

func wantLen(t Type, p []byte, n int) error {
	if len(p) != n {
		return malformed(t, "payload is %d bytes, want %d", len(p), n)
	}
	return nil
}

// Role is which side of the protection an agent is.
type Role uint8

// Roles. The numbers are the protocol: append only.
const (
	// RolePrimary runs the VM and sends epochs.
	RolePrimary Role = 1
	// RoleBackup stages and applies epochs, and takes over if the primary
	// dies.
	RoleBackup Role = 2
)

// String returns "primary", "backup" or "Role(n)".
func (r Role) String() string {
	switch r {
	case RolePrimary:
		return "primary"
	case RoleBackup:
		return "backup"
	}
	return fmt.Sprintf("Role(%d)", uint8(r))
}

// Hello is the first frame in each direction (epoch 0): who the sender is
// and what it holds, so each side can check it is talking about the same VM.
//
// Payload: version u8 | role u8 | name length u8 | name | RAM size u64 |
// page size u32 | last committed u64 | disk size u64.
type Hello struct {
	// Version is the newest protocol version the sender speaks; the
	// connection uses the older of the two sides' versions.
	Version uint8
	// Role is the sender's role.
	Role Role
	// VMName names the protected VM: 1..MaxVMName bytes of UTF-8.
	VMName string
	// RAMSize is the guest RAM size in bytes, a multiple of PageSize.
	RAMSize uint64
	// PageSize is the sender's page size, a power of two; both sides must
	// agree on it (this version uses PageSize).
	PageSize uint32
	// LastCommitted is the newest epoch the sender knows committed, 0 for
	// none.
	LastCommitted uint64
	// DiskSize is the size in bytes of the disk the primary mirrors, or of
	// the backup's disk image; 0 for none. Both sides must agree.
	DiskSize uint64
}

// Type returns TypeHello.
func (Hello) Type() Type { return TypeHello }

func (m Hello) validate() error {
	switch {
	case m.Version == 0:
		return malformed(TypeHello, "version 0")
	case m.Role != RolePrimary && m.Role != RoleBackup:
		return malformed(TypeHello, "unknown role %d", uint8(m.Role))
	case m.VMName == "":
		return malformed(TypeHello, "empty VM name")
	case len(m.VMName) > MaxVMName:
		return tooLarge(TypeHello, "VM name is %d bytes, max %d", len(m.VMName), MaxVMName)
	case !utf8.ValidString(m.VMName):
		return malformed(TypeHello, "VM name %q is not UTF-8", m.VMName)
	case m.PageSize == 0 || bits.OnesCount32(m.PageSize) != 1:
		return malformed(TypeHello, "page size %d is not a power of two", m.PageSize)
	case m.RAMSize == 0 || m.RAMSize%uint64(m.PageSize) != 0:
		return malformed(TypeHello, "RAM size %d is not a positive multiple of the page size %d", m.RAMSize, m.PageSize)
	}
	return nil
}

// AppendPayload implements Message.
func (m Hello) AppendPayload(dst []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return dst, err
	}
	dst = append(dst, m.Version, byte(m.Role), byte(len(m.VMName)))
	dst = append(dst, m.VMName...)
	dst = binary.BigEndian.AppendUint64(dst, m.RAMSize)
	dst = binary.BigEndian.AppendUint32(dst, m.PageSize)
	dst = binary.BigEndian.AppendUint64(dst, m.LastCommitted)
	dst = binary.BigEndian.AppendUint64(dst, m.DiskSize)
	return dst, nil
}

// DecodeHello decodes a Hello payload.
func DecodeHello(p []byte) (Hello, error) {
	if len(p) < 3 {
		return Hello{}, malformed(TypeHello, "payload is %d bytes, want at least %d", len(p), helloFixed+1)
	}
	if err := wantLen(TypeHello, p, helloFixed+int(p[2])); err != nil {
		return Hello{}, err
	}
	name := p[3 : 3+int(p[2])]
	rest := p[3+len(name):]
	m := Hello{
		Version:       p[0],
		Role:          Role(p[1]),
		VMName:        string(name),
		RAMSize:       binary.BigEndian.Uint64(rest),
		PageSize:      binary.BigEndian.Uint32(rest[8:]),
		LastCommitted: binary.BigEndian.Uint64(rest[12:]),
		DiskSize:      binary.BigEndian.Uint64(rest[20:]),
	}
	if err := m.validate(); err != nil {
		return Hello{}, err
	}
	return m, nil
}

// Page is one guest page.
type Page struct {
	// Index is the guest page frame number: the page's offset in guest
	// RAM divided by PageSize.
	Index uint64
	// Data is the page's content, exactly PageSize bytes.
	Data []byte
}

// RAMPages carries 1..MaxPagesPerFrame pages of an epoch, in strictly
// ascending index order.
//
// Payload: count u16 | count × index u64 | count × PageSize bytes of data,
// in the same order.
type RAMPages struct {
	Pages []Page
}

// Type returns TypeRAMPages.
func (RAMPages) Type() Type { return TypeRAMPages }

func (m RAMPages) validate() error {
	if len(m.Pages) == 0 {
		return malformed(TypeRAMPages, "no pages")
	}
	if len(m.Pages) > MaxPagesPerFrame {
		return tooLarge(TypeRAMPages, "%d pages, max %d", len(m.Pages), MaxPagesPerFrame)
	}
	for i, pg := range m.Pages {
		if len(pg.Data) != PageSize {
			return malformed(TypeRAMPages, "page %d (index %d) has %d bytes, want %d", i, pg.Index, len(pg.Data), PageSize)
		}
		if pg.Index > MaxPageIndex {
			return malformed(TypeRAMPages, "page index %d beyond the 64-bit address space", pg.Index)
		}
		if i > 0 && pg.Index <= m.Pages[i-1].Index {
			return malformed(TypeRAMPages, "page index %d after %d: indexes must ascend", pg.Index, m.Pages[i-1].Index)
		}
	}
	return nil
}

// AppendPayload implements Message.
func (m RAMPages) AppendPayload(dst []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(m.Pages)))
	for _, pg := range m.Pages {
		dst = binary.BigEndian.AppendUint64(dst, pg.Index)
	}
	for _, pg := range m.Pages {
		dst = append(dst, pg.Data...)
	}
	return dst, nil
}

// DecodeRAMPages decodes a RAMPages payload. The pages' Data alias p.
func DecodeRAMPages(p []byte) (RAMPages, error) {
	if len(p) < 2 {
		return RAMPages{}, malformed(TypeRAMPages, "payload is %d bytes, want at least 2", len(p))
	}
	n := int(binary.BigEndian.Uint16(p))
	if n > MaxPagesPerFrame {
		return RAMPages{}, tooLarge(TypeRAMPages, "%d pages, max %d", n, MaxPagesPerFrame)
	}
	if err := wantLen(TypeRAMPages, p, 2+n*pageEntry); err != nil {
		return RAMPages{}, err
	}
	m := RAMPages{Pages: make([]Page, n)}
	data := p[2+8*n:]
	for i := range m.Pages {
		m.Pages[i] = Page{
			Index: binary.BigEndian.Uint64(p[2+8*i:]),
			Data:  data[i*PageSize : (i+1)*PageSize : (i+1)*PageSize],
		}
	}
	if err := m.validate(); err != nil {
		return RAMPages{}, err
	}
	return m, nil
}

// DeviceState carries one chunk of an epoch's device state (the QEMU
// device-state blob). A device state of up to MaxDeviceChunk bytes goes in
// one frame (Offset 0, Total = len(Data)); a larger one is split into
// chunks sent in offset order, each carrying the same Total (see
// ChunkDeviceState). Every chunk holds at least one byte; an epoch with an
// empty device state sends no DeviceState frame.
//
// Payload: offset u32 | total u32 | data.
type DeviceState struct {
	// Offset is where Data starts in the whole device state.
	Offset uint32
	// Total is the length of the whole device state, 1..MaxDeviceState.
	Total uint32
	// Data is 1..MaxDeviceChunk bytes, ending at or before Total.
	Data []byte
}

// Type returns TypeDeviceState.
func (DeviceState) Type() Type { return TypeDeviceState }

func (m DeviceState) validate() error {
	switch {
	case m.Total > MaxDeviceState:
		return tooLarge(TypeDeviceState, "total %d bytes, max %d", m.Total, MaxDeviceState)
	case len(m.Data) > MaxDeviceChunk:
		return tooLarge(TypeDeviceState, "chunk of %d bytes, max %d", len(m.Data), MaxDeviceChunk)
	case len(m.Data) == 0:
		return malformed(TypeDeviceState, "empty chunk")
	case uint64(m.Offset)+uint64(len(m.Data)) > uint64(m.Total):
		return malformed(TypeDeviceState, "chunk %d+%d ends beyond total %d", m.Offset, len(m.Data), m.Total)
	}
	return nil
}

// AppendPayload implements Message.
func (m DeviceState) AppendPayload(dst []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint32(dst, m.Offset)
	dst = binary.BigEndian.AppendUint32(dst, m.Total)
	return append(dst, m.Data...), nil
}

// DecodeDeviceState decodes a DeviceState payload. Data aliases p.
func DecodeDeviceState(p []byte) (DeviceState, error) {
	if len(p) < deviceStateHeader {
		return DeviceState{}, malformed(TypeDeviceState, "payload is %d bytes, want at least %d", len(p), deviceStateHeader+1)
	}
	m := DeviceState{
		Offset: binary.BigEndian.Uint32(p),
		Total:  binary.BigEndian.Uint32(p[4:]),
		Data:   p[deviceStateHeader:len(p):len(p)],
	}
	if err := m.validate(); err != nil {
		return DeviceState{}, err
	}
	return m, nil
}

// ChunkDeviceState splits a device state into the DeviceState messages that
// carry it: none for an empty one, one for up to MaxDeviceChunk bytes. The
// chunks' Data alias data.
func ChunkDeviceState(data []byte) ([]DeviceState, error) {
	if len(data) > MaxDeviceState {
		return nil, tooLarge(TypeDeviceState, "device state of %d bytes, max %d", len(data), MaxDeviceState)
	}
	var out []DeviceState
	for off := 0; off < len(data); off += MaxDeviceChunk {
		end := min(off+MaxDeviceChunk, len(data))
		out = append(out, DeviceState{Offset: uint32(off), Total: uint32(len(data)), Data: data[off:end:end]})
	}
	return out, nil
}

// Commit ends an epoch (the one in the frame header): what the sender sent
// for it, so that the backup can tell it has the whole epoch before applying
// it.
//
// Payload: page count u64 | device state length u64 | digest u32.
type Commit struct {
	// PageCount is the number of pages sent in the epoch's RAMPages (or
	// RAMDelta) frames.
	PageCount uint64
	// DeviceStateLen is the length of the epoch's device state.
	DeviceStateLen uint64
	// Digest is the CRC32C of the epoch's content in send order; see
	// Digest.
	Digest uint32
}

// Type returns TypeCommit.
func (Commit) Type() Type { return TypeCommit }

func (m Commit) validate() error {
	if m.DeviceStateLen > MaxDeviceState {
		return tooLarge(TypeCommit, "device state of %d bytes, max %d", m.DeviceStateLen, MaxDeviceState)
	}
	return nil
}

// AppendPayload implements Message.
func (m Commit) AppendPayload(dst []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint64(dst, m.PageCount)
	dst = binary.BigEndian.AppendUint64(dst, m.DeviceStateLen)
	return binary.BigEndian.AppendUint32(dst, m.Digest), nil
}

// DecodeCommit decodes a Commit payload.
func DecodeCommit(p []byte) (Commit, error) {
	if err := wantLen(TypeCommit, p, commitSize); err != nil {
		return Commit{}, err
	}
	m := Commit{
		PageCount:      binary.BigEndian.Uint64(p),
		DeviceStateLen: binary.BigEndian.Uint64(p[8:]),
		Digest:         binary.BigEndian.Uint32(p[16:]),
	}
	if err := m.validate(); err != nil {
		return Commit{}, err
	}
	return m, nil
}

// Ack tells the primary that the backup verified and applied the epoch in
// the frame header. Its payload is empty.
type Ack struct{}

// Type returns TypeAck.
func (Ack) Type() Type { return TypeAck }

// AppendPayload implements Message.
func (Ack) AppendPayload(dst []byte) ([]byte, error) { return dst, nil }

// DecodeAck decodes an Ack payload, which must be empty.
func DecodeAck(p []byte) (Ack, error) {
	return Ack{}, wantLen(TypeAck, p, 0)
}

// Heartbeat shows that the sender is alive (epoch 0 in the header).
//
// Payload: sent time i64 (Unix nanoseconds) | last committed u64.
type Heartbeat struct {
	// SentUnixNano is the sender's clock when it sent the heartbeat, for
	// round-trip measurement; the receiver must not compare it with its
	// own clock.
	SentUnixNano int64
	// LastCommitted is the newest epoch the sender knows committed.
	LastCommitted uint64
}

// Type returns TypeHeartbeat.
func (Heartbeat) Type() Type { return TypeHeartbeat }

// AppendPayload implements Message.
func (m Heartbeat) AppendPayload(dst []byte) ([]byte, error) {
	dst = binary.BigEndian.AppendUint64(dst, uint64(m.SentUnixNano))
	return binary.BigEndian.AppendUint64(dst, m.LastCommitted), nil
}

// DecodeHeartbeat decodes a Heartbeat payload.
func DecodeHeartbeat(p []byte) (Heartbeat, error) {
	if err := wantLen(TypeHeartbeat, p, heartbeatSize); err != nil {
		return Heartbeat{}, err
	}
	return Heartbeat{
		SentUnixNano:  int64(binary.BigEndian.Uint64(p)),
		LastCommitted: binary.BigEndian.Uint64(p[8:]),
	}, nil
}

// ErrorCode classifies an Error message.
type ErrorCode uint16

// Error codes. The numbers are the protocol: append only. A decoder accepts
// codes it does not know (a newer peer may send them), but not 0.
const (
	// CodeProtocol: the peer sent a frame that is malformed or unexpected
	// at this point.
	CodeProtocol ErrorCode = 1
	// CodeVersion: no protocol version both sides speak.
	CodeVersion ErrorCode = 2
	// CodeMismatch: the Hellos disagree (VM name, RAM size, page size,
	// committed epoch).
	CodeMismatch ErrorCode = 3
	// CodeEpoch: an epoch failed to verify on the backup and was
	// discarded.
	CodeEpoch ErrorCode = 4
	// CodeInternal: the sender failed for reasons of its own.
	CodeInternal ErrorCode = 5
	// CodeGoodbye: a planned end of the session. From the primary: the
	// session ends and its guest runs on, so the backup must not resume
	// it. From the backup: the confirmation of the primary's goodbye (it
	// will not resume the guest), or its own planned end.
	CodeGoodbye ErrorCode = 6
	// CodeTakeOver: from the primary: its guest is gone for good (killed
	// after it could not be checkpointed or resumed); the backup is to
	// resume its last committed epoch at once.
	CodeTakeOver ErrorCode = 7
	// CodeFailedOver: from the backup: it already resumed the guest, so
	// the primary's copy must not run.
	CodeFailedOver ErrorCode = 8
)

// String returns the code's name, or "ErrorCode(n)" for an unknown one.
func (c ErrorCode) String() string {
	switch c {
	case CodeProtocol:
		return "protocol"
	case CodeVersion:
		return "version"
	case CodeMismatch:
		return "mismatch"
	case CodeEpoch:
		return "epoch"
	case CodeInternal:
		return "internal"
	case CodeGoodbye:
		return "goodbye"
	case CodeTakeOver:
		return "takeover"
	case CodeFailedOver:
		return "failed-over"
	}
	return fmt.Sprintf("ErrorCode(%d)", uint16(c))
}

// Error reports a failure to the peer, usually just before closing the
// connection. The frame's epoch is the epoch concerned, or 0.
//
// Payload: code u16 | message length u16 | message.
type Error struct {
	// Code classifies the failure.
	Code ErrorCode
	// Message is up to MaxErrorMessage bytes of UTF-8 for humans.
	Message string
}

// Type returns TypeError.
func (Error) Type() Type { return TypeError }

func (m Error) validate() error {
	switch {
	case m.Code == 0:
		return malformed(TypeError, "code 0")
	case len(m.Message) > MaxErrorMessage:
		return tooLarge(TypeError, "message of %d bytes, max %d", len(m.Message), MaxErrorMessage)
	case !utf8.ValidString(m.Message):
		return malformed(TypeError, "message %q is not UTF-8", m.Message)
	}
	return nil
}

// AppendPayload implements Message.
func (m Error) AppendPayload(dst []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(m.Code))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(m.Message)))
	return append(dst, m.Message...), nil
}

// DecodeError decodes an Error payload.
func DecodeError(p []byte) (Error, error) {
	if len(p) < 4 {
		return Error{}, malformed(TypeError, "payload is %d bytes, want at least 4", len(p))
	}
	n := int(binary.BigEndian.Uint16(p[2:]))
	if n > MaxErrorMessage {
		return Error{}, tooLarge(TypeError, "message of %d bytes, max %d", n, MaxErrorMessage)
	}
	if err := wantLen(TypeError, p, 4+n); err != nil {
		return Error{}, err
	}
	m := Error{Code: ErrorCode(binary.BigEndian.Uint16(p)), Message: string(p[4:])}
	if err := m.validate(); err != nil {
		return Error{}, err
	}
	return m, nil
}

// Digest accumulates what a Commit says about an epoch: the page count, the
// device state length, and the CRC32C of the content in send order, where
// each page contributes its index (u64, big-endian) then its data, and each
// device state chunk its data. The primary feeds it what it sends, the
// backup (Stage) what it receives. The zero value is an empty epoch.
type Digest struct {
	crc   uint32
	pages uint64
	dev   uint64
	disk  uint64  // disk writes added
	idx   [8]byte // scratch for AddPage
}

// AddPages adds the pages of a RAMPages message, in order.
func (d *Digest) AddPages(m RAMPages) {
	for _, pg := range m.Pages {
		d.AddPage(pg)
	}
}

// AddPage adds one page.
func (d *Digest) AddPage(pg Page) {
	binary.BigEndian.PutUint64(d.idx[:], pg.Index)
	d.crc = crc32.Update(d.crc, castagnoli, d.idx[:])
	d.crc = crc32.Update(d.crc, castagnoli, pg.Data)
	d.pages++
}

// AddDeviceState adds a chunk of device state.
func (d *Digest) AddDeviceState(data []byte) {
	d.crc = crc32.Update(d.crc, castagnoli, data)
	d.dev += uint64(len(data))
}

// Commit returns the Commit message for what was added.
func (d *Digest) Commit() Commit {
	return Commit{PageCount: d.pages, DeviceStateLen: d.dev, Digest: d.crc}
}

// Reset empties d for the next epoch.
func (d *Digest) Reset() { *d = Digest{} }

package diskmirror

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The NBD protocol as QEMU's NBD client speaks it to a mirror target
// (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): the
// fixed newstyle handshake, the options to pick an export, and the
// transmission phase with simple replies. This file holds the whole wire
// format: constants, encoders and decoders.

// Magic numbers.
const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic      = 0x49484156454f5054 // "IHAVEOPT"
	nbdOptReplyMagic = 0x0003e889045565a9
	nbdRequestMagic  = 0x25609513
	nbdReplyMagic    = 0x67446698 // simple reply
)

// Handshake flags.
const (
	nbdFlagFixedNewstyle = 1 << 0
	nbdFlagNoZeroes      = 1 << 1
	nbdFlagCFixed        = 1 << 0 // client flags
	nbdFlagCNoZeroes     = 1 << 1
)

// Options (client to server, in the handshake).
const (
	nbdOptExportName      = 1
	nbdOptAbort           = 2
	nbdOptList            = 3
	nbdOptInfo            = 6
	nbdOptGo              = 7
	nbdOptStructuredReply = 8
)

// Option replies.
const (
	nbdRepAck         = 1
	nbdRepServer      = 2
	nbdRepInfo        = 3
	nbdRepErrUnsup    = 1<<31 | 1
	nbdRepErrInvalid  = 1<<31 | 3
	nbdRepErrUnknown  = 1<<31 | 6
	nbdInfoExport     = 0
	nbdInfoBlockSize  = 3
	maxOptionDataSize = 64 << 10
)

// Transmission flags of the export.
const (
	nbdFlagHasFlags        = 1 << 0
	nbdFlagSendFlush       = 1 << 2
	nbdFlagSendFUA         = 1 << 3
	nbdFlagSendTrim        = 1 << 5
	nbdFlagSendWriteZeroes = 1 << 6
	nbdFlagCanMultiConn    = 1 << 8
)

// Command types.
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdWriteZeroes = 6
)

// Command flags.
const (
	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
)

// Error values of replies (errno values as NBD defines them).
const (
	nbdEIO    = 5
	nbdEINVAL = 22
	nbdENOSPC = 28
)

// MaxRequestLength bounds the data of one WRITE or READ: 32 MiB (2^25).
// QEMU's NBD client caps every data request, so every write its mirror
// sends, at the smaller of its NBD_MAX_BUFFER_SIZE (32 MiB) and the maximum
// the export advertises (this, in NBD_INFO_BLOCK_SIZE); the NBD spec asks
// servers not to take a payload up to 2^25 bytes for a denial of service.
// A longer request is a protocol error that ends the connection before
// anything is allocated for it. WRITE_ZEROES and TRIM carry no data, so
// their length (QEMU sends discards of up to about 2 GiB) costs nothing.
const MaxRequestLength = 32 << 20

// requestSize is the size of a request header.
const requestSize = 28

// Request is one transmission-phase request.
type Request struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// ErrProtocol marks a peer that does not speak NBD as it should.
var ErrProtocol = errors.New("diskmirror: NBD protocol error")

// DecodeRequest decodes a request header. It checks the magic, the type and
// that the range does not overflow; whether it fits the export is the
// server's business.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) < requestSize {
		return Request{}, fmt.Errorf("%w: request of %d bytes, want %d", ErrProtocol, len(b), requestSize)
	}
	if m := binary.BigEndian.Uint32(b); m != nbdRequestMagic {
		return Request{}, fmt.Errorf("%w: request magic %#x", ErrProtocol, m)
	}
	r := Request{
		Flags:  binary.BigEndian.Uint16(b[4:]),
		Type:   binary.BigEndian.Uint16(b[6:]),
		Handle: binary.BigEndian.Uint64(b[8:]),
		Offset: binary.BigEndian.Uint64(b[16:]),
		Length: binary.BigEndian.Uint32(b[24:]),
	}
	switch r.Type {
	case CmdRead, CmdWrite, CmdDisc, CmdFlush, CmdTrim, CmdWriteZeroes:
	default:
		return Request{}, fmt.Errorf("%w: unknown command %d", ErrProtocol, r.Type)
	}
	if r.Offset+uint64(r.Length) < r.Offset {
		return Request{}, fmt.Errorf("%w: range %d+%d overflows", ErrProtocol, r.Offset, r.Length)
	}
	if (r.Type == CmdWrite || r.Type == CmdRead) && r.Length > MaxRequestLength {
		return Request{}, fmt.Errorf("%w: %d bytes in one request, at most %d", ErrProtocol, r.Length, MaxRequestLength)
	}
	return r, nil
}

// Encode returns the request header (for tests and clients).
func (r Request) Encode() []byte {
	b := make([]byte, requestSize)
	binary.BigEndian.PutUint32(b, nbdRequestMagic)
	binary.BigEndian.PutUint16(b[4:], r.Flags)
	binary.BigEndian.PutUint16(b[6:], r.Type)
	binary.BigEndian.PutUint64(b[8:], r.Handle)
	binary.BigEndian.PutUint64(b[16:], r.Offset)
	binary.BigEndian.PutUint32(b[24:], r.Length)
	return b
}

// appendReply appends a simple reply header.
func appendReply(b []byte, errno uint32, handle uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, nbdReplyMagic)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, handle)
}

// option is one option the client sent in the handshake.
type option struct {
	code uint32
	data []byte
}

// readOption reads an option header and its data.
func readOption(r io.Reader) (option, error) {
	var h [16]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return option{}, err
	}
	if m := binary.BigEndian.Uint64(h[:]); m != nbdOptMagic {
		return option{}, fmt.Errorf("%w: option magic %#x", ErrProtocol, m)
	}
	o := option{code: binary.BigEndian.Uint32(h[8:])}
	n := binary.BigEndian.Uint32(h[12:])
	if n > maxOptionDataSize {
		return option{}, fmt.Errorf("%w: option %d with %d bytes of data", ErrProtocol, o.code, n)
	}
	o.data = make([]byte, n)
	if _, err := io.ReadFull(r, o.data); err != nil {
		return option{}, err
	}
	return o, nil
}

// appendOptionReply appends an option reply.
func appendOptionReply(b []byte, opt, typ uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, nbdOptReplyMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// goRequest is the data of NBD_OPT_GO and NBD_OPT_INFO: the export name and
// the information requests.
type goRequest struct {
	name  string
	infos []uint16
}

func decodeGo(data []byte) (goRequest, error) {
	if len(data) < 4 {
		return goRequest{}, fmt.Errorf("%w: NBD_OPT_GO data of %d bytes", ErrProtocol, len(data))
	}
	n := binary.BigEndian.Uint32(data)
	if uint64(n)+6 > uint64(len(data)) {
		return goRequest{}, fmt.Errorf("%w: NBD_OPT_GO export name of %d bytes in %d", ErrProtocol, n, len(data))
	}
	g := goRequest{name: string(data[4 : 4+n])}
	rest := data[4+n:]
	count := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return goRequest{}, fmt.Errorf("%w: NBD_OPT_GO announces %d information requests in %d bytes", ErrProtocol, count, len(rest))
	}
	for i := range count {
		g.infos = append(g.infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return g, nil
}

// exportInfo is NBD_INFO_EXPORT: size and transmission flags.
func exportInfo(size uint64, flags uint16) []byte {
	b := binary.BigEndian.AppendUint16(nil, nbdInfoExport)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

// blockSizeInfo is NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum.
func blockSizeInfo(min, preferred, max uint32) []byte {
	b := binary.BigEndian.AppendUint16(nil, nbdInfoBlockSize)
	b = binary.BigEndian.AppendUint32(b, min)
	b = binary.BigEndian.AppendUint32(b, preferred)
	return binary.BigEndian.AppendUint32(b, max)
}

package transport

import (
	"encoding/binary"
	"hash/crc32"
)

// MaxDiskChunk caps the data of one DiskWrite frame: 1 MiB. Longer writes
// go in several frames.
const MaxDiskChunk = 1 << 20

// MaxZeroLength caps the length of one zero write: 1 GiB.
const MaxZeroLength = 1 << 30

// diskWriteHeader is the size of the DiskWrite fields before the data.
const diskWriteHeader = 13

// Flags of a DiskWrite. The numbers are the protocol: append only.
const (
	// DiskZero: Length bytes of zeroes at Offset; no data follows.
	DiskZero uint8 = 1 << 0
)

// DiskWrite is one guest disk write of an epoch (or, in epoch 0, of the
// initial copy, applied at once).
//
// Payload: offset u64 | length u32 | flags u8 | data (length bytes, none
// with DiskZero).
type DiskWrite struct {
	Offset uint64
	Length uint32
	Flags  uint8
	Data   []byte
}

// Type returns TypeDiskWrite.
func (DiskWrite) Type() Type { return TypeDiskWrite }

func (m DiskWrite) validate() error {
	switch {
	case m.Flags&^DiskZero != 0:
		return malformed(TypeDiskWrite, "unknown flags %#x", m.Flags)
	case m.Length == 0:
		return malformed(TypeDiskWrite, "empty write")
	case m.Offset+uint64(m.Length) < m.Offset:
		return malformed(TypeDiskWrite, "range %d+%d overflows", m.Offset, m.Length)
	case m.Flags&DiskZero != 0 && len(m.Data) != 0:
		return malformed(TypeDiskWrite, "zero write with %d bytes of data", len(m.Data))
	case m.Flags&DiskZero != 0 && m.Length > MaxZeroLength:
		return tooLarge(TypeDiskWrite, "zero write of %d bytes, max %d", m.Length, MaxZeroLength)
	case m.Flags&DiskZero == 0 && len(m.Data) != int(m.Length):
		return malformed(TypeDiskWrite, "length %d with %d bytes of data", m.Length, len(m.Data))
	case len(m.Data) > MaxDiskChunk:
		return tooLarge(TypeDiskWrite, "%d bytes of data, max %d", len(m.Data), MaxDiskChunk)
	}
	return nil
}

// AppendPayload implements Message.
func (m DiskWrite) AppendPayload(dst []byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint64(dst, m.Offset)
	dst = binary.BigEndian.AppendUint32(dst, m.Length)
	dst = append(dst, m.Flags)
	return append(dst, m.Data...), nil
}

// DecodeDiskWrite decodes a DiskWrite payload. Data aliases p.
func DecodeDiskWrite(p []byte) (DiskWrite, error) {
	if len(p) < diskWriteHeader {
		return DiskWrite{}, malformed(TypeDiskWrite, "payload is %d bytes, want at least %d", len(p), diskWriteHeader)
	}
	m := DiskWrite{
		Offset: binary.BigEndian.Uint64(p),
		Length: binary.BigEndian.Uint32(p[8:]),
		Flags:  p[12],
	}
	if len(p) > diskWriteHeader {
		m.Data = p[diskWriteHeader:len(p):len(p)]
	}
	if err := m.validate(); err != nil {
		return DiskWrite{}, err
	}
	return m, nil
}

// ChunkDiskWrite splits a write of data at offset into DiskWrite messages
// of at most MaxDiskChunk bytes; their Data alias data.
func ChunkDiskWrite(offset uint64, data []byte) []DiskWrite {
	var out []DiskWrite
	for len(data) > 0 {
		n := min(len(data), MaxDiskChunk)
		out = append(out, DiskWrite{Offset: offset, Length: uint32(n), Data: data[:n]})
		offset += uint64(n)
		data = data[n:]
	}
	return out
}

// AddDiskWrite adds a disk write to the digest.
func (d *Digest) AddDiskWrite(m DiskWrite) {
	var h [diskWriteHeader]byte
	binary.BigEndian.PutUint64(h[:], m.Offset)
	binary.BigEndian.PutUint32(h[8:], m.Length)
	h[12] = m.Flags
	d.crc = crc32.Update(d.crc, castagnoli, h[:])
	d.crc = crc32.Update(d.crc, castagnoli, m.Data)
	d.disk++
}

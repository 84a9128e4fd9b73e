package diskmirror

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
)

// Write is one guest write as the mirror target received it: Data, or
// Length zero bytes (WRITE_ZEROES, and TRIM, which the target may apply as
// zeroes) when Zero is set.
type Write struct {
	Offset uint64
	Length uint32
	Zero   bool
	Data   []byte
}

// End is the offset just past the write.
func (w Write) End() uint64 { return w.Offset + uint64(w.Length) }

// Sink takes the writes the mirror target receives. QEMU's mirror in
// write-blocking mode completes a guest write only after its copy reached
// the target, that is after Write returned: what Write keeps is what the
// guest wrote. The Server calls it from one goroutine.
type Sink interface {
	Write(ctx context.Context, w Write) error
}

// ExportName is the name the Server gives its export.
const ExportName = "remus"

// Server is an NBD server with one write-only export of a fixed size: the
// target of QEMU's blockdev-mirror. Writes go to its Sink; reads are
// refused (a mirror never reads its target). It serves one client at a
// time. Hand-written: no Go NBD server library is available here, and the
// part a mirror target needs is small.
type Server struct {
	Size uint64
	Sink Sink
	Log  *slog.Logger

	mu    sync.Mutex
	stats ServerStats
}

// ServerStats counts what the Server received.
type ServerStats struct {
	Writes, Zeroes, Flushes uint64
	Bytes                   uint64 // data bytes written, zeroes included
}

// Stats returns the counts so far.
func (s *Server) Stats() ServerStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// Serve accepts clients on ln, one after the other, until ctx ends or ln
// fails. It closes ln when ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("diskmirror: accept: %w", err)
		}
		err = s.ServeConn(ctx, c)
		if err != nil && ctx.Err() == nil && s.Log != nil {
			s.Log.Warn("NBD client session ended", "err", err)
		}
	}
}

// ServeConn runs the handshake and the transmission phase on c until the
// client disconnects, ctx ends or the client breaks the protocol; it closes
// c. A clean NBD_CMD_DISC returns nil.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	r := bufio.NewReaderSize(c, 256<<10)
	aborted, err := s.handshake(r, c)
	if err != nil {
		return fmt.Errorf("diskmirror: handshake: %w", err)
	}
	if aborted {
		return nil
	}
	return s.transmit(ctx, r, c)
}

// transmissionFlags is what the export supports.
const transmissionFlags = nbdFlagHasFlags | nbdFlagSendFlush | nbdFlagSendFUA | nbdFlagSendTrim | nbdFlagSendWriteZeroes

// handshake runs the fixed newstyle negotiation until the client picks the
// export or aborts.
func (s *Server) handshake(r *bufio.Reader, w io.Writer) (aborted bool, err error) {
	hello := binary.BigEndian.AppendUint64(nil, nbdMagic)
	hello = binary.BigEndian.AppendUint64(hello, nbdOptMagic)
	hello = binary.BigEndian.AppendUint16(hello, nbdFlagFixedNewstyle|nbdFlagNoZeroes)
	if _, err := w.Write(hello); err != nil {
		return false, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(r, cf[:]); err != nil {
		return false, err
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&nbdFlagCFixed == 0 {
		return false, fmt.Errorf("%w: client does not speak fixed newstyle (flags %#x)", ErrProtocol, clientFlags)
	}
	for {
		o, err := readOption(r)
		if err != nil {
			return false, err
		}
		var out []byte
		switch o.code {
		case nbdOptExportName:
			// The old way to pick an export: size and flags, no reply
			// header.
			out = binary.BigEndian.AppendUint64(nil, s.Size)
			out = binary.BigEndian.AppendUint16(out, transmissionFlags)
			if clientFlags&nbdFlagCNoZeroes == 0 {
				out = append(out, make([]byte, 124)...)
			}
			_, err := w.Write(out)
			return false, err
		case nbdOptGo, nbdOptInfo:
			g, err := decodeGo(o.data)
			if err != nil {
				out = appendOptionReply(nil, o.code, nbdRepErrInvalid, nil)
				break
			}
			if g.name != ExportName && g.name != "" {
				out = appendOptionReply(nil, o.code, nbdRepErrUnknown, []byte("no such export"))
				break
			}
			out = appendOptionReply(nil, o.code, nbdRepInfo, exportInfo(s.Size, transmissionFlags))
			out = appendOptionReply(out, o.code, nbdRepInfo, blockSizeInfo(1, 4096, MaxRequestLength))
			out = appendOptionReply(out, o.code, nbdRepAck, nil)
			if o.code == nbdOptGo {
				_, err := w.Write(out)
				return false, err
			}
		case nbdOptList:
			name := binary.BigEndian.AppendUint32(nil, uint32(len(ExportName)))
			out = appendOptionReply(nil, o.code, nbdRepServer, append(name, ExportName...))
			out = appendOptionReply(out, o.code, nbdRepAck, nil)
		case nbdOptAbort:
			w.Write(appendOptionReply(nil, o.code, nbdRepAck, nil))
			return true, nil
		default:
			// Structured replies, metadata contexts, TLS, extended
			// headers: not offered, so the client uses simple replies.
			out = appendOptionReply(nil, o.code, nbdRepErrUnsup, nil)
		}
		if _, err := w.Write(out); err != nil {
			return false, err
		}
	}
}

// transmit serves requests until NBD_CMD_DISC or an error.
func (s *Server) transmit(ctx context.Context, r *bufio.Reader, w io.Writer) error {
	var hdr [requestSize]byte
	var reply []byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("diskmirror: client went away without NBD_CMD_DISC: %w", err)
			}
			return fmt.Errorf("diskmirror: read request: %w", err)
		}
		req, err := DecodeRequest(hdr[:])
		if err != nil {
			return err
		}
		errno := s.rangeErrno(req)
		switch req.Type {
		case CmdDisc:
			return nil
		case CmdRead:
			errno = nbdEINVAL // a mirror target is never read
		case CmdFlush:
			errno = 0 // offset and length are not used
			s.count(func(st *ServerStats) { st.Flushes++ })
		case CmdWrite:
			if errno != 0 {
				// Skip the data without keeping it: the stream stays in
				// step and the request is answered.
				if _, err := io.CopyN(io.Discard, r, int64(req.Length)); err != nil {
					return fmt.Errorf("diskmirror: skip %d bytes of write data: %w", req.Length, err)
				}
				break
			}
			data := make([]byte, req.Length) // at most MaxRequestLength (DecodeRequest)
			if _, err := io.ReadFull(r, data); err != nil {
				return fmt.Errorf("diskmirror: read %d bytes of write data: %w", req.Length, err)
			}
			errno = s.write(ctx, Write{Offset: req.Offset, Length: req.Length, Data: data})
		case CmdWriteZeroes, CmdTrim:
			if errno == 0 {
				errno = s.write(ctx, Write{Offset: req.Offset, Length: req.Length, Zero: true})
			}
		}
		reply = appendReply(reply[:0], errno, req.Handle)
		if _, err := w.Write(reply); err != nil {
			return fmt.Errorf("diskmirror: reply: %w", err)
		}
	}
}

// rangeErrno returns the reply's error value for a request that reaches
// beyond the export, as the NBD spec asks: ENOSPC for WRITE and
// WRITE_ZEROES, EINVAL for TRIM and READ; 0 when it fits.
func (s *Server) rangeErrno(req Request) uint32 {
	if req.Offset+uint64(req.Length) <= s.Size { // no overflow: DecodeRequest
		return 0
	}
	if s.Log != nil && req.Type != CmdFlush && req.Type != CmdDisc {
		s.Log.Warn("NBD request beyond the export refused", "command", req.Type, "offset", req.Offset, "length", req.Length, "export_size", s.Size)
	}
	switch req.Type {
	case CmdWrite, CmdWriteZeroes:
		return nbdENOSPC
	}
	return nbdEINVAL
}

// write hands a write that fits the export to the sink, returning the
// reply's error value.
func (s *Server) write(ctx context.Context, wr Write) uint32 {
	if wr.End() > s.Size {
		return nbdENOSPC // rangeErrno refused it already
	}
	if wr.Length == 0 {
		return 0
	}
	if err := s.Sink.Write(ctx, wr); err != nil {
		if s.Log != nil {
			s.Log.Error("mirror write failed", "offset", wr.Offset, "length", wr.Length, "err", err)
		}
		return nbdEIO
	}
	s.count(func(st *ServerStats) {
		if wr.Zero {
			st.Zeroes++
		} else {
			st.Writes++
		}
		st.Bytes += uint64(wr.Length)
	})
	return 0
}

func (s *Server) count(f func(*ServerStats)) {
	s.mu.Lock()
	f(&s.stats)
	s.mu.Unlock()
}

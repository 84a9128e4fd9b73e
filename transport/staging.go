package transport

import (
	"fmt"
)

// Epoch is one checkpoint's content: the pages dirtied since the previous
// epoch, in ascending index order, and the device state.
type Epoch struct {
	// Number is the epoch number, from 1.
	Number uint64
	// Pages are the epoch's pages, in ascending index order.
	Pages []Page
	// DeviceState is the QEMU device-state blob, whole.
	DeviceState []byte
	// Disk are the guest's disk writes during the epoch, in order. They go
	// first, before the pages. A Stage keeps them only with KeepDisk.
	Disk []DiskWrite
}

// Frames encodes e as the frames the primary sends for it, in order: the
// DiskWrite frames, RAMPages frames of up to MaxPagesPerFrame pages, the
// DeviceState chunks, and the Commit. Their seq is left zero for Conn.Send to assign; payloads
// are newly allocated. Senders that stream an epoch without holding it
// whole use NewFrame and a Digest instead.
func (e Epoch) Frames() ([]Frame, error) { return e.FramesWith(nil) }

// FramesWith is Frames with the pages compressed by enc (RAMDelta frames
// in place of RAMPages) when enc is not nil. The digest covers the pages
// themselves, so the backup's Commit also checks its decompression.
func (e Epoch) FramesWith(enc *DeltaEncoder) ([]Frame, error) {
	frames := make([]Frame, 0, len(e.Disk)+(len(e.Pages)+MaxPagesPerFrame-1)/MaxPagesPerFrame+2)
	err := e.EachFrame(enc, func(f Frame) error {
		frames = append(frames, f)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return frames, nil
}

// EachFrame is FramesWith one frame at a time: it hands each frame to
// yield as soon as it is made, so that a sender holds one frame of the
// epoch at a time rather than a second copy of all of it. An error from
// yield stops it and is returned.
func (e Epoch) EachFrame(enc *DeltaEncoder, yield func(Frame) error) error {
	if e.Number == 0 {
		return fmt.Errorf("%w: epoch 0 (epochs are numbered from 1)", ErrMalformed)
	}
	dev, zdev := e.DeviceState, false
	if enc != nil && len(dev) > 0 {
		if z := enc.compressDeviceState(dev); z != nil {
			dev, zdev = z, true
		}
	}
	chunks, err := ChunkDeviceState(dev)
	if err != nil {
		return fmt.Errorf("epoch %d: %w", e.Number, err)
	}
	var d Digest
	for _, w := range e.Disk {
		f, err := NewFrame(e.Number, w)
		if err != nil {
			return fmt.Errorf("epoch %d: %w", e.Number, err)
		}
		d.AddDiskWrite(w)
		if err := yield(f); err != nil {
			return err
		}
	}
	for i := 0; i < len(e.Pages); i += MaxPagesPerFrame {
		m := RAMPages{Pages: e.Pages[i:min(i+MaxPagesPerFrame, len(e.Pages))]}
		if i > 0 && m.Pages[0].Index <= e.Pages[i-1].Index {
			return fmt.Errorf("epoch %d: %w", e.Number, malformed(TypeRAMPages, "page index %d after %d: indexes must ascend", m.Pages[0].Index, e.Pages[i-1].Index))
		}
		var msg Message = m
		if enc != nil {
			dm, err := enc.Encode(m.Pages)
			if err != nil {
				return fmt.Errorf("epoch %d: %w", e.Number, err)
			}
			msg = dm
		}
		f, err := NewFrame(e.Number, msg)
		if err != nil {
			return fmt.Errorf("epoch %d: %w", e.Number, err)
		}
		d.AddPages(m)
		if err := yield(f); err != nil {
			return err
		}
	}
	for _, c := range chunks {
		var msg Message = c
		if zdev {
			msg = DeviceStateZ{c}
		}
		f, err := NewFrame(e.Number, msg)
		if err != nil {
			return fmt.Errorf("epoch %d: %w", e.Number, err)
		}
		d.AddDeviceState(c.Data)
		if err := yield(f); err != nil {
			return err
		}
	}
	f, err := NewFrame(e.Number, d.Commit())
	if err != nil {
		return fmt.Errorf("epoch %d: %w", e.Number, err)
	}
	return yield(f)
}

// Stage assembles epochs on the backup. It takes an epoch's RAMPages and
// DeviceState as they arrive and, on the Commit, checks that the counts and
// the digest match what arrived before it hands the epoch out to be
// applied. Epochs must come in order: the one staged is always the last
// committed plus one.
//
// Stage does no I/O and is not safe for concurrent use. It keeps the page
// data and device state it is given without copying them (except a device
// state that arrives in several chunks): the caller must not modify them
// afterwards. On any error the partial epoch is discarded, as by Reset;
// the caller then reports the error to the primary and waits for the epoch
// to be sent again, or closes the connection.
type Stage struct {
	// KeepDisk makes the staged Epoch carry its disk writes; without it
	// they are only checked and digested, for a caller that journals them
	// itself.
	KeepDisk bool

	ramPages  uint64 // RAM size in pages
	committed uint64

	staging  bool
	ep       Epoch
	d        Digest
	nextPage uint64 // the lowest index the next page may have
	devTotal uint64 // announced device state length, 0 if none yet
	devZ     bool   // the device state comes compressed (DeviceStateZ)
}

// NewStage returns a Stage for a VM with ramSize bytes of RAM (a positive
// multiple of PageSize) whose last committed epoch is committed (0 for
// none): the first epoch staged is committed+1.
func NewStage(ramSize, committed uint64) (*Stage, error) {
	if ramSize == 0 || ramSize%PageSize != 0 {
		return nil, fmt.Errorf("transport: stage: RAM size %d is not a positive multiple of the page size %d", ramSize, PageSize)
	}
	return &Stage{ramPages: ramSize / PageSize, committed: committed}, nil
}

// Committed returns the last epoch Commit handed out (or the one NewStage
// was given).
func (s *Stage) Committed() uint64 { return s.committed }

// Staging returns the epoch being staged, if any frame of it arrived.
func (s *Stage) Staging() (epoch uint64, ok bool) { return s.ep.Number, s.staging }

// Reset discards the partial epoch, if any. The next epoch staged is still
// Committed()+1.
func (s *Stage) Reset() {
	s.staging = false
	s.ep = Epoch{}
	s.d.Reset()
	s.nextPage = 0
	s.devTotal = 0
	s.devZ = false
}

// fail discards the partial epoch and returns the error.
func (s *Stage) fail(epoch uint64, format string, args ...any) error {
	s.Reset()
	return fmt.Errorf("%w: epoch %d: %s", ErrEpoch, epoch, fmt.Sprintf(format, args...))
}

// begin checks that a frame for epoch belongs to the epoch being staged,
// starting it if none is.
func (s *Stage) begin(epoch uint64) error {
	if s.staging {
		if epoch != s.ep.Number {
			staged := s.ep.Number
			return s.fail(epoch, "frame arrived while epoch %d is being staged", staged)
		}
		return nil
	}
	if epoch != s.committed+1 {
		return s.fail(epoch, "not the next epoch: last committed is %d", s.committed)
	}
	s.staging = true
	s.ep.Number = epoch
	return nil
}

// Add feeds a frame of the epoch being staged: DiskWrite, RAMPages,
// DeviceState or Commit. On a Commit that verifies it returns the complete epoch and true.
// Any other frame type is an error.
func (s *Stage) Add(f Frame) (Epoch, bool, error) {
	switch f.Type {
	case TypeRAMPages, TypeDeviceState, TypeDeviceStateZ, TypeCommit, TypeDiskWrite:
	default:
		s.Reset()
		return Epoch{}, false, fmt.Errorf("%w: epoch %d: a %s frame is not part of an epoch", ErrEpoch, f.Epoch, f.Type)
	}
	m, err := Decode(f)
	if err != nil {
		s.Reset()
		return Epoch{}, false, fmt.Errorf("%w: epoch %d: %w", ErrEpoch, f.Epoch, err)
	}
	switch m := m.(type) {
	case RAMPages:
		return Epoch{}, false, s.AddPages(f.Epoch, m)
	case DeviceState:
		return Epoch{}, false, s.addDeviceState(f.Epoch, m, false)
	case DeviceStateZ:
		return Epoch{}, false, s.addDeviceState(f.Epoch, m.DeviceState, true)
	case DiskWrite:
		return Epoch{}, false, s.AddDiskWrite(f.Epoch, m)
	default:
		ep, err := s.Commit(f.Epoch, m.(Commit))
		return ep, err == nil, err
	}
}

// AddPages adds pages to epoch. The pages must be within the VM's RAM and
// continue the epoch's ascending index order.
func (s *Stage) AddPages(epoch uint64, m RAMPages) error {
	if err := s.begin(epoch); err != nil {
		return err
	}
	if err := m.validate(); err != nil {
		s.Reset()
		return fmt.Errorf("%w: epoch %d: %w", ErrEpoch, epoch, err)
	}
	for _, pg := range m.Pages {
		if pg.Index >= s.ramPages {
			return s.fail(epoch, "page index %d beyond RAM (%d pages)", pg.Index, s.ramPages)
		}
		if pg.Index < s.nextPage {
			return s.fail(epoch, "page index %d after %d: indexes must ascend within an epoch", pg.Index, s.nextPage-1)
		}
		s.nextPage = pg.Index + 1
	}
	s.ep.Pages = append(s.ep.Pages, m.Pages...)
	s.d.AddPages(m)
	return nil
}

// StagedPages is the number of pages of the epoch being staged that the
// Stage holds (those TakePages has not taken).
func (s *Stage) StagedPages() int { return len(s.ep.Pages) }

// TakePages hands over the pages the Stage holds of the epoch being staged
// and forgets them, for a caller that keeps them elsewhere (in a file) to
// bound the memory an epoch takes. The epoch's count and digest still cover
// them: the Commit checks all the pages that arrived, and the Epoch it
// returns holds only those that arrived after the last TakePages.
func (s *Stage) TakePages() []Page {
	p := s.ep.Pages
	s.ep.Pages = nil
	return p
}

// AddDiskWrite adds a disk write to epoch.
func (s *Stage) AddDiskWrite(epoch uint64, m DiskWrite) error {
	if err := s.begin(epoch); err != nil {
		return err
	}
	if err := m.validate(); err != nil {
		s.Reset()
		return fmt.Errorf("%w: epoch %d: %w", ErrEpoch, epoch, err)
	}
	if s.KeepDisk {
		s.ep.Disk = append(s.ep.Disk, m)
	}
	s.d.AddDiskWrite(m)
	return nil
}

// AddDeviceState adds a device state chunk to epoch. Chunks must come in
// offset order without gaps and agree on the total.
func (s *Stage) AddDeviceState(epoch uint64, m DeviceState) error {
	return s.addDeviceState(epoch, m, false)
}

// addDeviceState adds a chunk, compressed (DeviceStateZ) or not; the chunks
// of an epoch must agree.
func (s *Stage) addDeviceState(epoch uint64, m DeviceState, z bool) error {
	if err := s.begin(epoch); err != nil {
		return err
	}
	if s.devTotal == 0 {
		s.devZ = z
	} else if s.devZ != z {
		return s.fail(epoch, "compressed and plain device state chunks mixed")
	}
	if err := m.validate(); err != nil {
		s.Reset()
		return fmt.Errorf("%w: epoch %d: %w", ErrEpoch, epoch, err)
	}
	have := uint64(len(s.ep.DeviceState))
	switch {
	case s.devTotal == 0 && m.Offset != 0:
		return s.fail(epoch, "device state chunk at offset %d before the one at 0", m.Offset)
	case s.devTotal != 0 && have == s.devTotal:
		return s.fail(epoch, "device state chunk at offset %d after the whole %d bytes", m.Offset, s.devTotal)
	case s.devTotal != 0 && uint64(m.Total) != s.devTotal:
		return s.fail(epoch, "device state chunk says total %d, earlier chunks %d", m.Total, s.devTotal)
	case uint64(m.Offset) != have:
		return s.fail(epoch, "device state chunk at offset %d, want %d", m.Offset, have)
	}
	switch {
	case s.devTotal == 0 && len(m.Data) == int(m.Total):
		s.ep.DeviceState = m.Data // whole in one chunk: keep it as it is
	case s.devTotal == 0:
		s.ep.DeviceState = append(make([]byte, 0, min(int(m.Total), 2*len(m.Data))), m.Data...)
	default:
		s.ep.DeviceState = append(s.ep.DeviceState, m.Data...)
	}
	s.devTotal = uint64(m.Total)
	s.d.AddDeviceState(m.Data)
	return nil
}

// Commit checks c against what arrived for epoch and, when it matches,
// returns the complete epoch and makes it the last committed one. An epoch
// with no pages and no device state needs no frames before its Commit.
func (s *Stage) Commit(epoch uint64, c Commit) (Epoch, error) {
	if err := s.begin(epoch); err != nil {
		return Epoch{}, err
	}
	got := s.d.Commit()
	switch {
	case uint64(len(s.ep.DeviceState)) != s.devTotal:
		return Epoch{}, s.fail(epoch, "device state incomplete: %d of %d bytes arrived", len(s.ep.DeviceState), s.devTotal)
	case c.PageCount != got.PageCount:
		return Epoch{}, s.fail(epoch, "commit says %d pages, %d arrived", c.PageCount, got.PageCount)
	case c.DeviceStateLen != got.DeviceStateLen:
		return Epoch{}, s.fail(epoch, "commit says %d bytes of device state, %d arrived", c.DeviceStateLen, got.DeviceStateLen)
	case c.Digest != got.Digest:
		return Epoch{}, s.fail(epoch, "digest 0x%08x, commit says 0x%08x", got.Digest, c.Digest)
	}
	ep := s.ep
	if s.devZ {
		dev, err := decompressDeviceState(ep.DeviceState)
		if err != nil {
			return Epoch{}, s.fail(epoch, "device state: %v", err)
		}
		ep.DeviceState = dev
	}
	s.committed = epoch
	s.Reset()
	return ep, nil
}

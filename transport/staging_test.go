package transport

import (
	"bytes"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// stageStep is one call into a Stage: a frame to Add, or a Reset; err and
// detail say how Add must fail (nil: it must not).
type stageStep struct {
	f      Frame
	reset  bool
	err    error
	detail string
}

func TestStage(t *testing.T) {
	const ram = 1 << 20 // 256 pages
	p1, p2, p7, last := page(1, 1), page(2, 2), page(7, 7), page(255, 5)
	bad := page(7, 7)
	bad.Data = bytes.Clone(bad.Data)
	bad.Data[100] ^= 0x10
	swapped := Page{Index: 1, Data: p2.Data}
	state := []byte("state")

	pg := func(epoch uint64, ps ...Page) stageStep {
		return stageStep{f: mustFrame(t, epoch, 0, RAMPages{Pages: ps})}
	}
	dev := func(epoch uint64, off, total uint32, data string) stageStep {
		return stageStep{f: mustFrame(t, epoch, 0, DeviceState{Offset: off, Total: total, Data: []byte(data)})}
	}
	commit := func(epoch uint64, c Commit) stageStep {
		return stageStep{f: mustFrame(t, epoch, 0, c)}
	}
	// digest is the Commit for pages then device state chunks sent in
	// that order.
	digest := func(ps []Page, devs ...string) Commit {
		var d Digest
		d.AddPages(RAMPages{Pages: ps})
		for _, s := range devs {
			d.AddDeviceState([]byte(s))
		}
		return d.Commit()
	}
	fails := func(s stageStep, err error, detail string) stageStep {
		s.err, s.detail = err, detail
		return s
	}
	good := []Page{p1, p2, p7}
	goodCommit := digest(good, "state")
	wholeEpoch := func(n uint64) []stageStep {
		return []stageStep{pg(n, p1, p2), pg(n, p7), dev(n, 0, 5, "state"), commit(n, goodCommit)}
	}
	bigPages := pages(0, 1, 300, 3)
	bigFrames, err := Epoch{Number: 1, Pages: bigPages, DeviceState: state}.Frames()
	if err != nil {
		t.Fatal(err)
	}
	// The digest follows send order, device state and pages interleaved.
	var interleaved Digest
	interleaved.AddDeviceState([]byte("01234"))
	interleaved.AddDeviceState([]byte("567"))
	interleaved.AddPage(p1)
	interleaved.AddDeviceState([]byte("89"))
	var fromFrames []stageStep
	for _, f := range bigFrames {
		fromFrames = append(fromFrames, stageStep{f: f})
	}

	tests := []struct {
		name      string
		ram       uint64
		committed uint64
		steps     []stageStep
		applied   []Epoch
	}{
		{
			name:    "whole epoch applies",
			steps:   wholeEpoch(1),
			applied: []Epoch{{Number: 1, Pages: good, DeviceState: state}},
		},
		{
			name:    "epoch built by Frames",
			ram:     2 << 20,
			steps:   fromFrames,
			applied: []Epoch{{Number: 1, Pages: bigPages, DeviceState: state}},
		},
		{
			name:    "device state in chunks, before the pages",
			steps:   []stageStep{dev(1, 0, 10, "01234"), dev(1, 5, 10, "567"), pg(1, p1), dev(1, 8, 10, "89"), commit(1, interleaved.Commit())},
			applied: []Epoch{{Number: 1, Pages: []Page{p1}, DeviceState: []byte("0123456789")}},
		},
		{
			name:    "empty epoch",
			steps:   []stageStep{commit(1, Commit{})},
			applied: []Epoch{{Number: 1}},
		},
		{
			name:      "consecutive epochs after a restart",
			committed: 41,
			steps:     append(wholeEpoch(42), pg(43, last), commit(43, digest([]Page{last}))),
			applied:   []Epoch{{Number: 42, Pages: good, DeviceState: state}, {Number: 43, Pages: []Page{last}}},
		},
		{
			name:  "missing page frame",
			steps: []stageStep{pg(1, p1, p2), dev(1, 0, 5, "state"), fails(commit(1, goodCommit), ErrEpoch, "epoch 1: commit says 3 pages, 2 arrived")},
		},
		{
			name:  "missing device state chunk",
			steps: []stageStep{dev(1, 0, 10, "01234"), fails(commit(1, digest(nil, "0123456789")), ErrEpoch, "device state incomplete: 5 of 10 bytes arrived")},
		},
		{
			name:  "missing device state",
			steps: []stageStep{pg(1, p1, p2), pg(1, p7), fails(commit(1, goodCommit), ErrEpoch, "commit says 5 bytes of device state, 0 arrived")},
		},
		{
			name:  "corrupt page data",
			steps: []stageStep{pg(1, p1, p2), pg(1, bad), dev(1, 0, 5, "state"), fails(commit(1, goodCommit), ErrEpoch, "epoch 1: digest 0x")},
		},
		{
			name:  "page data under the wrong index",
			steps: []stageStep{pg(1, swapped, p2), pg(1, p7), dev(1, 0, 5, "state"), fails(commit(1, goodCommit), ErrEpoch, "digest")},
		},
		{
			name:  "corrupt device state",
			steps: []stageStep{pg(1, p1, p2), pg(1, p7), dev(1, 0, 5, "statE"), fails(commit(1, goodCommit), ErrEpoch, "digest")},
		},
		{
			name:  "frame of the next epoch while staging",
			steps: []stageStep{pg(1, p1), fails(pg(2, p2), ErrEpoch, "epoch 2: frame arrived while epoch 1 is being staged")},
		},
		{
			name:  "commit of another epoch",
			steps: []stageStep{pg(1, p1), fails(commit(2, digest([]Page{p1})), ErrEpoch, "while epoch 1 is being staged")},
		},
		{
			name:  "epoch skipped",
			steps: []stageStep{fails(pg(2, p1), ErrEpoch, "epoch 2: not the next epoch: last committed is 0")},
		},
		{
			name:    "committed epoch replayed",
			steps:   append(wholeEpoch(1), fails(pg(1, p1), ErrEpoch, "epoch 1: not the next epoch: last committed is 1")),
			applied: []Epoch{{Number: 1, Pages: good, DeviceState: state}},
		},
		{
			name:  "page beyond RAM",
			steps: []stageStep{fails(pg(1, p1, page(256, 0)), ErrEpoch, "page index 256 beyond RAM (256 pages)")},
		},
		{
			name:  "pages descend across frames",
			steps: []stageStep{pg(1, p7), fails(pg(1, p2), ErrEpoch, "page index 2 after 7: indexes must ascend within an epoch")},
		},
		{
			name:  "page twice in an epoch",
			steps: []stageStep{pg(1, p1, p7), fails(pg(1, p7), ErrEpoch, "page index 7 after 7")},
		},
		{
			name:  "device state chunk before offset 0",
			steps: []stageStep{fails(dev(1, 5, 10, "56789"), ErrEpoch, "chunk at offset 5 before the one at 0")},
		},
		{
			name:  "device state chunk gap",
			steps: []stageStep{dev(1, 0, 10, "01234"), fails(dev(1, 6, 10, "6789"), ErrEpoch, "chunk at offset 6, want 5")},
		},
		{
			name:  "device state chunk repeated",
			steps: []stageStep{dev(1, 0, 10, "01234"), fails(dev(1, 0, 10, "01234"), ErrEpoch, "chunk at offset 0, want 5")},
		},
		{
			name:  "device state total changes",
			steps: []stageStep{dev(1, 0, 10, "01234"), fails(dev(1, 5, 12, "56789"), ErrEpoch, "says total 12, earlier chunks 10")},
		},
		{
			name:  "device state after it is whole",
			steps: []stageStep{dev(1, 0, 5, "state"), fails(dev(1, 0, 5, "state"), ErrEpoch, "after the whole 5 bytes")},
		},
		{
			name:  "frame that is not part of an epoch",
			steps: []stageStep{pg(1, p1), fails(stageStep{f: mustFrame(t, 1, 0, Heartbeat{})}, ErrEpoch, "a Heartbeat frame is not part of an epoch")},
		},
		{
			name:  "malformed payload",
			steps: []stageStep{fails(stageStep{f: Frame{Type: TypeRAMPages, Epoch: 1, Payload: []byte{0, 1, 2}}}, ErrMalformed, "epoch 1: transport: malformed message: RAMPages")},
		},
		{
			name:    "reset discards the partial epoch",
			steps:   []stageStep{pg(1, p1), dev(1, 0, 10, "01234"), {reset: true}, pg(1, p2), commit(1, digest([]Page{p2}))},
			applied: []Epoch{{Number: 1, Pages: []Page{p2}}},
		},
		{
			name: "an epoch resent after it failed to verify",
			steps: append([]stageStep{pg(1, p1, p2), pg(1, bad), dev(1, 0, 5, "state"), fails(commit(1, goodCommit), ErrEpoch, "digest")},
				wholeEpoch(1)...),
			applied: []Epoch{{Number: 1, Pages: good, DeviceState: state}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.ram == 0 {
				tt.ram = ram
			}
			s, err := NewStage(tt.ram, tt.committed)
			if err != nil {
				t.Fatal(err)
			}
			var applied []Epoch
			for i, st := range tt.steps {
				if st.reset {
					s.Reset()
					if _, ok := s.Staging(); ok {
						t.Fatalf("step %d: still staging after Reset", i)
					}
					continue
				}
				ep, done, err := s.Add(st.f)
				if st.err == nil && err != nil {
					t.Fatalf("step %d (%v): %v", i, st.f, err)
				}
				if st.err != nil {
					if !errors.Is(err, st.err) || !strings.Contains(err.Error(), st.detail) {
						t.Fatalf("step %d (%v): err %v, want %v containing %q", i, st.f, err, st.err, st.detail)
					}
					if _, ok := s.Staging(); ok {
						t.Fatalf("step %d: the partial epoch was kept after an error", i)
					}
				}
				if done {
					applied = append(applied, ep)
				} else if ep.Number != 0 {
					t.Fatalf("step %d: an epoch came back without done", i)
				}
			}
			if len(applied) != len(tt.applied) {
				t.Fatalf("applied %d epochs, want %d", len(applied), len(tt.applied))
			}
			for i, want := range tt.applied {
				got := applied[i]
				if got.Number != want.Number || !bytes.Equal(got.DeviceState, want.DeviceState) || !reflect.DeepEqual(got.Pages, want.Pages) {
					t.Errorf("epoch %d: got %d with %d pages and %q, want %d with %d pages and %q",
						i, got.Number, len(got.Pages), got.DeviceState, want.Number, len(want.Pages), want.DeviceState)
				}
			}
			wantCommitted := tt.committed
			if len(tt.applied) > 0 {
				wantCommitted = tt.applied[len(tt.applied)-1].Number
			}
			if s.Committed() != wantCommitted {
				t.Errorf("Committed() = %d, want %d", s.Committed(), wantCommitted)
			}
		})
	}
}

func TestStageStaging(t *testing.T) {
	s, err := NewStage(1<<20, 4)
	if err != nil {
		t.Fatal(err)
	}
	if n, ok := s.Staging(); ok {
		t.Fatalf("fresh stage is staging epoch %d", n)
	}
	if err := s.AddPages(5, RAMPages{Pages: []Page{page(0, 0)}}); err != nil {
		t.Fatal(err)
	}
	if n, ok := s.Staging(); !ok || n != 5 {
		t.Fatalf("Staging() = %d, %v; want 5, true", n, ok)
	}
	// The typed entry points check their messages as the decoder does.
	if err := s.AddPages(5, RAMPages{Pages: []Page{{Index: 1, Data: []byte{1}}}}); !errors.Is(err, ErrMalformed) || !errors.Is(err, ErrEpoch) {
		t.Errorf("short page: %v, want ErrEpoch and ErrMalformed", err)
	}
	if err := s.AddDeviceState(5, DeviceState{Total: 1}); !errors.Is(err, ErrMalformed) {
		t.Errorf("empty chunk: %v, want ErrMalformed", err)
	}
}

func TestNewStage(t *testing.T) {
	for _, ram := range []uint64{0, 1, PageSize + 1} {
		if _, err := NewStage(ram, 0); err == nil {
			t.Errorf("NewStage(%d) accepted", ram)
		}
	}
}

func TestEpochFramesRejects(t *testing.T) {
	for _, tt := range []struct {
		name string
		e    Epoch
		want error
	}{
		{"epoch 0", Epoch{}, ErrMalformed},
		{"descending across frames", Epoch{Number: 1, Pages: append(pages(10, 1, MaxPagesPerFrame, 0), page(3, 0))}, ErrMalformed},
		{"descending in a frame", Epoch{Number: 1, Pages: []Page{page(3, 0), page(2, 0)}}, ErrMalformed},
		{"device state too large", Epoch{Number: 1, DeviceState: make([]byte, MaxDeviceState+1)}, ErrTooLarge},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := tt.e.Frames(); !errors.Is(err, tt.want) {
				t.Errorf("err %v, want %v", err, tt.want)
			}
		})
	}
}

// TestStageEpochWithDiskWrites: disk writes go first, count in the digest
// and come out of the Stage in order with KeepDisk; a changed one fails the
// commit.
func TestStageEpochWithDiskWrites(t *testing.T) {
	ep := Epoch{Number: 1, Pages: pages(0, 1, 3, 1), DeviceState: []byte("dev"),
		Disk: append(ChunkDiskWrite(8192, bytes.Repeat([]byte{3}, MaxDiskChunk+10)), DiskWrite{Offset: 0, Length: 4096, Flags: DiskZero})}
	frames, err := ep.Frames()
	if err != nil {
		t.Fatal(err)
	}
	if frames[0].Type != TypeDiskWrite || frames[1].Type != TypeDiskWrite || frames[2].Type != TypeDiskWrite || frames[3].Type != TypeRAMPages {
		t.Fatalf("frame order: %v %v %v %v", frames[0].Type, frames[1].Type, frames[2].Type, frames[3].Type)
	}
	for _, keep := range []bool{true, false} {
		s, _ := NewStage(16*PageSize, 0)
		s.KeepDisk = keep
		var got Epoch
		for _, f := range frames {
			e, done, err := s.Add(f)
			if err != nil {
				t.Fatal(err)
			}
			if done {
				got = e
			}
		}
		if keep && !reflect.DeepEqual(got.Disk, ep.Disk) {
			t.Fatalf("staged disk writes differ: %d of %d", len(got.Disk), len(ep.Disk))
		}
		if !keep && got.Disk != nil {
			t.Fatal("disk writes kept without KeepDisk")
		}
	}
	// A disk write changed in flight (a valid frame, another digest).
	bad := slices.Clone(frames)
	w := ep.Disk[2]
	w.Offset += 4096
	if bad[2], err = NewFrame(1, w); err != nil {
		t.Fatal(err)
	}
	s, _ := NewStage(16*PageSize, 0)
	var last error
	for _, f := range bad {
		if _, _, last = s.Add(f); last != nil {
			break
		}
	}
	if !errors.Is(last, ErrEpoch) || !strings.Contains(last.Error(), "digest") {
		t.Fatalf("changed disk write: %v, want a digest mismatch", last)
	}
}

// TestStageCompressedDeviceState: with an encoder the device state travels
// zstd-compressed (DeviceStateZ) and comes out of the Stage as it was; a
// compressed stream that does not decompress fails the commit.
func TestStageCompressedDeviceState(t *testing.T) {
	enc, err := NewDeltaEncoder(16 * PageSize)
	if err != nil {
		t.Fatal(err)
	}
	dev := bytes.Repeat([]byte("QEVM device state "), 4000)
	ep := Epoch{Number: 1, DeviceState: dev} // pages with an encoder go as RAMDelta, which the backup expands itself
	frames, err := ep.FramesWith(enc)
	if err != nil {
		t.Fatal(err)
	}
	var z int
	for _, f := range frames {
		if f.Type == TypeDeviceStateZ {
			z += len(f.Payload)
		}
		if f.Type == TypeDeviceState {
			t.Fatal("a compressible device state went plain")
		}
	}
	if z == 0 || z > len(dev)/10 {
		t.Fatalf("compressed device state of %d bytes for %d", z, len(dev))
	}
	s, _ := NewStage(16*PageSize, 0)
	var got Epoch
	for _, f := range frames {
		e, done, err := s.Add(f)
		if err != nil {
			t.Fatal(err)
		}
		if done {
			got = e
		}
	}
	if !bytes.Equal(got.DeviceState, dev) {
		t.Fatal("the device state differs after the round trip")
	}
	// Garbage that is a valid chunk but no zstd frame.
	s, _ = NewStage(16*PageSize, 0)
	var d Digest
	junk := DeviceStateZ{DeviceState{Total: 5, Data: []byte("12345")}}
	d.AddDeviceState(junk.Data)
	f1, _ := NewFrame(1, junk)
	f2, _ := NewFrame(1, d.Commit())
	s.Add(f1)
	if _, _, err := s.Add(f2); !errors.Is(err, ErrEpoch) || !strings.Contains(err.Error(), "zstd") {
		t.Fatalf("undecompressable device state: %v", err)
	}
}

package main

import (
	"encoding/binary"
	"testing"
)

// TestDirtyCheck: generations written in order pass, a page left at an
// older generation (a write the checkpoint missed) is counted.
func TestDirtyCheck(t *testing.T) {
	dirt.Lock()
	dirt.buf, dirt.next = make([]byte, 64*dirtPage), 0
	dirt.Unlock()
	if _, err := dirtyCheck(); err != nil {
		t.Fatal(err)
	}
	// 1.5 rounds of the buffer, 4 pages per generation.
	for i := range 96 {
		binary.LittleEndian.PutUint64(dirt.buf[dirt.next*dirtPage:], uint64(1+i/4))
		dirt.next = (dirt.next + 1) % 64
	}
	if bad, err := dirtyCheck(); err != nil || bad != 0 {
		t.Fatalf("consistent buffer: %d out of order, %v", bad, err)
	}
	// Page 20, written again in the second round (generation 22), left
	// at its first-round value (6).
	binary.LittleEndian.PutUint64(dirt.buf[20*dirtPage:], 6)
	if bad, _ := dirtyCheck(); bad != 1 {
		t.Fatalf("a stale page: %d out of order, want 1", bad)
	}
	dirt.Lock()
	dirt.buf = nil
	dirt.Unlock()
	if _, err := dirtyCheck(); err == nil {
		t.Fatal("no dirtier: no error")
	}
}

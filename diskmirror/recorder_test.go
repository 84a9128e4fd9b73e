package diskmirror

import (
	"context"
	"testing"
	"time"
)

// TestRecorderBeginCutAdmitsWritesOverTheCap: a write waiting at the
// epoch's cap must not wait for the cut once the pause is coming, or QMP
// stop (which waits for the guest's I/O) and the write would wait for each
// other forever. BeginCut lets it into the epoch being closed.
func TestRecorderBeginCutAdmitsWritesOverTheCap(t *testing.T) {
	r := NewRecorder()
	r.Cap = 100
	r.Record()
	ctx := context.Background()
	if err := r.Write(ctx, Write{Offset: 0, Length: 80, Data: make([]byte, 80)}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Write(ctx, Write{Offset: 80, Length: 80, Data: make([]byte, 80)}) }()
	select {
	case err := <-done:
		t.Fatalf("a write past the cap did not wait (%v)", err)
	case <-time.After(20 * time.Millisecond):
	}
	r.BeginCut()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the write over the cap still waits after BeginCut: stop and the write would deadlock")
	}
	if n := len(r.Cut()); n != 2 {
		t.Fatalf("the cut took %d writes, want both (the second belongs to the epoch being closed)", n)
	}
	// After the cut the caps hold again.
	r.Write(ctx, Write{Offset: 0, Length: 80, Data: make([]byte, 80)})
	go func() { done <- r.Write(ctx, Write{Offset: 80, Length: 80, Data: make([]byte, 80)}) }()
	select {
	case err := <-done:
		t.Fatalf("after the cut a write past the cap did not wait (%v)", err)
	case <-time.After(20 * time.Millisecond):
	}
	r.Cut()
	<-done
}

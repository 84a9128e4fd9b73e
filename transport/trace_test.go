package transport

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"testing"
)

func TestTraceRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewTraceWriter(&buf)
	epochs := [][]Page{pages(0, 3, 5, 1), nil, pages(100, 1, 2, 9)}
	for i, ps := range epochs {
		if err := w.WriteEpoch(uint64(i+1), ps); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	r := NewTraceReader(bytes.NewReader(buf.Bytes()))
	for i, want := range epochs {
		e, got, err := r.Next()
		if err != nil || e != uint64(i+1) || !(len(got) == 0 && len(want) == 0 || reflect.DeepEqual(got, want)) {
			t.Fatalf("epoch %d: %d, %d pages, %v", i+1, e, len(got), err)
		}
	}
	if _, _, err := r.Next(); err != io.EOF {
		t.Fatalf("after the last epoch: %v", err)
	}
	for name, b := range map[string][]byte{
		"bad magic": []byte("XTRC\x01"),
		"truncated": buf.Bytes()[:len(buf.Bytes())-1],
		"too many":  append([]byte("RTRC\x01"), 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff),
	} {
		r := NewTraceReader(bytes.NewReader(b))
		var err error
		for err == nil {
			_, _, err = r.Next()
		}
		if !errors.Is(err, ErrTrace) {
			t.Errorf("%s: %v, want ErrTrace", name, err)
		}
	}
}

func FuzzTraceReader(f *testing.F) {
	var buf bytes.Buffer
	w := NewTraceWriter(&buf)
	w.WriteEpoch(1, pages(0, 1, 1, 1))
	w.Flush()
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewTraceReader(bytes.NewReader(b))
		for range 100 {
			if _, _, err := r.Next(); err != nil {
				return
			}
		}
	})
}

package dirtypages

import (
	"math/rand/v2"
	"slices"
	"testing"
)

func TestSetBasics(t *testing.T) {
	s := NewSet(130)
	if s.Len() != 130 || s.Count() != 0 || !s.Empty() {
		t.Fatalf("new set: len %d count %d empty %v", s.Len(), s.Count(), s.Empty())
	}
	for _, p := range []int{129, 0, 64, 63, 65} {
		s.Add(p)
	}
	s.Add(64) // twice
	if got, want := s.Pages(), []int{0, 63, 64, 65, 129}; !slices.Equal(got, want) {
		t.Fatalf("pages %v, want %v", got, want)
	}
	if !s.Has(63) || s.Has(62) || s.Count() != 5 || s.Empty() {
		t.Fatalf("Has/Count wrong: %v", s)
	}
	s.Remove(63)
	s.Remove(62) // absent
	if s.Has(63) || s.Count() != 4 {
		t.Fatalf("after Remove: %v", s)
	}
	if got, want := s.String(), "4/130 pages {0, 64-65, 129}"; got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
	c := s.Clone()
	s.Clear()
	if !s.Empty() || s.Len() != 130 || c.Count() != 4 {
		t.Fatalf("Clear: %v, clone %v", s, c)
	}
}

func TestSetUnionEqual(t *testing.T) {
	a, b := NewSet(200), NewSet(200)
	a.Add(1)
	a.Add(150)
	b.Add(150)
	b.Add(199)
	if a.Equal(b) {
		t.Fatal("different sets equal")
	}
	a.Union(b)
	if got, want := a.Pages(), []int{1, 150, 199}; !slices.Equal(got, want) {
		t.Fatalf("union %v, want %v", got, want)
	}
	if got := b.Pages(); !slices.Equal(got, []int{150, 199}) {
		t.Fatalf("union changed its argument: %v", got)
	}
	if NewSet(3).Equal(NewSet(4)) {
		t.Fatal("sets of different Len equal")
	}
	mustPanic(t, "union of different sizes", func() { a.Union(NewSet(201)) })
}

func TestSetOutOfRangePanics(t *testing.T) {
	s := NewSet(10)
	for name, f := range map[string]func(){
		"add -1":        func() { s.Add(-1) },
		"add len":       func() { s.Add(10) },
		"has len":       func() { s.Has(10) },
		"remove len":    func() { s.Remove(10) },
		"range past":    func() { s.AddRange(5, 11) },
		"range reverse": func() { s.AddRange(5, 4) },
		"negative set":  func() { NewSet(-1) },
	} {
		mustPanic(t, name, f)
	}
}

func mustPanic(t *testing.T, name string, f func()) {
	t.Helper()
	defer func() {
		if recover() == nil {
			t.Errorf("%s: no panic", name)
		}
	}()
	f()
}

func TestFullSet(t *testing.T) {
	for _, n := range []int{0, 1, 63, 64, 65, 128, 1000} {
		s := NewFullSet(n)
		if s.Count() != n {
			t.Errorf("NewFullSet(%d).Count() = %d", n, s.Count())
		}
		runs := 0
		for first, k := range s.Runs() {
			runs++
			if first != 0 || k != n {
				t.Errorf("NewFullSet(%d) run (%d,%d)", n, first, k)
			}
		}
		if want := min(n, 1); runs != want {
			t.Errorf("NewFullSet(%d): %d runs, want %d", n, runs, want)
		}
	}
}

// TestSetMatchesReference checks Add, AddRange, Count, All and Runs against
// a plain bool slice on random contents, dense and sparse.
func TestSetMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 300 {
		n := rng.IntN(700)
		ref := make([]bool, n)
		s := NewSet(n)
		density := rng.Float64()
		for i := 0; n > 0 && i < rng.IntN(40); i++ {
			if rng.Float64() < density {
				from := rng.IntN(n)
				to := from + rng.IntN(n-from+1)
				s.AddRange(from, to)
				for p := from; p < to; p++ {
					ref[p] = true
				}
			} else {
				p := rng.IntN(n)
				s.Add(p)
				ref[p] = true
			}
		}
		var want []int
		for p, ok := range ref {
			if ok {
				want = append(want, p)
			}
		}
		if got := s.Pages(); !slices.Equal(got, want) {
			t.Fatalf("round %d: pages %v, want %v", round, got, want)
		}
		if s.Count() != len(want) {
			t.Fatalf("round %d: count %d, want %d", round, s.Count(), len(want))
		}
		// Runs must be maximal, ascending and cover exactly the pages.
		var fromRuns []int
		prevEnd := -2
		for first, k := range s.Runs() {
			if k <= 0 || first <= prevEnd {
				t.Fatalf("round %d: run (%d,%d) after end %d is empty, out of order or not maximal", round, first, k, prevEnd)
			}
			for p := first; p < first+k; p++ {
				fromRuns = append(fromRuns, p)
			}
			prevEnd = first + k
		}
		if !slices.Equal(fromRuns, want) {
			t.Fatalf("round %d: runs cover %v, want %v", round, fromRuns, want)
		}
	}
}

func TestSetIterationStops(t *testing.T) {
	s := NewFullSet(300)
	n := 0
	for range s.All() {
		n++
		if n == 3 {
			break
		}
	}
	s = NewSet(300)
	s.Add(1)
	s.Add(5)
	s.Add(200)
	runs := 0
	for range s.Runs() {
		runs++
		break
	}
	if n != 3 || runs != 1 {
		t.Fatalf("iteration did not stop: %d pages, %d runs", n, runs)
	}
}

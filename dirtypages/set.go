package dirtypages

import (
	"fmt"
	"iter"
	"math/bits"
)

// Set is a set of page indexes in [0, Len()), stored as a bitmap: one bit per
// page, 32 KiB of bitmap per GiB of guest RAM. The zero Set is empty and has
// Len 0. Methods that take an index panic when it is out of range, like a
// slice index would: a page outside the RAM backend is a programming error.
//
// A Set is not safe for concurrent mutation.
type Set struct {
	words []uint64
	n     int
}

// NewSet returns an empty set for pages 0..pages-1.
func NewSet(pages int) *Set {
	if pages < 0 {
		panic(fmt.Sprintf("dirtypages: NewSet(%d)", pages))
	}
	return &Set{words: make([]uint64, (pages+63)/64), n: pages}
}

// NewFullSet returns a set holding every page 0..pages-1.
func NewFullSet(pages int) *Set {
	s := NewSet(pages)
	s.AddRange(0, pages)
	return s
}

// Len is the number of pages the set can hold (the size of the RAM backend in
// pages), not the number it holds; see Count.
func (s *Set) Len() int { return s.n }

func (s *Set) check(i int) {
	if uint(i) >= uint(s.n) {
		panic(fmt.Sprintf("dirtypages: page %d out of range [0,%d)", i, s.n))
	}
}

// Add puts page i in the set.
func (s *Set) Add(i int) {
	s.check(i)
	s.words[i>>6] |= 1 << (uint(i) & 63)
}

// Remove takes page i out of the set.
func (s *Set) Remove(i int) {
	s.check(i)
	s.words[i>>6] &^= 1 << (uint(i) & 63)
}

// Has reports whether page i is in the set.
func (s *Set) Has(i int) bool {
	s.check(i)
	return s.words[i>>6]&(1<<(uint(i)&63)) != 0
}

// AddRange puts pages [from, to) in the set.
func (s *Set) AddRange(from, to int) {
	if from < 0 || to > s.n || from > to {
		panic(fmt.Sprintf("dirtypages: range [%d,%d) out of [0,%d)", from, to, s.n))
	}
	for from < to && from&63 != 0 {
		s.words[from>>6] |= 1 << (uint(from) & 63)
		from++
	}
	for ; from+64 <= to; from += 64 {
		s.words[from>>6] = ^uint64(0)
	}
	for ; from < to; from++ {
		s.words[from>>6] |= 1 << (uint(from) & 63)
	}
}

// Count is the number of pages in the set.
func (s *Set) Count() int {
	n := 0
	for _, w := range s.words {
		n += bits.OnesCount64(w)
	}
	return n
}

// Empty reports whether the set holds no page.
func (s *Set) Empty() bool {
	for _, w := range s.words {
		if w != 0 {
			return false
		}
	}
	return true
}

// Clear empties the set, keeping its Len.
func (s *Set) Clear() { clear(s.words) }

// Union adds every page of o to s. Both sets must have the same Len: the
// union of harvests of different RAM backends is meaningless.
func (s *Set) Union(o *Set) {
	if s.n != o.n {
		panic(fmt.Sprintf("dirtypages: union of sets of %d and %d pages", s.n, o.n))
	}
	for i, w := range o.words {
		s.words[i] |= w
	}
}

// Equal reports whether s and o have the same Len and the same pages.
func (s *Set) Equal(o *Set) bool {
	if s.n != o.n {
		return false
	}
	for i, w := range s.words {
		if o.words[i] != w {
			return false
		}
	}
	return true
}

// Clone returns an independent copy of s.
func (s *Set) Clone() *Set {
	return &Set{words: append([]uint64(nil), s.words...), n: s.n}
}

// All yields the pages of the set in ascending order. The set must not
// change during the iteration.
func (s *Set) All() iter.Seq[int] {
	return func(yield func(int) bool) {
		for wi := range s.words {
			for w := s.words[wi]; w != 0; w &= w - 1 {
				if !yield(wi<<6 | bits.TrailingZeros64(w)) {
					return
				}
			}
		}
	}
}

// Runs yields the set as maximal runs of consecutive pages, in ascending
// order: (first page, number of pages). A checkpoint copies a run with one
// copy, which is cheaper than one per page when writes cluster.
func (s *Set) Runs() iter.Seq2[int, int] {
	return func(yield func(int, int) bool) {
		start, n := -1, 0
		for wi := 0; wi < len(s.words); wi++ {
			w := s.words[wi]
			if w == ^uint64(0) {
				if start < 0 {
					start = wi << 6
				}
				n += 64
				continue
			}
			for bit := 0; bit < 64; {
				if w>>uint(bit) == 0 {
					// No set bit left in this word: a run in progress
					// ends here.
					if start >= 0 {
						if !yield(start, n) {
							return
						}
						start, n = -1, 0
					}
					break
				}
				if w&(1<<uint(bit)) == 0 {
					if start >= 0 {
						if !yield(start, n) {
							return
						}
						start, n = -1, 0
					}
					bit += bits.TrailingZeros64(w >> uint(bit))
					continue
				}
				ones := bits.TrailingZeros64(^(w >> uint(bit)))
				if start < 0 {
					start = wi<<6 | bit
				}
				n += ones
				bit += ones
			}
		}
		if start >= 0 {
			yield(start, n)
		}
	}
}

// Pages returns the pages of the set in ascending order.
func (s *Set) Pages() []int {
	out := make([]int, 0, s.Count())
	for p := range s.All() {
		out = append(out, p)
	}
	return out
}

// String describes the set briefly, for logs and test failures: its count
// and its first runs.
func (s *Set) String() string {
	str := fmt.Sprintf("%d/%d pages", s.Count(), s.n)
	sep, shown := " {", 0
	for first, n := range s.Runs() {
		if shown == 8 {
			str += ", ..."
			break
		}
		if n == 1 {
			str += fmt.Sprintf("%s%d", sep, first)
		} else {
			str += fmt.Sprintf("%s%d-%d", sep, first, first+n-1)
		}
		sep = ", "
		shown++
	}
	if shown > 0 {
		str += "}"
	}
	return str
}

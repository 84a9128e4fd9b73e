// Package stats holds the one quantile definition the project reports
// with: nearest rank, over a sample the caller no longer needs in order.
package stats

import (
	"cmp"
	"slices"
)

// Quantile returns the q quantile (0 < q <= 1) of v by nearest rank, the
// zero value for an empty v. It sorts v.
func Quantile[T cmp.Ordered](v []T, q float64) T {
	if len(v) == 0 {
		var zero T
		return zero
	}
	slices.Sort(v)
	i := int(q*float64(len(v))+0.5) - 1
	return v[min(max(i, 0), len(v)-1)]
}

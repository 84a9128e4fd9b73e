package main

import "testing"

func TestParseMinRun(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want float64
		err  bool
	}{
		{"90%", 0.9, false}, {"0.5", 0.5, false}, {" 75% ", 0.75, false},
		{"off", -1, false}, {"0", -1, false}, {"0%", -1, false},
		{"99%", 0, true}, {"1", 0, true}, {"150%", 0, true}, {"-10%", 0, true}, {"ninety", 0, true}, {"", 0, true},
	} {
		got, err := parseMinRun(tc.in)
		if (err != nil) != tc.err || (!tc.err && got != tc.want) {
			t.Errorf("parseMinRun(%q) = %v, %v; want %v (error %v)", tc.in, got, err, tc.want, tc.err)
		}
	}
}

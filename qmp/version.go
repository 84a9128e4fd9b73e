package qmp

import (
	"encoding/json"
	"fmt"
)

// Version is a QEMU version as QMP reports it, in the greeting and in the
// return value of query-version. It marshals to and from QMP's wire shape,
// {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "..."}, so
// Run[qmp.Version](ctx, c, "query-version", nil) works.
type Version struct {
	Major, Minor, Micro int
	// Package is the distribution's package string, for example
	// "Debian 1:7.2+dfsg-7+deb12u18+b3"; it may be empty.
	Package string
}

// String returns "MAJOR.MINOR.MICRO", followed by " (PACKAGE)" when the
// package string is not empty.
func (v Version) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	if v.Package != "" {
		s += " (" + v.Package + ")"
	}
	return s
}

// AtLeast reports whether v is the same as or newer than w, comparing
// major, minor and micro numbers only.
func (v Version) AtLeast(w Version) bool {
	if v.Major != w.Major {
		return v.Major > w.Major
	}
	if v.Minor != w.Minor {
		return v.Minor > w.Minor
	}
	return v.Micro >= w.Micro
}

type wireVersionNumbers struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
	Micro int `json:"micro"`
}

type wireVersion struct {
	QEMU    *wireVersionNumbers `json:"qemu"`
	Package string              `json:"package"`
}

// MarshalJSON encodes v in QMP's wire shape.
func (v Version) MarshalJSON() ([]byte, error) {
	return json.Marshal(wireVersion{
		QEMU:    &wireVersionNumbers{Major: v.Major, Minor: v.Minor, Micro: v.Micro},
		Package: v.Package,
	})
}

// UnmarshalJSON decodes QMP's wire shape. The "qemu" member is required.
func (v *Version) UnmarshalJSON(b []byte) error {
	if !isObject(b) {
		return fmt.Errorf("version: want a JSON object, got %s", truncate(b, 40))
	}
	var w wireVersion
	if err := json.Unmarshal(b, &w); err != nil {
		return fmt.Errorf("version: %w", err)
	}
	if w.QEMU == nil {
		return fmt.Errorf("version: no \"qemu\" member")
	}
	*v = Version{Major: w.QEMU.Major, Minor: w.QEMU.Minor, Micro: w.QEMU.Micro, Package: w.Package}
	return nil
}

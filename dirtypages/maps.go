package dirtypages

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mapping is one region of a process's address space, as /proc/PID/maps
// lists it.
type Mapping struct {
	Start, End uintptr // [Start, End)
	Perms      string  // e.g. "rw-s": 's' for a shared mapping
	Offset     uint64  // offset in the file of Start
	Major      uint32  // device of the file
	Minor      uint32
	Inode      uint64
	// Path is the file mapped, "/memfd:NAME (deleted)" for a memfd, a
	// pseudo-path such as "[heap]", or empty for anonymous memory. A file
	// removed since it was mapped has " (deleted)" appended.
	Path string
}

// Len is the size of the mapping in bytes.
func (m Mapping) Len() uintptr { return m.End - m.Start }

// Pages is the size of the mapping in pages.
func (m Mapping) Pages() int { return int(m.Len() / PageSize) }

// String formats m as a line of /proc/PID/maps.
func (m Mapping) String() string {
	return fmt.Sprintf("%#x-%#x %s %#x %02x:%02x %d %s", m.Start, m.End, m.Perms, m.Offset, m.Major, m.Minor, m.Inode, m.Path)
}

// ErrMappingNotFound is returned by FindMapping when no mapping of the RAM
// backend exists in the process.
var ErrMappingNotFound = errors.New("dirtypages: mapping not found")

// ErrAmbiguousMapping is returned by FindMapping when the process maps the
// RAM backend more than once, at places that do not join up.
var ErrAmbiguousMapping = errors.New("dirtypages: more than one mapping")

// Mappings lists the mappings of process pid from /proc/PID/maps.
func Mappings(pid int) ([]Mapping, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, fmt.Errorf("dirtypages: maps of pid %d: %w", pid, err)
	}
	ms, err := parseMaps(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("dirtypages: maps of pid %d: %w", pid, err)
	}
	return ms, nil
}

// parseMaps parses the format of /proc/PID/maps:
//
//	start-end perms offset major:minor inode [path]
//
// with numbers in hex except the inode, and a path that may hold spaces.
func parseMaps(r io.Reader) ([]Mapping, error) {
	var out []Mapping
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" {
			continue
		}
		m, err := parseMapsLine(line)
		if err != nil {
			return nil, fmt.Errorf("line %d %q: %w", n, line, err)
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

func parseMapsLine(line string) (Mapping, error) {
	var m Mapping
	rest := line
	field := func() string {
		rest = strings.TrimLeft(rest, " ")
		f, r, _ := strings.Cut(rest, " ")
		rest = r
		return f
	}
	rng, perms, off, dev, ino := field(), field(), field(), field(), field()
	lo, hi, ok := strings.Cut(rng, "-")
	if !ok {
		return m, errors.New("no address range")
	}
	start, err1 := strconv.ParseUint(lo, 16, 64)
	end, err2 := strconv.ParseUint(hi, 16, 64)
	offset, err3 := strconv.ParseUint(off, 16, 64)
	maj, min, ok := strings.Cut(dev, ":")
	major, err4 := strconv.ParseUint(maj, 16, 32)
	minor, err5 := strconv.ParseUint(min, 16, 32)
	inode, err6 := strconv.ParseUint(ino, 10, 64)
	if err := errors.Join(err1, err2, err3, err4, err5, err6); err != nil || !ok || len(perms) != 4 || end < start {
		return m, fmt.Errorf("malformed fields: %v", err)
	}
	m = Mapping{
		Start: uintptr(start), End: uintptr(end), Perms: perms, Offset: offset,
		Major: uint32(major), Minor: uint32(minor), Inode: inode,
		Path: strings.TrimLeft(rest, " "),
	}
	return m, nil
}

const deletedSuffix = " (deleted)"

// FindMapping returns the mapping of a RAM backend in process pid (normally
// QEMU): name is either the backend file's path (mem-path of
// memory-backend-file) or a memfd's name, bare ("memory-backend-memfd", the
// name QEMU gives every memfd backend) or as maps shows it
// ("/memfd:memory-backend-memfd"). A path is matched by device and inode
// when it can be stat'ed here, else by name; a file or memfd removed since
// it was mapped matches too. Adjacent entries that continue one another in
// the file (the kernel splits a mapping when part of it changes flags) are
// joined into one, which keeps the first entry's Perms.
//
// It fails with ErrMappingNotFound when nothing matches and with
// ErrAmbiguousMapping when the backend is mapped at several places (several
// memfd backends all have QEMU's default name; use Mappings and pick by
// size or inode then).
func FindMapping(pid int, name string) (Mapping, error) {
	ms, err := Mappings(pid)
	if err != nil {
		return Mapping{}, err
	}
	m, err := findMapping(ms, name, statFile(name))
	if err != nil {
		return Mapping{}, fmt.Errorf("dirtypages: pid %d: %w", pid, err)
	}
	return m, nil
}

// fileID is the device and inode of a file, when it could be stat'ed.
type fileID struct {
	ok           bool
	major, minor uint32
	inode        uint64
}

func statFile(name string) fileID {
	if !strings.HasPrefix(name, "/") || strings.HasPrefix(name, "/memfd:") {
		return fileID{}
	}
	var st unix.Stat_t
	if err := unix.Stat(name, &st); err != nil {
		return fileID{}
	}
	return fileID{ok: true, major: unix.Major(st.Dev), minor: unix.Minor(st.Dev), inode: st.Ino}
}

func findMapping(ms []Mapping, name string, id fileID) (Mapping, error) {
	var want string
	switch {
	case strings.HasPrefix(name, "/memfd:"):
		want = strings.TrimSuffix(name, deletedSuffix)
	case !strings.HasPrefix(name, "/"):
		want = "/memfd:" + name
	default:
		want = filepath.Clean(name)
	}
	match := func(m Mapping) bool {
		if m.Inode == 0 {
			return false // anonymous memory and pseudo-paths
		}
		if id.ok && m.Inode == id.inode && m.Major == id.major && m.Minor == id.minor {
			return true
		}
		return strings.TrimSuffix(m.Path, deletedSuffix) == want
	}
	var runs []Mapping
	for _, m := range ms {
		if !match(m) {
			continue
		}
		if n := len(runs); n > 0 {
			last := &runs[n-1]
			if last.End == m.Start && last.Inode == m.Inode && last.Major == m.Major && last.Minor == m.Minor &&
				last.Offset+uint64(last.Len()) == m.Offset {
				last.End = m.End
				continue
			}
		}
		runs = append(runs, m)
	}
	switch len(runs) {
	case 0:
		return Mapping{}, fmt.Errorf("%w: no mapping of %s", ErrMappingNotFound, want)
	case 1:
		return runs[0], nil
	}
	var b strings.Builder
	for _, m := range runs {
		b.WriteString("\n\t" + m.String())
	}
	return Mapping{}, fmt.Errorf("%w: %s is mapped %d times:%s", ErrAmbiguousMapping, want, len(runs), b.String())
}

// vma is one entry of /proc/PID/smaps: a mapping and the kernel's flags of
// the virtual memory area behind it.
type vma struct {
	Mapping
	// Flags are the two-letter mnemonics of the VmFlags line ("lo" for
	// VM_LOCKED, "ht" for hugetlb, ...); nil when the entry has none.
	Flags []string
}

// hasFlag reports whether the VMA's VmFlags include f.
func (v vma) hasFlag(f string) bool {
	for _, g := range v.Flags {
		if g == f {
			return true
		}
	}
	return false
}

// parseSmaps parses the format of /proc/PID/smaps: a line of the maps
// format for each VMA, followed by "Key: value" lines about it, of which
// only VmFlags is kept.
func parseSmaps(r io.Reader) ([]vma, error) {
	var out []vma
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" {
			continue
		}
		first, _, _ := strings.Cut(line, " ")
		if !strings.HasSuffix(first, ":") { // a VMA's maps line
			m, err := parseMapsLine(line)
			if err != nil {
				return nil, fmt.Errorf("line %d %q: %w", n, line, err)
			}
			out = append(out, vma{Mapping: m})
			continue
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("line %d %q: a field before the first mapping", n, line)
		}
		if first == "VmFlags:" {
			out[len(out)-1].Flags = strings.Fields(strings.TrimPrefix(line, first))
		}
	}
	return out, sc.Err()
}

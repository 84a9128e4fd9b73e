package dirtypages

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const sampleMaps = `55f88adc1000-55f88adc3000 r--p 00000000 fe:00 247026                     /usr/bin/qemu-system-x86_64
7f0000000000-7f0000200000 rw-s 00000000 00:1a 4242                       /dev/shm/vm.ram
7f0000200000-7f0008000000 rw-s 00200000 00:1a 4242                       /dev/shm/vm.ram
7f0008000000-7f0008001000 ---p 00000000 00:00 0 
7f1000000000-7f1004000000 rw-s 00000000 00:01 9001                       /memfd:memory-backend-memfd (deleted)
7f2000000000-7f2000001000 rw-s 00000000 00:1a 5151                       /tmp/dir with spaces/ram file
7f3000000000-7f3000001000 rw-s 00000000 00:1a 6161                       /dev/shm/gone.ram (deleted)
7f4000000000-7f4000100000 rw-s 00000000 00:01 9002                       /memfd:twice (deleted)
7f5000000000-7f5000100000 rw-s 00000000 00:01 9002                       /memfd:twice (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
`

func TestParseMaps(t *testing.T) {
	ms, err := parseMaps(strings.NewReader(sampleMaps))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 10 {
		t.Fatalf("%d mappings, want 10", len(ms))
	}
	want := Mapping{Start: 0x7f0000200000, End: 0x7f0008000000, Perms: "rw-s", Offset: 0x200000, Major: 0, Minor: 0x1a, Inode: 4242, Path: "/dev/shm/vm.ram"}
	if ms[2] != want {
		t.Errorf("entry 2 = %+v, want %+v", ms[2], want)
	}
	if ms[3].Path != "" || ms[3].Inode != 0 {
		t.Errorf("anonymous entry parsed as %+v", ms[3])
	}
	if ms[5].Path != "/tmp/dir with spaces/ram file" {
		t.Errorf("path with spaces parsed as %q", ms[5].Path)
	}
	if ms[0].Major != 0xfe || ms[0].Len() != 0x2000 || ms[0].Pages() != 2 {
		t.Errorf("entry 0 = %+v", ms[0])
	}
	for _, bad := range []string{
		"zzzz-1000 rw-s 00000000 00:1a 1 /x",
		"1000 rw-s 00000000 00:1a 1 /x",
		"1000-2000 rw-s 00000000 001a 1 /x",
		"2000-1000 rw-s 00000000 00:1a 1 /x",
		"1000-2000 rw 00000000 00:1a 1 /x",
	} {
		if _, err := parseMaps(strings.NewReader(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

func TestFindMappingIn(t *testing.T) {
	ms, err := parseMaps(strings.NewReader(sampleMaps))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		id         fileID
		start, end uintptr
		err        error
	}{
		// Two entries continuing one another in the file are joined.
		{name: "/dev/shm/vm.ram", start: 0x7f0000000000, end: 0x7f0008000000},
		{name: "/dev/shm/../shm/vm.ram", start: 0x7f0000000000, end: 0x7f0008000000},
		// Matched by inode although the path differs (a symlink, say).
		{name: "/run/shm/vm.ram", id: fileID{ok: true, minor: 0x1a, inode: 4242}, start: 0x7f0000000000, end: 0x7f0008000000},
		{name: "memory-backend-memfd", start: 0x7f1000000000, end: 0x7f1004000000},
		{name: "/memfd:memory-backend-memfd", start: 0x7f1000000000, end: 0x7f1004000000},
		{name: "/memfd:memory-backend-memfd (deleted)", start: 0x7f1000000000, end: 0x7f1004000000},
		{name: "/tmp/dir with spaces/ram file", start: 0x7f2000000000, end: 0x7f2000001000},
		{name: "/dev/shm/gone.ram", start: 0x7f3000000000, end: 0x7f3000001000},
		{name: "/dev/shm/other.ram", err: ErrMappingNotFound},
		{name: "vm.ram", err: ErrMappingNotFound}, // a bare name is a memfd's
		{name: "[stack]", err: ErrMappingNotFound},
		{name: "twice", err: ErrAmbiguousMapping},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := findMapping(ms, tc.name, tc.id)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("got %v, %v; want error %v", m, err, tc.err)
				}
				return
			}
			if err != nil || m.Start != tc.start || m.End != tc.end {
				t.Fatalf("got %v, %v; want %#x-%#x", m, err, tc.start, tc.end)
			}
		})
	}
}

// TestFindMappingOwn finds mappings of this process: a memfd by name, a
// file by path, and a file mapped twice.
func TestFindMappingOwn(t *testing.T) {
	const size = 16 * PageSize
	mem := mapShared(t, newMemfd(t, "dirtypages-own", size), size)
	m, err := FindMapping(os.Getpid(), "dirtypages-own")
	if err != nil {
		t.Fatal(err)
	}
	if m.Start != addrOf(mem) || m.Len() != size || m.Offset != 0 || m.Perms != "rw-s" {
		t.Fatalf("found %v, mapped at %#x", m, addrOf(mem))
	}

	f := newRAMFile(t, size)
	fm := mapShared(t, f, size)
	m, err = FindMapping(os.Getpid(), f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if m.Start != addrOf(fm) || m.Len() != size {
		t.Fatalf("found %v, mapped at %#x", m, addrOf(fm))
	}
	// Splitting the mapping in two (different protections) still finds it
	// whole.
	if err := unix.Mprotect(fm[PageSize:2*PageSize], unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	if m2, err := FindMapping(os.Getpid(), f.Name()); err != nil || m2.Start != m.Start || m2.End != m.End {
		t.Fatalf("after split: %v, %v", m2, err)
	}

	mapShared(t, f, size)
	if _, err := FindMapping(os.Getpid(), f.Name()); !errors.Is(err, ErrAmbiguousMapping) {
		t.Fatalf("file mapped twice: %v", err)
	}
	if _, err := FindMapping(os.Getpid(), "/nonexistent/ram"); !errors.Is(err, ErrMappingNotFound) {
		t.Fatalf("absent file: %v", err)
	}
	if _, err := FindMapping(1<<30, "x"); err == nil || !strings.Contains(err.Error(), "maps of pid") {
		t.Fatalf("absent process: %v", err)
	}
}

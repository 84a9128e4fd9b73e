package dirtypages

import (
	"strings"
	"testing"

	"github.com/remus-kvm/remus/internal/testguest"
)

// guestTests are the tests TestSoftDirtyInGuest runs inside the guest, and
// the PASS lines it expects from them.
var guestTests = struct {
	run  string
	pass []string
}{
	run: "^(TestSoftDirtySupported|TestPagemapReadPathOwn|TestSoftDirtyTracksChild|TestSoftDirtyLockCheckOfChild|TestSoftDirtyReportsReclaimedPageOfChild)$",
	pass: []string{
		"TestSoftDirtySupported",
		"TestPagemapReadPathOwn",
		"TestSoftDirtyTracksChild/memfd",
		"TestSoftDirtyTracksChild/file",
		"TestSoftDirtyTracksChild",
		"TestSoftDirtyLockCheckOfChild/memfd",
		"TestSoftDirtyLockCheckOfChild/file",
		"TestSoftDirtyLockCheckOfChild",
		"TestSoftDirtyReportsReclaimedPageOfChild",
	},
}

// TestSoftDirtyInGuest runs the soft-dirty tests against a kernel that has
// CONFIG_MEM_SOFT_DIRTY=y: it builds this package's test binary statically,
// puts it in the test guest's initramfs, boots the guest with the binary as
// the program to run (remus.exec), and checks on the console that the
// tests passed. Inside the guest the -dirtypages.in-guest flag makes them
// fail rather than skip when soft-dirty tracking does not work.
func TestSoftDirtyInGuest(t *testing.T) {
	if *inGuest {
		t.Skip("already inside the test guest")
	}
	console := testguest.RunInGuest(t, testguest.InGuest{
		Package: "./dirtypages", Run: guestTests.run, Pass: guestTests.pass, Args: []string{"-dirtypages.in-guest"},
	})
	for _, l := range strings.Split(console, "\n") {
		if strings.Contains(l, "--- PASS") || strings.Contains(l, "SoftDirtySupported() =") {
			t.Log("guest: " + strings.TrimSpace(l))
		}
	}
}

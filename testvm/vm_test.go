package testvm_test

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/remus-kvm/remus/internal/testguest"
	"github.com/remus-kvm/remus/testvm"
)

func TestBootReachesReadyLine(t *testing.T) {
	c := testguest.Config(t)
	vm, ready := testguest.Start(t, c)
	if len(ready.BootID) != 36 {
		t.Fatalf("boot id %q is not a kernel boot id", ready.BootID)
	}
	if !strings.Contains(vm.Console(), ready.Line) {
		t.Fatalf("ready line missing from the console")
	}
}

func TestArgsAreDeterministic(t *testing.T) {
	c := testvm.Config{Kernel: "k", Initrd: "i", RAMPath: "/dev/shm/r", QMP: []string{"q"}, SerialLog: "s", Accel: "tcg",
		NIC: testvm.NIC{Mode: testvm.NICStream, Path: "/tmp/n.sock"}, Disk: "d.img"}
	c.Guest.IP = netip.MustParsePrefix("10.0.0.2/24")
	a, err := c.Args()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := c.Args()
	if !slices.Equal(a, b) {
		t.Fatalf("two renderings differ:\n%q\n%q", a, b)
	}
	joined := strings.Join(a, " ")
	for _, want := range []string{
		"memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/r,share=on",
		"-machine q35,memory-backend=ram0",
		"stream,id=net0,server=off,addr.type=unix,addr.path=/tmp/n.sock",
		"remus.ip=10.0.0.2/24", "remus.disk=/dev/vda", "-accel tcg",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("command line lacks %q:\n%s", want, joined)
		}
	}
	c.Incoming = "defer"
	c.RAMPath = "/dev/shm/backup"
	inc, _ := c.Args()
	if j := strings.Join(inc, " "); !strings.HasSuffix(j, "-incoming defer") || !strings.Contains(j, "mem-path=/dev/shm/backup") {
		t.Fatalf("backup command line: %s", j)
	}
}

func TestValidateRejects(t *testing.T) {
	good := testvm.Config{Kernel: "k", Initrd: "i", RAMPath: "r", QMP: []string{"q"}, SerialLog: "s", Accel: "tcg"}
	if err := good.Validate(); err != nil {
		t.Fatalf("valid config rejected: %v", err)
	}
	for name, mut := range map[string]func(*testvm.Config){
		"no kernel":        func(c *testvm.Config) { c.Kernel = "" },
		"tiny memory":      func(c *testvm.Config) { c.MemoryMiB = 16 },
		"file ram no path": func(c *testvm.Config) { c.RAMPath = "" },
		"no qmp":           func(c *testvm.Config) { c.QMP = nil },
		"no serial":        func(c *testvm.Config) { c.SerialLog = "" },
		"stream no path":   func(c *testvm.Config) { c.NIC.Mode = testvm.NICStream },
		"nic no ip":        func(c *testvm.Config) { c.NIC = testvm.NIC{Mode: testvm.NICTap, Tap: "t"} },
		"bad accel":        func(c *testvm.Config) { c.Accel = "hvf" },
	} {
		t.Run(name, func(t *testing.T) {
			c := good
			mut(&c)
			if err := c.Validate(); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func TestWaitConsoleIgnoresAPartialLine(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "console.log")
	if err := os.WriteFile(log, []byte("booting\nremus-guest: ready boot=40df7d6f-d214-437"), 0o644); err != nil {
		t.Fatal(err)
	}
	vm := testvm.NewVMForConsole(log)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if r, err := vm.WaitReady(ctx); err == nil {
		t.Fatalf("a half-written ready line was taken: %+v", r)
	}
	f, _ := os.OpenFile(log, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("f-9a7f-1234567890ab ip=none\n")
	f.Close()
	r, err := vm.WaitReady(context.Background())
	if err != nil || r.BootID != "40df7d6f-d214-437f-9a7f-1234567890ab" {
		t.Fatalf("WaitReady = %+v, %v", r, err)
	}
}

package testvm_test

import (
	"errors"
	"testing"

	"github.com/remus-kvm/remus/testvm"
)

func TestResolveModulesOrdersDependenciesFirst(t *testing.T) {
	k, err := testvm.FindKernel()
	if errors.Is(err, testvm.ErrNoKernel) {
		t.Skipf("needs the guest kernel: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	mods, err := k.ResolveModules(testvm.GuestModules...)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		if _, dup := pos[m.Name]; dup {
			t.Fatalf("module %s listed twice", m.Name)
		}
		pos[m.Name] = i
	}
	for _, want := range append([]string{"virtio", "virtio_ring"}, testvm.GuestModules...) {
		if _, ok := pos[want]; !ok {
			t.Fatalf("module %s missing from %v", want, mods)
		}
	}
	for _, m := range mods {
		for _, d := range m.Depends {
			if pos[d] >= pos[m.Name] {
				t.Errorf("%s loads before its dependency %s", m.Name, d)
			}
		}
	}
	if _, err := k.ResolveModules("no_such_module"); err == nil {
		t.Fatal("unknown module accepted")
	}
}

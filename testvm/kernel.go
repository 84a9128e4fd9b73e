package testvm

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// KernelEnv names the environment variable that points at an unpacked
// Debian linux-image package (the directory holding boot/ and lib/). Unset,
// the kernel that `make setup` unpacked under .cache/guest-kernel/current in
// the repository is used.
const KernelEnv = "REMUS_GUEST_KERNEL"

// ErrNoKernel is returned when no guest kernel has been unpacked.
var ErrNoKernel = errors.New("testvm: no guest kernel (run `make setup`, or set " + KernelEnv + ")")

// Kernel is an unpacked Debian linux-image package.
type Kernel struct {
	Version    string // e.g. 6.1.0-56-amd64
	Image      string // path of vmlinuz
	ModulesDir string // lib/modules/<version>
}

// FindKernel locates the guest kernel: $REMUS_GUEST_KERNEL, else
// .cache/guest-kernel/current under the repository root (found by walking up
// from the working directory to go.mod).
func FindKernel() (Kernel, error) {
	dir := os.Getenv(KernelEnv)
	if dir == "" {
		root, err := RepoRoot()
		if err != nil {
			return Kernel{}, fmt.Errorf("%w: %v", ErrNoKernel, err)
		}
		dir = filepath.Join(root, ".cache", "guest-kernel", "current")
	}
	images, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	if len(images) == 0 {
		return Kernel{}, fmt.Errorf("%w: no boot/vmlinuz-* in %s", ErrNoKernel, dir)
	}
	sort.Strings(images)
	img := images[len(images)-1]
	ver := strings.TrimPrefix(filepath.Base(img), "vmlinuz-")
	mods := filepath.Join(dir, "lib", "modules", ver)
	if _, err := os.Stat(mods); err != nil {
		return Kernel{}, fmt.Errorf("%w: modules of %s: %v", ErrNoKernel, ver, err)
	}
	return Kernel{Version: ver, Image: img, ModulesDir: mods}, nil
}

// RepoRoot returns the directory of the nearest go.mod at or above the
// working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testvm: no go.mod above the working directory")
		}
		dir = parent
	}
}

// Module is one loadable kernel module.
type Module struct {
	Name    string   // as the kernel knows it: underscores, no .ko
	Path    string   // file in the unpacked package
	Depends []string // names from the module's .modinfo "depends="
}

// moduleName normalises a module file or dependency name.
func moduleName(s string) string {
	s = strings.TrimSuffix(filepath.Base(s), ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// ResolveModules returns the named modules and everything they depend on,
// dependencies first, ready to be loaded in order. Dependencies are read from
// each module's .modinfo section, so no modules.dep (which depmod writes at
// install time, and the unpacked package lacks) is needed.
func (k Kernel) ResolveModules(names ...string) ([]Module, error) {
	index := map[string]string{}
	err := filepath.WalkDir(k.ModulesDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			index[moduleName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("testvm: index modules of %s: %w", k.Version, err)
	}
	var order []Module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("testvm: module dependency cycle at %s", name)
		case 2:
			return nil
		}
		path, ok := index[name]
		if !ok {
			if from != "" {
				return fmt.Errorf("testvm: module %s (needed by %s) not in kernel %s", name, from, k.Version)
			}
			return fmt.Errorf("testvm: module %s not in kernel %s", name, k.Version)
		}
		state[name] = 1
		deps, err := moduleDepends(path)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, Module{Name: name, Path: path, Depends: deps})
		return nil
	}
	for _, n := range names {
		if err := visit(moduleName(n), ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleDepends reads "depends=" from the .modinfo section of a .ko file.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("testvm: read module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("testvm: module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("testvm: read .modinfo of %s: %w", path, err)
	}
	for _, kv := range strings.Split(string(data), "\x00") {
		if v, ok := strings.CutPrefix(kv, "depends="); ok {
			var deps []string
			for _, d := range strings.Split(v, ",") {
				if d != "" {
					deps = append(deps, moduleName(d))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

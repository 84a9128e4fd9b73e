package testvm

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/cavaliergopher/cpio"
)

// GuestModules are the modules the test guest loads at boot: the virtio PCI
// transport, its NIC and its disk.
var GuestModules = []string{"virtio_pci", "virtio_net", "virtio_blk"}

// GuestInitPackage is the Go package built as the guest's /init.
const GuestInitPackage = "github.com/remus-kvm/remus/testvm/guestinit"

// Initramfs describes the contents of the guest's initramfs.
type Initramfs struct {
	Init    string            // static binary installed as /init
	Modules []Module          // installed under /lib/modules, loaded in this order
	Files   map[string]string // extra files: path in the guest -> path on the host (made executable)
}

// WriteTo writes the initramfs as an uncompressed newc cpio archive (the
// kernel unpacks it faster than a compressed one under TCG, and it is never
// stored). Device nodes cannot be written with this cpio writer; the guest's
// init mounts devtmpfs instead.
func (ir Initramfs) WriteTo(w io.Writer) (int64, error) {
	cw := &countWriter{w: w}
	bw := bufio.NewWriterSize(cw, 1<<20)
	cw2 := cpio.NewWriter(bw)
	dirs := map[string]bool{}
	mkdir := func(dir string) error {
		var parts []string
		for d := dir; d != "/" && d != "." && !dirs[d]; d = path.Dir(d) {
			parts = append(parts, d)
		}
		for i := len(parts) - 1; i >= 0; i-- {
			dirs[parts[i]] = true
			if err := cw2.WriteHeader(&cpio.Header{Name: strings.TrimPrefix(parts[i], "/"), Mode: cpio.TypeDir | 0o755, Links: 2}); err != nil {
				return err
			}
		}
		return nil
	}
	file := func(name, src string, mode cpio.FileMode) error {
		if err := mkdir(path.Dir(name)); err != nil {
			return err
		}
		f, err := os.Open(src)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if err := cw2.WriteHeader(&cpio.Header{Name: strings.TrimPrefix(name, "/"), Mode: cpio.TypeReg | mode, Size: st.Size(), Links: 1}); err != nil {
			return err
		}
		_, err = io.Copy(cw2, f)
		return err
	}
	for _, d := range []string{"/dev", "/proc", "/sys", "/tmp", "/lib/modules"} {
		if err := mkdir(d); err != nil {
			return cw.n, fmt.Errorf("testvm: initramfs: %w", err)
		}
	}
	if err := file("/init", ir.Init, 0o755); err != nil {
		return cw.n, fmt.Errorf("testvm: initramfs: /init: %w", err)
	}
	var order strings.Builder
	for _, m := range ir.Modules {
		name := m.Name + ".ko"
		if err := file("/lib/modules/"+name, m.Path, 0o644); err != nil {
			return cw.n, fmt.Errorf("testvm: initramfs: module %s: %w", m.Name, err)
		}
		order.WriteString(name + "\n")
	}
	orderFile, err := os.CreateTemp("", "remus-modorder-")
	if err != nil {
		return cw.n, err
	}
	defer os.Remove(orderFile.Name())
	orderFile.WriteString(order.String())
	orderFile.Close()
	if err := file("/lib/modules/order", orderFile.Name(), 0o644); err != nil {
		return cw.n, fmt.Errorf("testvm: initramfs: module order: %w", err)
	}
	names := make([]string, 0, len(ir.Files))
	for n := range ir.Files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := file(path.Clean("/"+n), ir.Files[n], 0o755); err != nil {
			return cw.n, fmt.Errorf("testvm: initramfs: %s: %w", n, err)
		}
	}
	if err := cw2.Close(); err != nil {
		return cw.n, fmt.Errorf("testvm: initramfs: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return cw.n, fmt.Errorf("testvm: initramfs: %w", err)
	}
	return cw.n, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// BuildStatic builds a Go main package as a static linux/amd64 binary at out
// (cgo off, so it runs in an initramfs with no libc). The go command must be
// on PATH; the package is resolved from the repository root.
func BuildStatic(ctx context.Context, pkg, out string, extraArgs ...string) error {
	root, err := RepoRoot()
	if err != nil {
		return err
	}
	args := append([]string{"build", "-trimpath", "-ldflags=-s -w", "-o", out}, extraArgs...)
	cmd := exec.CommandContext(ctx, "go", append(args, pkg)...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("testvm: go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// Image is a bootable guest: a kernel and an initramfs.
type Image struct {
	Kernel    Kernel
	Initrd    string // path of the initramfs
	InitrdLen int64
}

// BuildImage builds the guest init and writes the initramfs into dir, with
// the GuestModules and any extra modules and files.
func BuildImage(ctx context.Context, k Kernel, dir string, extraModules []string, files map[string]string) (Image, error) {
	init := filepath.Join(dir, "guestinit")
	if err := BuildStatic(ctx, GuestInitPackage, init); err != nil {
		return Image{}, err
	}
	mods, err := k.ResolveModules(append(append([]string{}, GuestModules...), extraModules...)...)
	if err != nil {
		return Image{}, err
	}
	out := filepath.Join(dir, "initramfs.cpio")
	f, err := os.Create(out)
	if err != nil {
		return Image{}, fmt.Errorf("testvm: %w", err)
	}
	n, err := Initramfs{Init: init, Modules: mods, Files: files}.WriteTo(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return Image{}, err
	}
	return Image{Kernel: k, Initrd: out, InitrdLen: n}, nil
}

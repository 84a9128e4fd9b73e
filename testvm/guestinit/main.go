// Command guestinit is /init of the test guest's initramfs (see package
// testvm). It runs as PID 1 under the Debian guest kernel:
//
//  1. mounts /proc, /sys and /dev and takes /dev/console as its output;
//  2. loads the kernel modules listed in /lib/modules/order (finit_module);
//  3. gives the first Ethernet interface the static address from the kernel
//     command line (remus.ip=ADDR/LEN) and brings it up;
//  4. serves the counter service (package testvm/counter) on remus.port,
//     persisting each increment to /dev/vda when the guest has a disk;
//  5. prints a tick line every remus.tick milliseconds, when set;
//  6. dirties remus.dirty pages per second of a remus.dirtymem MiB buffer,
//     so the checkpoint path has a steady load, and with remus.work=compress
//     runs a compile-like workload (writes and gzips source-like text);
//  7. prints the ready line (see testvm.ReadyPrefix) on the console.
//
// With remus.exec=PATH it instead runs PATH (with remus.args, comma
// separated) after step 3, prints its exit status and powers the guest off:
// this runs tests inside the guest kernel.
package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/remus-kvm/remus/testvm/counter"
)

// readyPrefix must match testvm.ReadyPrefix.
const readyPrefix = "remus-guest: ready"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "remus-guest: fatal: %v\n", err)
	}
	// PID 1 must not exit: that panics the kernel. Power off instead.
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

type params struct {
	ip        netip.Prefix
	port      int
	dirty     int // pages per second
	dirtyMiB  int
	work      string // a workload: "compress" (compile-like)
	tick      time.Duration
	exec      string
	args      []string
	disk      string
	moduleDir string
}

func run() error {
	if err := mountBase(); err != nil {
		return err
	}
	p, err := parseCmdline()
	if err != nil {
		return err
	}
	if err := loadModules(p.moduleDir); err != nil {
		return err
	}
	if err := setupNetwork(p.ip); err != nil {
		return err
	}
	if p.exec != "" {
		return runExec(p)
	}
	go reap()
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return fmt.Errorf("read boot id: %w", err)
	}
	svc := &service{bootID: strings.TrimSpace(string(boot))}
	if svc.recBootID, err = counter.ParseBootID(svc.bootID); err != nil {
		return err
	}
	if p.disk != "" {
		if svc.disk, err = os.OpenFile(p.disk, os.O_RDWR, 0); err != nil {
			return fmt.Errorf("open disk: %w", err)
		}
	}
	ln, err := net.Listen("tcp", fmt.Sprintf(":%d", p.port))
	if err != nil {
		return fmt.Errorf("counter service: %w", err)
	}
	if p.dirty > 0 {
		go dirtier(p.dirty, p.dirtyMiB)
	}
	switch p.work {
	case "":
	case "compress":
		go compressWork()
	default:
		return fmt.Errorf("unknown workload remus.work=%s", p.work)
	}
	if p.tick > 0 {
		go ticker(p.tick, svc.bootID)
	}
	ip := "none"
	if p.ip.IsValid() {
		ip = p.ip.String()
	}
	fmt.Printf("%s boot=%s ip=%s port=%d disk=%q dirty=%d\n", readyPrefix, svc.bootID, ip, p.port, p.disk, p.dirty)
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("counter service: accept: %w", err)
		}
		go svc.serve(c)
	}
}

func mountBase() error {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fs, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	// The initramfs has no /dev/console node (its cpio writer cannot make
	// device nodes), so the kernel started us without stdio: take the
	// console from devtmpfs now.
	if f, err := os.OpenFile("/dev/console", os.O_RDWR, 0); err == nil {
		for fd := 0; fd <= 2; fd++ {
			unix.Dup2(int(f.Fd()), fd)
		}
	}
	return nil
}

func parseCmdline() (params, error) {
	p := params{port: 7000, dirtyMiB: 32, moduleDir: "/lib/modules"}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return p, fmt.Errorf("read kernel command line: %w", err)
	}
	for _, f := range strings.Fields(string(b)) {
		k, v, _ := strings.Cut(f, "=")
		var err error
		switch k {
		case "remus.ip":
			p.ip, err = netip.ParsePrefix(v)
		case "remus.port":
			p.port, err = strconv.Atoi(v)
		case "remus.dirty":
			p.dirty, err = strconv.Atoi(v)
		case "remus.dirtymem":
			p.dirtyMiB, err = strconv.Atoi(v)
		case "remus.work":
			p.work = v
		case "remus.tick":
			var ms int
			ms, err = strconv.Atoi(v)
			p.tick = time.Duration(ms) * time.Millisecond
		case "remus.disk":
			p.disk = v
		case "remus.exec":
			p.exec = v
		case "remus.args":
			p.args = strings.Split(v, ",")
		}
		if err != nil {
			return p, fmt.Errorf("kernel command line: %s: %w", f, err)
		}
	}
	if p.dirtyMiB <= 0 {
		p.dirtyMiB = 1
	}
	return p, nil
}

func loadModules(dir string) error {
	b, err := os.ReadFile(dir + "/order")
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, name := range strings.Fields(string(b)) {
		f, err := os.Open(dir + "/" + name)
		if err != nil {
			return fmt.Errorf("load module %s: %w", name, err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("load module %s: %w", name, err)
		}
	}
	return nil
}

func setupNetwork(ip netip.Prefix) error {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	if !ip.IsValid() {
		return nil
	}
	var eth netlink.Link
	for deadline := time.Now().Add(10 * time.Second); eth == nil; {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if l.Type() == "device" && l.Attrs().Name != "lo" {
				eth = l
				break
			}
		}
		if eth == nil {
			if time.Now().After(deadline) {
				return errors.New("no network interface appeared (is virtio_net loaded?)")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip.Addr().AsSlice(), Mask: net.CIDRMask(ip.Bits(), ip.Addr().BitLen())}}
	if err := netlink.AddrAdd(eth, addr); err != nil {
		return fmt.Errorf("address %s on %s: %w", ip, eth.Attrs().Name, err)
	}
	if err := netlink.LinkSetUp(eth); err != nil {
		return fmt.Errorf("bring up %s: %w", eth.Attrs().Name, err)
	}
	return nil
}

// runExec runs the program the kernel command line names and reports its
// exit status. As PID 1 it reaps every child itself while it waits (a
// reaper beside exec.Cmd.Wait could take the program's status first), so
// orphans the program leaves are collected too.
func runExec(p params) error {
	cmd := exec.Command(p.exec, p.args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	code := -1
	if err := cmd.Start(); err != nil {
		fmt.Printf("remus-guest: exec %s: %v\n", p.exec, err)
	} else {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, 0, nil)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				fmt.Printf("remus-guest: exec %s: wait: %v\n", p.exec, err)
				break
			}
			if pid != cmd.Process.Pid {
				continue // an orphan
			}
			switch {
			case ws.Exited():
				code = ws.ExitStatus()
			case ws.Signaled():
				fmt.Printf("remus-guest: exec %s: %v\n", p.exec, ws.Signal())
			}
			break
		}
		cmd.Process.Release()
	}
	fmt.Printf("remus-guest: exit status %d\n", code)
	return nil
}

// reap collects orphaned children, as PID 1 must.
func reap() {
	for {
		var ws unix.WaitStatus
		if _, err := unix.Wait4(-1, &ws, 0, nil); errors.Is(err, unix.ECHILD) {
			time.Sleep(time.Second)
		}
	}
}

type service struct {
	bootID    string
	recBootID [16]byte
	disk      *os.File

	mu    sync.Mutex
	value uint64
}

func (s *service) serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, counter.MaxLine)
	var out []byte
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return
		}
		out = out[:0]
		cmd, err := counter.ParseRequest(string(line))
		if err == nil {
			var rep counter.Reply
			rep, err = s.do(cmd)
			out = counter.AppendReply(out, rep)
		}
		if err != nil {
			out = counter.AppendError(out[:0], err.Error())
		}
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

// workDone counts the units of the background workload done since boot.
var workDone atomic.Uint64

func (s *service) do(cmd string) (counter.Reply, error) {
	switch cmd {
	case counter.CmdWork:
		return counter.Reply{Value: workDone.Load(), BootID: s.bootID, Uptime: uptime()}, nil
	case counter.CmdCheck:
		bad, err := dirtyCheck()
		return counter.Reply{Value: bad, BootID: s.bootID, Uptime: uptime()}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if cmd == counter.CmdInc {
		next := s.value + 1
		if s.disk != nil {
			rec := counter.MarshalRecord(counter.Record{Value: next, BootID: s.recBootID})
			if _, err := s.disk.WriteAt(rec[:], counter.Offset(next)); err != nil {
				return counter.Reply{}, fmt.Errorf("write record %d: %w", next, err)
			}
			if err := s.disk.Sync(); err != nil {
				return counter.Reply{}, fmt.Errorf("sync record %d: %w", next, err)
			}
		}
		s.value = next
	}
	return counter.Reply{Value: s.value, BootID: s.bootID, Uptime: uptime()}, nil
}

// uptime is the guest kernel's CLOCK_BOOTTIME: it survives a resume from a
// checkpoint and restarts at zero on reboot.
func uptime() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return time.Duration(ts.Nano())
}

// ticker prints a numbered line on the console every period, so a person or
// a test can watch the guest run on (or resume) from the console alone.
func ticker(period time.Duration, bootID string) {
	t := time.NewTicker(period)
	for n := 1; ; n++ {
		<-t.C
		fmt.Printf("remus-guest: tick %d uptime=%dms boot=%s\n", n, uptime().Milliseconds(), bootID)
	}
}

// dirtier writes to pagesPerSec distinct pages every second, spread over
// 100 slices of 10 ms, cycling through a buffer of mib MiB. Each page it
// writes gets the tick's generation in its first 8 bytes, pages in order,
// so that read from the page after the next one to write, the
// generations never decrease: dirtyCheck counts where they do, which a
// checkpoint that missed a write leaves behind.
func dirtier(pagesPerSec, mib int) {
	dirt.Lock()
	dirt.buf = make([]byte, mib<<20)
	dirt.Unlock()
	var gen uint64
	t := time.NewTicker(10 * time.Millisecond)
	carry := 0
	for range t.C {
		carry += pagesPerSec
		n := carry / 100
		carry %= 100
		gen++
		dirt.Lock()
		pages := len(dirt.buf) / dirtPage
		for i := 0; i < n; i++ {
			binary.LittleEndian.PutUint64(dirt.buf[dirt.next*dirtPage:], gen)
			dirt.next = (dirt.next + 1) % pages
		}
		dirt.Unlock()
	}
}

const dirtPage = 4096

// dirt is the dirtier's buffer and the next page it writes.
var dirt struct {
	sync.Mutex
	buf  []byte
	next int
}

// dirtyCheck counts the pages of the dirtier's buffer whose generation is
// below the one before them, reading from the next page to write: 0 when
// its memory is consistent. It fails when no dirtier runs.
func dirtyCheck() (uint64, error) {
	dirt.Lock()
	defer dirt.Unlock()
	pages := len(dirt.buf) / dirtPage
	if pages == 0 {
		return 0, errors.New("no dirtier runs (remus.dirty=0)")
	}
	var bad, prev uint64
	for i := range pages {
		p := (dirt.next + i) % pages
		g := binary.LittleEndian.Uint64(dirt.buf[p*dirtPage:])
		if g < prev {
			bad++
		}
		prev = g
	}
	return bad, nil
}

// compressWork imitates a build: it writes source-like text, compresses it
// with gzip and keeps the last results, over and over, churning the heap
// the way compilers and archivers do. It pauses a millisecond between
// files to leave the counter service its share of the CPU.
func compressWork() {
	rng := rand.New(rand.NewPCG(1, 2))
	words := []string{"func", "return", "if", "err", "!=", "nil", ":=", "for", "range", "struct", "int", "string",
		"package", "import", "var", "const", "{", "}", "(", ")", "ctx", "buf", "len", "make", "append", "\n\t", "\n"}
	kept := make([][]byte, 256) // the last 256 outputs and inputs
	for i := 0; ; i++ {
		var src bytes.Buffer
		for src.Len() < 32<<10 {
			if rng.IntN(4) == 0 {
				fmt.Fprintf(&src, "v%d ", rng.IntN(5000))
			} else {
				src.WriteString(words[rng.IntN(len(words))])
				src.WriteByte(' ')
			}
		}
		var out bytes.Buffer
		zw := gzip.NewWriter(&out)
		zw.Write(src.Bytes())
		zw.Close()
		kept[i%len(kept)] = out.Bytes()
		kept[(i+128)%len(kept)] = src.Bytes()
		workDone.Add(1)
		time.Sleep(time.Millisecond)
	}
}

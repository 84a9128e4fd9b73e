package netbuffer

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrFrameRejected marks a frame the host side refused on its own (for a
// tap: shorter than an Ethernet header, or the interface is down), as
// opposed to a failure of the port. A Relay drops such a frame, counts it
// and goes on, as a switch would.
var ErrFrameRejected = errors.New("netbuffer: frame rejected")

// Tap is a Linux tap device opened without packet information, so that each
// Read returns one Ethernet frame and each Write sends one. Its file
// descriptor is non-blocking and goes through Go's poller: reads and writes
// park the goroutine instead of a thread, deadlines work, and Close unblocks
// a pending Read.
//
// It is written directly on golang.org/x/sys/unix: opening a tap is one
// open(2) and one TUNSETIFF ioctl, about a dozen lines, while the tun/tap
// and netlink libraries bring their own file wrappers, configuration types
// and dependencies, and do not hand back a pollable *os.File as plainly.
// Addresses, links and namespaces are configured elsewhere (ip, netlink).
//
// A Tap implements FramePort.
type Tap struct {
	f    *os.File
	name string
}

// OpenTap opens the tap device called name, creating it if it does not
// exist; an empty name lets the kernel pick one (tap0, tap1, ...). A tap it
// creates is not persistent: the kernel removes it when the Tap is closed.
// An existing one (made with `ip tuntap add dev NAME mode tap`, for
// example) must be a single-queue tap that nothing else has open, or the
// kernel refuses to attach; attaching sets its flags to IFF_TAP|IFF_NO_PI.
//
// The device stays usable when it is moved to another network namespace
// after opening: the file descriptor is not tied to the namespace.
func OpenTap(name string) (*Tap, error) {
	if len(name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("netbuffer: open tap %q: name longer than %d bytes", name, unix.IFNAMSIZ-1)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("netbuffer: open tap %q: open /dev/net/tun: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netbuffer: open tap %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		switch {
		case errors.Is(err, unix.EINVAL):
			return nil, fmt.Errorf("netbuffer: open tap %q: TUNSETIFF: %w (a device of that name exists but is not a single-queue tap)", name, err)
		case errors.Is(err, unix.EBUSY):
			return nil, fmt.Errorf("netbuffer: open tap %q: TUNSETIFF: %w (the tap is already attached to another file descriptor)", name, err)
		}
		return nil, fmt.Errorf("netbuffer: open tap %q: TUNSETIFF: %w", name, err)
	}
	// With O_NONBLOCK set, os.NewFile registers the descriptor with the
	// runtime poller.
	return &Tap{f: os.NewFile(uintptr(fd), "tap:"+ifr.Name()), name: ifr.Name()}, nil
}

// Name returns the interface name (the one the kernel picked, if OpenTap was
// given none).
func (t *Tap) Name() string { return t.name }

// Read reads one frame into p. A frame longer than p is truncated by the
// kernel; a buffer of MaxFrameSize bytes holds any frame.
func (t *Tap) Read(p []byte) (int, error) { return t.f.Read(p) }

// Write sends p as one frame.
func (t *Tap) Write(p []byte) (int, error) { return t.f.Write(p) }

// ReadFrame reads one frame into buf and returns its length. Errors are
// *os.PathError values naming the device.
func (t *Tap) ReadFrame(buf []byte) (int, error) {
	return t.f.Read(buf)
}

// WriteFrame sends frame. A frame the kernel refuses by itself (shorter than
// an Ethernet header: EINVAL; interface down: EIO) gives an error wrapping
// ErrFrameRejected.
func (t *Tap) WriteFrame(frame []byte) error {
	_, err := t.f.Write(frame)
	if err == nil {
		return nil
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && (errno == unix.EINVAL || errno == unix.EIO) {
		return fmt.Errorf("%w by tap %s: %w", ErrFrameRejected, t.name, errno)
	}
	return err
}

// SetReadDeadline sets the deadline for pending and future reads.
func (t *Tap) SetReadDeadline(d time.Time) error { return t.f.SetReadDeadline(d) }

// Close closes the device; a Read or Write in progress returns
// os.ErrClosed. A tap OpenTap created disappears.
func (t *Tap) Close() error { return t.f.Close() }

// OpenTapIn is OpenTap in the network namespace at nsPath (a file such as
// /run/netns/NAME or /proc/PID/ns/net); an empty nsPath is the caller's own
// namespace. The Tap stays usable from the caller's namespace.
func OpenTapIn(nsPath, name string) (*Tap, error) {
	if nsPath == "" {
		return OpenTap(name)
	}
	type result struct {
		tap *Tap
		err error
	}
	done := make(chan result, 1)
	// A thread of its own enters the namespace; if it cannot get back, it
	// stays locked and dies with the goroutine.
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- result{err: fmt.Errorf("netbuffer: open tap %q in %s: own namespace: %w", name, nsPath, err)}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(nsPath)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("netbuffer: open tap %q in %s: %w", name, nsPath, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("netbuffer: open tap %q: enter %s: %w", name, nsPath, err)}
			return
		}
		tap, err := OpenTap(name)
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{tap, err}
	}()
	r := <-done
	return r.tap, r.err
}

// Package libvirttest gives tests a real libvirtd on this machine
// (qemu:///system): the one that runs, or one it starts itself where no
// service manager runs it (virtlogd and libvirtd as daemons, as root, as
// in a container or a CI machine without systemd). `make setup` installs
// Debian's libvirt-daemon-system; the tests skip only where it is missing.
//
// Guests that tests define are of domain type qemu (TCG): these machines
// may have a /dev/kvm that opens but cannot run guests.
package libvirttest

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/remus-kvm/remus/internal/testenv"
)

// Socket is libvirtd's read-write socket for qemu:///system.
const Socket = "/var/run/libvirt/libvirt-sock"

// Daemons are the programs the package starts when libvirtd is not
// running.
var Daemons = []string{"/usr/sbin/virtlogd", "/usr/sbin/libvirtd"}

var (
	startOnce sync.Once
	startErr  error
)

// Require returns a connection to qemu:///system, closed with the test.
// It skips the test without root or without libvirtd installed, starts
// libvirtd when none answers on Socket, and fails the test when it cannot.
func Require(t testing.TB) *libvirt.Libvirt {
	t.Helper()
	testenv.RequireRoot(t)
	for _, d := range Daemons {
		if _, err := os.Stat(d); err != nil {
			t.Skipf("needs libvirtd (%s missing; make setup installs Debian's libvirt-daemon-system)", d)
		}
	}
	startOnce.Do(func() { startErr = Start(90 * time.Second) })
	if startErr != nil {
		t.Fatal(startErr)
	}
	u, _ := url.Parse(string(libvirt.QEMUSystem))
	l, err := libvirt.ConnectToURI(u)
	if err != nil {
		t.Fatalf("libvirttest: connect to %s: %v", libvirt.QEMUSystem, err)
	}
	t.Cleanup(func() { l.Disconnect() })
	return l
}

// Start starts virtlogd and libvirtd unless libvirtd answers on Socket,
// and waits up to timeout for it to answer a connection (its first start
// probes QEMU's capabilities: seconds).
func Start(timeout time.Duration) error {
	if answers() {
		return nil
	}
	for _, d := range Daemons {
		if out, err := exec.Command(d, "-d").CombinedOutput(); err != nil {
			return fmt.Errorf("libvirttest: start %s -d: %w: %s", d, err, out)
		}
	}
	deadline := time.Now().Add(timeout)
	for !answers() {
		if time.Now().After(deadline) {
			return fmt.Errorf("libvirttest: libvirtd does not answer on %s %v after it was started", Socket, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return nil
}

// answers reports whether libvirtd takes a connection to qemu:///system.
func answers() bool {
	c, err := net.DialTimeout("unix", Socket, time.Second)
	if err != nil {
		return false
	}
	l := libvirt.New(c)
	defer l.Disconnect()
	if err := l.ConnectToURI(libvirt.QEMUSystem); err != nil {
		return false
	}
	_, err = l.ConnectGetLibVersion()
	return err == nil
}

// Define defines a persistent domain from xml and undefines it (after
// destroying it, if it runs) when the test ends.
func Define(t testing.TB, l *libvirt.Libvirt, xml string) libvirt.Domain {
	t.Helper()
	d, err := l.DomainDefineXML(xml)
	if err != nil {
		t.Fatalf("libvirttest: define domain: %v", err)
	}
	t.Cleanup(func() {
		if err := l.DomainDestroy(d); err != nil && !isNotRunning(err) {
			t.Errorf("libvirttest: destroy %s: %v", d.Name, err)
		}
		if err := l.DomainUndefine(d); err != nil {
			t.Errorf("libvirttest: undefine %s: %v", d.Name, err)
		}
	})
	return d
}

// isNotRunning reports libvirt's "domain is not running".
func isNotRunning(err error) bool {
	var le libvirt.Error
	return errors.As(err, &le) && le.Code == uint32(libvirt.ErrOperationInvalid)
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// hypervisor is the daemon's view of its host's libvirtd: each call opens
// a connection of its own (go-libvirt), so that a libvirtd restart costs
// one failed call, not a stale connection. The daemon never calls it from
// a libvirt hook's request: a hook must not call into libvirt.
type hypervisor struct {
	uri string
}

// errNoDomain is what lookups wrap for a domain libvirt does not know.
var errNoDomain = errors.New("no such domain")

func (h hypervisor) do(ctx context.Context, f func(l *libvirt.Libvirt) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	u, err := url.Parse(h.uri)
	if err != nil {
		return fmt.Errorf("libvirt URI %q: %w", h.uri, err)
	}
	l, err := libvirt.ConnectToURI(u)
	if err != nil {
		return fmt.Errorf("libvirt at %s: %w", h.uri, err)
	}
	defer l.Disconnect()
	return f(l)
}

func (h hypervisor) lookup(l *libvirt.Libvirt, name string) (libvirt.Domain, error) {
	d, err := l.DomainLookupByName(name)
	if libvirt.IsNotFound(err) {
		return d, fmt.Errorf("domain %s: %w in libvirt at %s", name, errNoDomain, h.uri)
	}
	if err != nil {
		return d, fmt.Errorf("domain %s: %w", name, err)
	}
	return d, nil
}

// domainXML returns a domain's XML: the live one, or with inactive its
// persistent definition.
func (h hypervisor) domainXML(ctx context.Context, name string, inactive bool) (string, error) {
	var xml string
	err := h.do(ctx, func(l *libvirt.Libvirt) error {
		d, err := h.lookup(l, name)
		if err != nil {
			return err
		}
		var flags libvirt.DomainXMLFlags
		if inactive {
			flags = libvirt.DomainXMLInactive
		}
		xml, err = l.DomainGetXMLDesc(d, flags)
		return err
	})
	return xml, err
}

// domainState returns a domain's state.
func (h hypervisor) domainState(ctx context.Context, name string) (libvirt.DomainState, error) {
	var st libvirt.DomainState
	err := h.do(ctx, func(l *libvirt.Libvirt) error {
		d, err := h.lookup(l, name)
		if err != nil {
			return err
		}
		s, _, err := l.DomainGetState(d, 0)
		st = libvirt.DomainState(s)
		return err
	})
	return st, err
}

// diskCapacity returns the size of a domain's disk as the guest sees it.
func (h hypervisor) diskCapacity(ctx context.Context, name, target string) (uint64, error) {
	var capacity uint64
	err := h.do(ctx, func(l *libvirt.Libvirt) error {
		d, err := h.lookup(l, name)
		if err != nil {
			return err
		}
		_, capacity, _, err = l.DomainGetBlockInfo(d, target, 0)
		if err != nil {
			return fmt.Errorf("domain %s: disk %s: %w", name, target, err)
		}
		return nil
	})
	return capacity, err
}

// versions returns libvirt's QEMU version and its own.
func (h hypervisor) versions(ctx context.Context) (hv, lib uint64, err error) {
	err = h.do(ctx, func(l *libvirt.Libvirt) error {
		if hv, err = l.ConnectGetVersion(); err != nil {
			return err
		}
		lib, err = l.ConnectGetLibVersion()
		return err
	})
	return hv, lib, err
}

// defineAndStart defines a persistent domain from xml and starts it.
func (h hypervisor) defineAndStart(ctx context.Context, xml string) error {
	return h.do(ctx, func(l *libvirt.Libvirt) error {
		d, err := l.DomainDefineXML(xml)
		if err != nil {
			return fmt.Errorf("define: %w", err)
		}
		if err := l.DomainCreate(d); err != nil {
			return fmt.Errorf("start %s: %w", d.Name, err)
		}
		return nil
	})
}

// remove destroys a domain if it is active and undefines it; a domain
// libvirt does not know is no error.
func (h hypervisor) remove(ctx context.Context, name string) error {
	return h.do(ctx, func(l *libvirt.Libvirt) error {
		d, err := h.lookup(l, name)
		if errors.Is(err, errNoDomain) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := l.DomainDestroy(d); err != nil && !isOperationInvalid(err) {
			return fmt.Errorf("destroy %s: %w", name, err)
		}
		if err := l.DomainUndefine(d); err != nil && !libvirt.IsNotFound(err) {
			return fmt.Errorf("undefine %s: %w", name, err)
		}
		return nil
	})
}

// isOperationInvalid is libvirt's answer to destroying a domain that does
// not run.
func isOperationInvalid(err error) bool {
	var le libvirt.Error
	return errors.As(err, &le) && le.Code == uint32(libvirt.ErrOperationInvalid)
}

// waitState polls a domain until it is in state want or ctx ends.
func (h hypervisor) waitState(ctx context.Context, name string, want libvirt.DomainState, every time.Duration) error {
	for {
		st, err := h.domainState(ctx, name)
		if err == nil && st == want {
			return nil
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return fmt.Errorf("domain %s: %w (%w)", name, ctx.Err(), err)
			}
			return fmt.Errorf("domain %s: in state %s, want %s: %w", name, stateName(st), stateName(want), ctx.Err())
		case <-time.After(every):
		}
	}
}

// active reports whether a domain's QEMU runs (running or paused).
func active(st libvirt.DomainState) bool {
	return st == libvirt.DomainRunning || st == libvirt.DomainPaused || st == libvirt.DomainBlocked || st == libvirt.DomainPmsuspended
}

func stateName(st libvirt.DomainState) string {
	switch st {
	case libvirt.DomainRunning:
		return "running"
	case libvirt.DomainPaused:
		return "paused"
	case libvirt.DomainShutoff:
		return "shut off"
	case libvirt.DomainShutdown:
		return "shutting down"
	case libvirt.DomainCrashed:
		return "crashed"
	case libvirt.DomainBlocked:
		return "blocked"
	case libvirt.DomainPmsuspended:
		return "suspended"
	}
	return fmt.Sprintf("state %d", st)
}

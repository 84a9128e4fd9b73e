package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/remus-kvm/remus/internal/agent"
)

// Client talks to a daemon's control API on its unix socket (remusctl).
type Client struct {
	Socket string
	hc     *http.Client
}

// NewClient returns a client of the daemon whose control socket is socket.
func NewClient(socket string) *Client {
	return &Client{Socket: socket, hc: agent.UnixHTTPClient(socket, 0)}
}

// RefusedError is a protect request the domain could not take, with the
// problems found in its definition.
type RefusedError struct{ Refusal }

func (e *RefusedError) Error() string { return e.Refusal.Error }

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	err := do(ctx, c.hc, "http://remusd", method, path, in, out, nil)
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("remusd at %s (is remusd daemon running? systemctl status remusd): %w", c.Socket, ue.Err)
	}
	return err
}

// List returns every VM the daemon protects or stands by for.
func (c *Client) List(ctx context.Context) ([]VMStatus, error) {
	var out []VMStatus
	return out, c.call(ctx, http.MethodGet, pathVMs, nil, &out)
}

// Status returns one VM's.
func (c *Client) Status(ctx context.Context, name string) (VMStatus, error) {
	var out VMStatus
	return out, c.call(ctx, http.MethodGet, pathVMs+"/"+url.PathEscape(name), nil, &out)
}

// Protect protects a running domain; a *RefusedError says why it cannot.
func (c *Client) Protect(ctx context.Context, name string, req ProtectRequest) (VMStatus, error) {
	var out VMStatus
	return out, c.call(ctx, http.MethodPost, pathVMs+"/"+url.PathEscape(name)+"/protect", req, &out)
}

// Unprotect ends a VM's protection on both hosts.
func (c *Client) Unprotect(ctx context.Context, name string) (Result, error) {
	var out Result
	return out, c.call(ctx, http.MethodPost, pathVMs+"/"+url.PathEscape(name)+"/unprotect", struct{}{}, &out)
}

// Switchover moves a protected VM to its backup host.
func (c *Client) Switchover(ctx context.Context, name string) (Result, error) {
	var out Result
	return out, c.call(ctx, http.MethodPost, pathVMs+"/"+url.PathEscape(name)+"/switchover", struct{}{}, &out)
}

// Hook hands a libvirt hook event to the daemon, which answers at once.
func (c *Client) Hook(ctx context.Context, ev HookEvent) (Result, error) {
	var out Result
	return out, c.call(ctx, http.MethodPost, pathHook, ev, &out)
}

// peerClient calls the peer daemon's API, each request signed.
type peerClient struct {
	addr  string // host:port
	key   []byte
	clock func() time.Time
	hc    *http.Client
}

func (d *Daemon) peer(addr string) (*peerClient, error) {
	host, port, err := splitPeer(addr)
	if err != nil {
		return nil, errorf(http.StatusBadRequest, "peer %q: %v", addr, err)
	}
	return &peerClient{addr: net.JoinHostPort(host, strconv.Itoa(port)), key: d.cfg.Key, clock: d.clock, hc: &http.Client{}}, nil
}

// splitPeer reads HOST or HOST:PORT (the port defaults to DefaultPeerPort).
func splitPeer(addr string) (string, int, error) {
	if addr == "" {
		return "", 0, errors.New("empty")
	}
	if ip := net.ParseIP(strings.Trim(addr, "[]")); ip != nil && strings.Contains(addr, ":") && !strings.Contains(addr, "]:") {
		return ip.String(), DefaultPeerPort, nil // a bare IPv6 address
	}
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		if strings.Contains(err.Error(), "missing port") {
			return strings.Trim(addr, "[]"), DefaultPeerPort, nil
		}
		return "", 0, err
	}
	if host == "" {
		return "", 0, errors.New("no host")
	}
	port, err := strconv.Atoi(p)
	if err != nil || port <= 0 || port > 65535 {
		return "", 0, fmt.Errorf("port %q", p)
	}
	return host, port, nil
}

// peerCallTimeout bounds one call on the peer API (a standby's start
// included).
const peerCallTimeout = 2 * time.Minute

func (p *peerClient) call(ctx context.Context, method, path string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, peerCallTimeout)
	defer cancel()
	err := do(ctx, p.hc, "http://"+p.addr, method, path, in, out, func(r *http.Request, body []byte) {
		r.Header.Set(AuthHeader, SignRequest(p.key, method, path, p.clock(), body))
	})
	if err != nil {
		return fmt.Errorf("peer remusd at %s: %w", p.addr, err)
	}
	return nil
}

// do makes one JSON request and decodes the answer into out, or returns
// the error the server answered (a *RefusedError for a Refusal with
// problems).
func do(ctx context.Context, hc *http.Client, base, method, path string, in, out any, sign func(*http.Request, []byte)) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return err
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if sign != nil {
		sign(req, body)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var ref Refusal
		if json.Unmarshal(b, &ref) == nil && ref.Error != "" {
			if len(ref.Problems) > 0 {
				return &RefusedError{ref}
			}
			return errors.New(ref.Error)
		}
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("answer to %s %s: %w", method, path, err)
	}
	return nil
}

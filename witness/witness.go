// Package witness keeps the record, in etcd, of which side of a protected
// VM runs its guest, so that a partition between the two hosts can never
// leave two live copies.
//
// Two keys per VM, under /remus/vms/NAME/:
//
//   - owner: the side whose guest is the VM (no lease: it outlives every
//     agent). The primary writes it when it first protects the VM; the
//     backup takes it over when it fails over.
//   - active: the side that is alive and running the guest, under a lease
//     with a short TTL that its agent renews. It vanishes when the agent
//     stops renewing (dead, or cut off from etcd) for the TTL.
//
// The rules that follow from them (see Guard and the checkpoint package's
// Standby): the backup resumes the guest only once it could claim both keys,
// which it can only while no live lease names anyone; a primary that can
// renew its lease nor hear its backup stops its guest before the lease can
// expire; a primary whose guest was claimed by the backup meanwhile finds
// another owner and must not run its guest again.
//
// The witness is an existing etcd cluster (etcd's client v3), or for one
// machine the single-node etcd StartLocal runs: the decisions rest on
// etcd's linearizable transactions, not on a quorum of our own.
package witness

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultTTL is the lease TTL: the longest a dead side's lease keeps the
// other from taking over. etcd grants no less than its minimum TTL (2 s
// with its default election timeout of 1 s), and whole seconds.
const DefaultTTL = 2 * time.Second

// Config says how to reach the witness.
type Config struct {
	// Endpoints of the etcd cluster (http://host:2379, https://...).
	Endpoints []string
	// CACert, Cert and Key are PEM files for TLS (Cert and Key: a client
	// certificate, when etcd asks for one).
	CACert, Cert, Key string
	// TTL of the lease (DefaultTTL when zero; rounded up to whole seconds).
	TTL time.Duration
	// DialTimeout bounds the first connection (default 5 s).
	DialTimeout time.Duration
}

// Enabled reports whether a witness is configured.
func (c Config) Enabled() bool { return len(c.Endpoints) > 0 }

// ErrOwnedElsewhere: the other side owns the guest (it failed over, or was
// switched to): this side's copy is stale and must not run.
var ErrOwnedElsewhere = errors.New("witness: the guest is owned by the other side")

// ErrHeld: a live lease names a side as active: it runs the guest.
var ErrHeld = errors.New("witness: a live lease holds the guest")

// ErrUnguarded: no primary ever held the VM's keys: it does not use the
// witness, so it does not stop its guest when cut off, and a claim proves
// nothing about it.
var ErrUnguarded = errors.New("witness: no primary ever held this VM (is the primary's remusd run with --witness?)")

// ErrLeaseGone: the lease expired (or was revoked) before it was renewed.
var ErrLeaseGone = errors.New("witness: the lease expired")

// Witness is one side's handle on one VM's keys.
type Witness struct {
	cli       *clientv3.Client
	vm, id    string
	ttl       time.Duration
	owner, on string // keys
	lease     clientv3.LeaseID
}

// Open connects to the witness for VM vm as side id (a name unique to this
// side, such as host:role). It does not wait for the cluster: operations
// fail with their context when it cannot be reached.
func Open(cfg Config, vm, id string) (*Witness, error) {
	if !cfg.Enabled() {
		return nil, errors.New("witness: no endpoints")
	}
	if vm == "" || id == "" {
		return nil, errors.New("witness: a VM name and a side name are required")
	}
	var tlsCfg *tls.Config
	if cfg.CACert != "" || cfg.Cert != "" {
		var err error
		info := transport.TLSInfo{TrustedCAFile: cfg.CACert, CertFile: cfg.Cert, KeyFile: cfg.Key}
		if tlsCfg, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("witness: TLS files: %w", err)
		}
	}
	ttl := cfg.TTL
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	ttl = (ttl + time.Second - 1).Truncate(time.Second)
	dt := cfg.DialTimeout
	if dt <= 0 {
		dt = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: cfg.Endpoints, DialTimeout: dt, TLS: tlsCfg,
		// Errors are returned and logged by the caller, with context.
		Logger: zap.NewNop(),
		// Fail fast on a dead member: renewals are due within a TTL.
		DialKeepAliveTime: time.Second, DialKeepAliveTimeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("witness: connect to %v: %w", cfg.Endpoints, err)
	}
	prefix := "/remus/vms/" + vm + "/"
	return &Witness{cli: cli, vm: vm, id: id, ttl: ttl, owner: prefix + "owner", on: prefix + "active"}, nil
}

// ID is this side's name.
func (w *Witness) ID() string { return w.id }

// TTL is the lease TTL asked for.
func (w *Witness) TTL() time.Duration { return w.ttl }

// Close drops the connection. The lease is left to expire: a side that
// stops renewing must look dead to the other, whatever the reason.
func (w *Witness) Close() error { return w.cli.Close() }

// Lease is a lease this side holds on the active key.
type Lease struct {
	// Sent is when the request that granted or renewed it left: the
	// lease cannot expire at etcd before Sent+TTL (etcd counts from when it
	// received the request).
	Sent time.Time
	TTL  time.Duration
}

// Hold makes this side the active one, for the primary: it succeeds when
// this side owns the guest or nobody does yet (the first protection), and
// replaces a lease a previous agent of this side may still hold. When the
// other side owns the guest it fails with ErrOwnedElsewhere (naming it).
func (w *Witness) Hold(ctx context.Context) (Lease, error) {
	l, id, err := w.grant(ctx)
	if err != nil {
		return Lease{}, err
	}
	put := []clientv3.Op{clientv3.OpPut(w.owner, w.id), clientv3.OpPut(w.on, w.id, clientv3.WithLease(id))}
	resp, err := w.cli.Txn(ctx).If(clientv3.Compare(clientv3.Value(w.owner), "=", w.id)).Then(put...).Else(clientv3.OpGet(w.owner)).Commit()
	if err == nil && !resp.Succeeded {
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			w.revoke(id)
			return Lease{}, fmt.Errorf("%w: %s owns VM %s (this side is %s)", ErrOwnedElsewhere, kvs[0].Value, w.vm, w.id)
		}
		resp, err = w.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(w.owner), "=", 0)).Then(put...).Else(clientv3.OpGet(w.owner)).Commit()
		if err == nil && !resp.Succeeded {
			w.revoke(id)
			return Lease{}, fmt.Errorf("%w: another side took VM %s meanwhile", ErrOwnedElsewhere, w.vm)
		}
	}
	if err != nil {
		w.revoke(id)
		return Lease{}, fmt.Errorf("witness: hold VM %s: %w", w.vm, err)
	}
	w.lease = id
	return l, nil
}

// Claim makes this side the owner and the active one, for the backup about
// to resume the guest: it succeeds only while no live lease names anyone as
// active, and fails with ErrHeld (naming the holder) otherwise, or with
// ErrUnguarded when no primary ever held the keys.
func (w *Witness) Claim(ctx context.Context) (Lease, error) {
	l, id, err := w.grant(ctx)
	if err != nil {
		return Lease{}, err
	}
	resp, err := w.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(w.on), "=", 0), clientv3.Compare(clientv3.CreateRevision(w.owner), ">", 0)).
		Then(clientv3.OpPut(w.owner, w.id), clientv3.OpPut(w.on, w.id, clientv3.WithLease(id))).
		Else(clientv3.OpGet(w.on)).Commit()
	if err != nil {
		w.revoke(id)
		return Lease{}, fmt.Errorf("witness: claim VM %s: %w", w.vm, err)
	}
	if !resp.Succeeded {
		w.revoke(id)
		var holder string
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			holder = string(kvs[0].Value)
			if holder == w.id {
				// This side's own earlier lease (an agent restarted
				// after failing over): take it over.
				return w.Hold(ctx)
			}
		} else {
			return Lease{}, fmt.Errorf("%w: VM %s", ErrUnguarded, w.vm)
		}
		return Lease{}, fmt.Errorf("%w: %s is active for VM %s", ErrHeld, holder, w.vm)
	}
	w.lease = id
	return l, nil
}

// Renew extends the lease Hold or Claim took. ErrLeaseGone: it expired
// first (take it again with Hold, which tells whether the guest is still
// this side's).
func (w *Witness) Renew(ctx context.Context) (Lease, error) {
	if w.lease == 0 {
		return Lease{}, ErrLeaseGone
	}
	sent := time.Now()
	resp, err := w.cli.KeepAliveOnce(ctx, w.lease)
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		w.lease = 0
		return Lease{}, fmt.Errorf("%w (VM %s)", ErrLeaseGone, w.vm)
	}
	if err != nil {
		return Lease{}, fmt.Errorf("witness: renew the lease of VM %s: %w", w.vm, err)
	}
	return Lease{Sent: sent, TTL: time.Duration(resp.TTL) * time.Second}, nil
}

// Status is what the witness says of a VM.
type Status struct {
	Owner  string        // the side whose guest is the VM ("" if none yet)
	Active string        // the side holding a live lease ("" if none)
	Left   time.Duration // time left on the active side's lease
}

// Status reads the VM's keys.
func (w *Witness) Status(ctx context.Context) (Status, error) {
	resp, err := w.cli.Get(ctx, "/remus/vms/"+w.vm+"/", clientv3.WithPrefix())
	if err != nil {
		return Status{}, fmt.Errorf("witness: read VM %s: %w", w.vm, err)
	}
	var st Status
	for _, kv := range resp.Kvs {
		switch string(kv.Key) {
		case w.owner:
			st.Owner = string(kv.Value)
		case w.on:
			st.Active = string(kv.Value)
			if kv.Lease != 0 {
				if ttl, err := w.cli.TimeToLive(ctx, clientv3.LeaseID(kv.Lease)); err == nil && ttl.TTL > 0 {
					st.Left = time.Duration(ttl.TTL) * time.Second
				}
			}
		}
	}
	return st, nil
}

func (w *Witness) grant(ctx context.Context) (Lease, clientv3.LeaseID, error) {
	sent := time.Now()
	g, err := w.cli.Grant(ctx, int64(w.ttl/time.Second))
	if err != nil {
		return Lease{}, 0, fmt.Errorf("witness: grant a lease for VM %s: %w", w.vm, err)
	}
	return Lease{Sent: sent, TTL: time.Duration(g.TTL) * time.Second}, g.ID, nil
}

// revoke drops a lease granted for a transaction that failed, best effort
// (it expires anyway).
func (w *Witness) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	w.cli.Revoke(ctx, id)
}

// Release gives up the active key when this side holds it (its guest is
// gone: switched over to the other side), so that the other side can claim
// it at once instead of after the TTL.
func (w *Witness) Release(ctx context.Context) error {
	if w.lease == 0 {
		return nil
	}
	_, err := w.cli.Txn(ctx).If(clientv3.Compare(clientv3.Value(w.on), "=", w.id)).Then(clientv3.OpDelete(w.on)).Commit()
	if err != nil {
		return fmt.Errorf("witness: release VM %s: %w", w.vm, err)
	}
	w.revoke(w.lease)
	w.lease = 0
	return nil
}

package netbuffer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// The kernel's output buffer for a guest whose NIC is a tap (the libvirt
// default), as Xen's Remus does it: the tap's ingress (frames from the
// guest) is redirected to an IFB device, whose root qdisc is sch_plug. The
// plug qdisc queues packets and lets them out on command:
//
//	TCQ_PLUG_BUFFER       closes the current epoch: packets queued so far
//	                      wait for the next RELEASE_ONE
//	TCQ_PLUG_RELEASE_ONE  releases the packets of the oldest closed epoch
//	TCQ_PLUG_RELEASE_INDEFINITE  lets everything through (unprotected)
//
// The qdisc counts only one closed epoch (pkts_last_epoch in
// net/sched/sch_plug.c): a second BUFFER before the RELEASE_ONE of the
// first would merge the counts and release packets early. A PlugBuffer
// therefore allows one epoch in flight (remusd --max-in-flight 1), and Cut
// refuses a second.

// Actions of struct tc_plug_qopt (include/uapi/linux/pkt_sched.h).
const (
	PlugBuffer            int32 = 0 // TCQ_PLUG_BUFFER
	PlugReleaseOne        int32 = 1 // TCQ_PLUG_RELEASE_ONE
	PlugReleaseIndefinite int32 = 2 // TCQ_PLUG_RELEASE_INDEFINITE
	PlugLimit             int32 = 3 // TCQ_PLUG_LIMIT
)

// PlugOptions is struct tc_plug_qopt, the TCA_OPTIONS of the plug qdisc.
type PlugOptions struct {
	Action int32
	Limit  uint32 // bytes the qdisc queues at most (creation, PlugLimit)
}

// plugOptionsSize is sizeof(struct tc_plug_qopt).
const plugOptionsSize = 8

// Encode returns the options as the kernel reads them (host byte order,
// which is little-endian on every architecture QEMU/KVM hosts here run).
func (o PlugOptions) Encode() []byte {
	b := make([]byte, plugOptionsSize)
	binary.NativeEndian.PutUint32(b[0:], uint32(o.Action))
	binary.NativeEndian.PutUint32(b[4:], o.Limit)
	return b
}

// DecodePlugOptions reads struct tc_plug_qopt, refusing a short buffer and
// an unknown action.
func DecodePlugOptions(b []byte) (PlugOptions, error) {
	if len(b) < plugOptionsSize {
		return PlugOptions{}, fmt.Errorf("netbuffer: plug options of %d bytes, want %d", len(b), plugOptionsSize)
	}
	o := PlugOptions{Action: int32(binary.NativeEndian.Uint32(b[0:])), Limit: binary.NativeEndian.Uint32(b[4:])}
	if o.Action < PlugBuffer || o.Action > PlugLimit {
		return PlugOptions{}, fmt.Errorf("netbuffer: unknown plug action %d", o.Action)
	}
	return o, nil
}

// plugHandle is the plug qdisc's handle on the IFB, 1:0.
const plugHandle = 1 << 16

// plugRequest is the RTM_NEWQDISC message that creates (create) or changes
// the plug qdisc at the root of the device ifindex.
func plugRequest(ifindex int, create bool, o PlugOptions) *nl.NetlinkRequest {
	flags := unix.NLM_F_ACK
	if create {
		flags |= unix.NLM_F_CREATE | unix.NLM_F_EXCL
	}
	req := nl.NewNetlinkRequest(unix.RTM_NEWQDISC, flags)
	req.AddData(&nl.TcMsg{Family: unix.AF_UNSPEC, Ifindex: int32(ifindex), Handle: plugHandle, Parent: netlink.HANDLE_ROOT})
	req.AddData(nl.NewRtAttr(nl.TCA_KIND, nl.ZeroTerminated("plug")))
	req.AddData(nl.NewRtAttr(nl.TCA_OPTIONS, o.Encode()))
	return req
}

// ErrNoPlug reports a kernel without the plug qdisc.
var ErrNoPlug = errors.New("netbuffer: the kernel has no sch_plug qdisc (CONFIG_NET_SCH_PLUG; try modprobe sch_plug)")

// KernelBuffer holds a tap's ingress (the guest's output) in the kernel with
// sch_plug on an IFB device. Its methods are safe for concurrent use.
type KernelBuffer struct {
	tap, ifb netlink.Link

	madeIngress bool // the ingress qdisc on the tap is ours to remove

	mu      sync.Mutex
	holding bool
	cut     uint64 // epoch closed and not yet released; 0 when none
	closed  bool
}

// DefaultPlugLimit bounds the bytes the plug qdisc queues (at the limit it
// drops, as any qdisc does; size it above what the guest can send in two
// epochs).
const DefaultPlugLimit = 32 << 20

// NewKernelBuffer sets up the kernel buffer for the tap device called tap in
// the caller's network namespace: an IFB device ifbName, the ingress qdisc
// on the tap with a matchall filter redirecting every frame to the IFB, and
// the plug qdisc on the IFB, letting everything through until Hold. It
// fails with an error matching ErrNoPlug when the kernel lacks sch_plug;
// what it set up is removed again on any failure.
func NewKernelBuffer(tap, ifbName string, limit uint32) (*KernelBuffer, error) {
	if limit == 0 {
		limit = DefaultPlugLimit
	}
	t, err := netlink.LinkByName(tap)
	if err != nil {
		return nil, fmt.Errorf("netbuffer: kernel buffer: tap %s: %w", tap, err)
	}
	kb := &KernelBuffer{tap: t}
	ok := false
	defer func() {
		if !ok {
			kb.teardown()
		}
	}()
	if err := netlink.LinkAdd(&netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Name: ifbName, TxQLen: 1000}}); err != nil {
		return nil, fmt.Errorf("netbuffer: kernel buffer: create IFB %s: %w (CONFIG_IFB)", ifbName, err)
	}
	if kb.ifb, err = netlink.LinkByName(ifbName); err != nil {
		kb.ifb = nil
		return nil, fmt.Errorf("netbuffer: kernel buffer: IFB %s: %w", ifbName, err)
	}
	if err := netlink.LinkSetUp(kb.ifb); err != nil {
		return nil, fmt.Errorf("netbuffer: kernel buffer: set %s up: %w", ifbName, err)
	}
	// The plug first, so that nothing is redirected to an IFB without it.
	if _, err := plugRequest(kb.ifb.Attrs().Index, true, PlugOptions{Limit: limit}).Execute(unix.NETLINK_ROUTE, 0); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
			return nil, fmt.Errorf("%w: create plug qdisc on %s: %w", ErrNoPlug, ifbName, err)
		}
		return nil, fmt.Errorf("netbuffer: kernel buffer: create plug qdisc on %s: %w", ifbName, err)
	}
	if err := kb.plug(PlugReleaseIndefinite); err != nil {
		return nil, err
	}
	ingress := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: t.Attrs().Index, Parent: netlink.HANDLE_INGRESS,
		Handle: netlink.MakeHandle(0xffff, 0)}}
	if err := netlink.QdiscAdd(ingress); err != nil {
		return nil, fmt.Errorf("netbuffer: kernel buffer: ingress qdisc on %s: %w (CONFIG_NET_SCH_INGRESS)", tap, err)
	}
	kb.madeIngress = true
	redirect := &netlink.MatchAll{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: t.Attrs().Index, Parent: netlink.MakeHandle(0xffff, 0), Priority: 1,
			Protocol: unix.ETH_P_ALL},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR, Ifindex: kb.ifb.Attrs().Index,
		}},
	}
	if err := netlink.FilterAdd(redirect); err != nil {
		return nil, fmt.Errorf("netbuffer: kernel buffer: redirect %s to %s: %w (CONFIG_NET_CLS_MATCHALL, CONFIG_NET_ACT_MIRRED)", tap, ifbName, err)
	}
	ok = true
	return kb, nil
}

// plug sends one plug action.
func (kb *KernelBuffer) plug(action int32) error {
	if _, err := plugRequest(kb.ifb.Attrs().Index, false, PlugOptions{Action: action}).Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("netbuffer: plug action %d on %s: %w", action, kb.ifb.Attrs().Name, err)
	}
	return nil
}

// Hold starts holding: what the guest sends from now on waits for Cut and
// Commit.
func (kb *KernelBuffer) Hold() error {
	kb.mu.Lock()
	defer kb.mu.Unlock()
	if kb.holding {
		return nil
	}
	// BUFFER after RELEASE_INDEFINITE starts a new, empty epoch.
	if err := kb.plug(PlugBuffer); err != nil {
		return err
	}
	kb.holding, kb.cut = true, 0
	return nil
}

// Cut closes epoch: what the guest sent so far goes out at Commit(epoch).
// Only one epoch may be closed and not yet committed.
func (kb *KernelBuffer) Cut(epoch uint64) error {
	kb.mu.Lock()
	defer kb.mu.Unlock()
	if !kb.holding {
		return nil
	}
	if kb.cut != 0 {
		return fmt.Errorf("netbuffer: kernel buffer: cut epoch %d with epoch %d not yet committed: sch_plug holds one epoch in flight (use --max-in-flight 1)", epoch, kb.cut)
	}
	if err := kb.plug(PlugBuffer); err != nil {
		return err
	}
	kb.cut = epoch
	return nil
}

// Commit releases the closed epoch if it is epoch or older.
func (kb *KernelBuffer) Commit(epoch uint64) error {
	kb.mu.Lock()
	defer kb.mu.Unlock()
	if !kb.holding || kb.cut == 0 || kb.cut > epoch {
		return nil
	}
	if err := kb.plug(PlugReleaseOne); err != nil {
		return err
	}
	kb.cut = 0
	return nil
}

// PassThrough releases everything and stops holding.
func (kb *KernelBuffer) PassThrough() error {
	kb.mu.Lock()
	defer kb.mu.Unlock()
	if !kb.holding {
		return nil
	}
	if err := kb.plug(PlugReleaseIndefinite); err != nil {
		return err
	}
	kb.holding, kb.cut = false, 0
	return nil
}

// Close lets everything through and removes the redirect, the ingress qdisc
// and the IFB device.
func (kb *KernelBuffer) Close() error {
	kb.mu.Lock()
	defer kb.mu.Unlock()
	if kb.closed {
		return nil
	}
	kb.closed = true
	return kb.teardown()
}

func (kb *KernelBuffer) teardown() error {
	var errs []error
	if kb.madeIngress {
		ingress := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: kb.tap.Attrs().Index, Parent: netlink.HANDLE_INGRESS,
			Handle: netlink.MakeHandle(0xffff, 0)}}
		if err := netlink.QdiscDel(ingress); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("remove ingress qdisc: %w", err))
		}
	}
	if kb.ifb != nil {
		if err := netlink.LinkDel(kb.ifb); err != nil {
			errs = append(errs, fmt.Errorf("remove IFB: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("netbuffer: kernel buffer: %w", err)
	}
	return nil
}

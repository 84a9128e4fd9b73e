// Package netbuffer sits between a protected guest's NIC and the network and
// will hold back the guest's outbound traffic until the checkpoint that
// produced it is safe on the backup: Remus output commit.
//
// # Why output is held
//
// The primary runs ahead of its last checkpoint. If it fails, the backup
// resumes from the last acknowledged epoch and re-executes the rest, so
// anything the guest sent during an epoch that never reached the backup
// would be visible to the world without being part of the state the world
// continues with. Output commit closes that gap: frames the guest sends
// during epoch N leave the host only after the backup acknowledged epoch N.
// Inbound frames are delivered at once; a lost inbound frame looks to the
// guest like a network drop, which its protocols already handle.
//
// The kernel's sch_plug qdisc could hold the frames on a tap, but it is not
// available on every host (it is missing on our build machines), so the
// buffering is done here, in user space, on the frames themselves.
//
// # Wiring
//
// QEMU gets the guest's NIC backend from a unix socket that this package
// listens on:
//
//	-netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH
//	-device virtio-net-pci,netdev=n0
//
// QEMU connects as a client (ListenUnix, then AcceptGuest); both directions
// carry Ethernet frames, each preceded by its length as a 4-byte big-endian
// integer (stream.go holds that format, in one place). A Relay copies the
// frames between that connection and a host-side FramePort: a Tap in the
// host's network, or another stream-format socket.
//
// # What exists now
//
// The wire format (WriteFrame, AppendFrame, FrameReader), tap devices
// (OpenTap), StreamPort, and a Relay that copies frames both ways with no
// buffering, counting them per direction. Holding outbound frames per epoch
// and releasing them on the backup's acknowledgement come later and will be
// driven by the checkpoint pipeline.
package netbuffer

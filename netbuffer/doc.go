// Package netbuffer sits between a protected guest's NIC and the network and
// holds back the guest's outbound traffic until the checkpoint that produced
// it is safe on the backup: Remus output commit.
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
// # Epoch boundaries
//
// Epoch N is what the guest did up to the pause that checkpoints it, so a
// frame belongs to N exactly when the guest sent it before that pause. The
// checkpoint loop calls Cut(N) after QMP stop has returned and before cont.
// The guest's vCPUs are stopped then and the NIC emits nothing new, but
// frames it sent just before the stop can still be in flight: in the
// socket's receive queue, half written (QEMU writes a frame whole unless the
// socket is full, and then finishes it from its main loop, paused guest or
// not), or in QEMU's own queue for the socket. Cut therefore has the
// Relay's reader (the only goroutine that reads the guest's socket) read
// until the socket's receive queue is empty (SIOCINQ) and no frame is
// half-read, tag all of it N, and only then open N+1; the reader is woken
// from a blocking read for that by a read deadline, and decodes the stream
// incrementally so that it can stop between any two bytes. Anything still
// in QEMU's queue is read after the cut and goes with N+1: a frame may be
// released later than its epoch, never earlier. Frames read in Holding mode
// go to the open epoch; Commit(N) releases those of every epoch up to N in
// the order the guest sent them.
//
// # Bounded memory
//
// The Relay holds at most a cap of bytes (WithHoldCap). At the cap it stops
// reading the guest's socket, so QEMU's writes back up into the guest, which
// waits for the next commit instead of anything being dropped; Status
// reports it. The cap is checked before each read of up to 64 KiB, and a
// cut reads what was in flight in the socket even at the cap, so the bytes
// held stay below the cap plus one read plus the socket's receive buffer.
//
// # Modes
//
// In PassThrough mode (no backup yet, or the backup was lost and the guest
// runs on unprotected) outbound frames go straight through; Status says so.
// Hold starts holding with a new protection session; PassThrough releases
// what was held, in order, when a session ends.
//
// # Wiring
//
// QEMU gets the guest's NIC backend from a unix socket, as a server
// (remusd dials it, so the VM can run before remusd attaches and keep its
// NIC across remusd restarts) or as a client (ListenUnix, then
// AcceptGuest):
//
//	-netdev stream,id=n0,server=on,addr.type=unix,addr.path=PATH
//	-device virtio-net-pci,netdev=n0
//
// Both directions carry Ethernet frames, each preceded by its length as a
// 4-byte big-endian integer (stream.go holds that format, in one place). A
// Relay copies the frames between that connection and a host-side
// FramePort: a Tap in the host's network (OpenTapIn for one in another
// network namespace), or another stream-format socket.
package netbuffer

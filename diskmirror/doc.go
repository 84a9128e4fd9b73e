// Package diskmirror replicates a protected guest's disk with epoch
// semantics: after a failover the backup's disk holds exactly the writes
// of the committed epochs.
//
// On the primary, QEMU mirrors the guest's disk to an NBD export that
// remusd serves (blockdev-add driver nbd, then blockdev-mirror with sync
// full and copy-mode write-blocking): a guest write completes only once its
// copy reached remusd. Server implements the part of NBD that a mirror
// target needs (nbd.go holds the wire format). The writes are recorded per
// epoch (Recorder): those received before the pause of epoch N (which
// drains QEMU's I/O before the device state is saved) belong to N and are
// shipped with it. On the backup a Journal holds an epoch's writes (in
// memory up to a bound, then in a file) and applies them to the disk image
// at its commit, in order; a failover discards the uncommitted ones.
package diskmirror

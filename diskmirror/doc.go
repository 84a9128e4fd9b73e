// Package diskmirror replicates a protected guest's disk with epoch
// semantics: after a failover the backup's disk holds exactly the writes
// of the committed epochs.
//
// On the primary, QEMU mirrors the guest's disk to an NBD export that
// remusd serves (blockdev-add driver nbd, then blockdev-mirror with sync
// full and copy-mode write-blocking): a guest write completes only once its
// copy reached remusd. Server implements the part of NBD that a mirror
// target needs (nbd.go holds the wire format). It refuses a request that
// reaches past the export with the error the NBD spec names (ENOSPC for
// WRITE and WRITE_ZEROES, EINVAL for TRIM and READ) and ends a connection
// that sends more than MaxRequestLength of data in one request, before
// allocating anything for it. The writes are recorded per epoch
// (Recorder): those received before the pause of epoch N (which drains
// QEMU's I/O before the device state is saved) belong to N and are shipped
// with it.
//
// # The backup's journal
//
// On the backup a Journal holds an epoch's writes and applies them to the
// disk image at its commit; a failover discards the uncommitted ones.
//
// Writes of the initial copy (Direct, epoch 0) are applied at once.
// An epoch's writes are held: their data in memory up to
// JournalLimits.Memory, beyond that in the journal file, up to
// JournalLimits.Spill bytes there and JournalLimits.Writes writes in all.
// A write past a bound, or one the journal file's file system has no room
// for (ENOSPC), is refused with ErrJournalFull: nothing of it is held, the
// epoch cannot commit (ErrIncomplete) and the caller refuses it and calls
// Discard. Every write is checked against the image's size when it is
// recorded and again when it is applied; one that does not fit is refused
// with a *RangeError (ErrOutOfRange) and never grows the image.
//
// Commit reaches the image in three steps:
//
//  1. It checks first: the epoch is complete, the image's size is the one
//     it had when opened, every write fits. If not, nothing is applied.
//  2. It writes the held writes to the image in the order they arrived
//     (a later write over an earlier one wins, as in the guest), data with
//     pwrite and zeroes by punching a hole.
//  3. It fsyncs the image once (which also makes the initial copy
//     durable), then empties the journal.
//
// Commit returning nil means the image holds the epoch whole, durably.
// If a write, a read of the journal file or the fsync fails midway, Commit
// returns an error matching ErrTornImage that says how far it got, and
// keeps the epoch: the image holds part of it. Commit again replays the
// epoch from its first write; the writes carry their data and apply in
// the same order, so a replay over a partly applied epoch leaves the same
// image as one clean pass. If the caller discards the epoch instead, the
// image holds writes no commit will complete: Commit refuses every later
// epoch (ErrTornImage) until a new session's initial copy (the first
// Direct after a Discard) rewrites the whole image. A failed write or
// fsync of the initial copy blocks commits the same way.
//
// A crash midway (remusd or the backup host dying inside Commit) leaves
// the image with part of an epoch and no replay: the journal file is
// scratch space for one epoch's spilled data, neither fsynced nor a
// complete record (the in-memory part is lost with the process), and it
// is truncated when reused. That is safe because nothing resumes from a
// backup's state after a restart: a restarted backup holds no committed
// checkpoint (the RAM image and device state are per session as well),
// and a new session starts with a full initial copy that rewrites the
// image before its first epoch commits.
package diskmirror

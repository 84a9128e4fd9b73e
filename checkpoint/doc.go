// Package checkpoint runs the Remus epoch protocol: the primary's epoch loop
// and the backup's apply-whole-or-nothing commit.
//
// Every epoch the primary pauses the guest (QMP stop), harvests the pages
// written since the previous epoch from the shared guest RAM, saves the
// device state (xen-save-devices-state), resumes the guest (cont), and only
// then ships the epoch to the backup: the guest runs on speculatively while
// epoch N is in flight. Epoch N is committed when the backup acknowledges
// that it holds all of it; the backup applies an epoch to its RAM image only
// once the whole epoch arrived and verified, and the guest's output of epoch
// N leaves only after that acknowledgement.
//
// # State machines and drivers
//
// The protocol's decisions live in two pure state machines, in the manner
// of etcd's raft: they take events (with the time), return actions, do no
// I/O, start no goroutines and never read the clock.
//
//   - Session (the primary): the hello, the step before the first epoch
//     (the disk's initial copy), which epoch is due and how many are in
//     flight (Pipeline), which ack commits which epoch and releases its
//     output, the failure detector on the backup's frames, and how the
//     session ends. Its state table is on the type.
//   - Standby (the backup): which connection is the session (only one that
//     said hello), when an epoch may be applied and acknowledged, and when
//     to resume the guest: only a whole epoch of the current session, only
//     after silence from a primary that never said goodbye, or its
//     handover. Its state table is on the type.
//
// Primary.Run and Backup.Run (Serve for one connection) are the drivers:
// they read frames, take checkpoints, stage and apply epochs, and feed the
// machines what happened. Because the machines are pure, every interleaving
// (a primary dying at each step of an epoch, a lost ack, a port scan, a
// restart) is a deterministic test: see the *_test.go files and the
// simulation scripts under testdata/sim.
//
// # How a session ends
//
// Every end is said to the other side, in an Error frame whose code names
// it (transport.CodeGoodbye, CodeTakeOver, CodeFailedOver):
//
//	primary: planned stop or local error, guest running
//	         -> goodbye; the backup confirms and will not resume; the guest's
//	            held output is released and it runs on unprotected
//	primary: the guest is stuck (stop, save or cont failed or timed out)
//	         and an epoch is committed
//	         -> the guest is killed here, then a takeover goodbye: the backup
//	            resumes the committed epoch at once
//	backup:  an epoch failed to verify or to apply, a mismatched hello
//	         -> an error; nothing is resumable until a new session commits
//	backup:  it already resumed the guest
//	         -> failed-over to any primary that says hello: that primary
//	            kills its copy of the guest
//	silence: the backup hears nothing for the heartbeat timeout from a
//	         primary that said hello and no goodbye
//	         -> the backup resumes its last committed epoch of that session;
//	            the primary, not hearing the backup, runs on unprotected
//	            (hosts are assumed to fail-stop)
package checkpoint

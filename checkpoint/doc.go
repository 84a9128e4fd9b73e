// Package checkpoint runs the Remus epoch loop on the primary and applies
// epochs on the backup.
//
// Every epoch the primary pauses the guest (QMP stop), harvests the pages
// written since the previous epoch from the shared guest RAM, saves the
// device state (xen-save-devices-state), resumes the guest (cont), and only
// then ships the epoch to the backup: the guest runs on speculatively while
// epoch N is in flight. Epoch N is committed when the backup acknowledges
// that it holds all of it; the backup applies an epoch to its RAM image only
// once the whole epoch arrived and verified.
//
// The bookkeeping (which epoch is due, how many are in flight, which ack
// commits which epoch) is a pure state machine, Pipeline, so every
// interleaving is a table test; the drivers around it do the I/O.
package checkpoint

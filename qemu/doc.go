// Package qemu is the one place where remus-kvm tells QEMU what to do. It
// sits on package qmp (the protocol client) and holds:
//
//   - typed QMP commands instead of map[string]any arguments: stop, cont,
//     quit, query-status, query-commands, announce-self, the QOM queries
//     that find the guest RAM backend (FindRAMBackend),
//     xen-save-devices-state, migrate-set-capabilities, migrate,
//     migrate-incoming, the block nodes and the mirror job (blockdev-add,
//     blockdev-del, blockdev-mirror, query-named-block-nodes,
//     query-block-jobs, block-job-cancel);
//   - the two waits on QEMU: WaitMigration (query-migrate until a migration
//     in either direction completed or failed) and PollBlockJob
//     (query-block-jobs until the caller is satisfied with a job's state);
//   - what depends on the QEMU version or on QEMU's formats: the migration
//     URI forms (OutgoingURI, IncomingURI: file: from 8.2 on, exec:cat
//     before), how a device state is saved (DeviceSaver) and how a saved one
//     must be loaded (the savevm header: StateFormat, RestoreArgs).
//
// Every command takes a Monitor, which *qmp.Client is; tests pass a fake.
// The callers are the epoch loop (package checkpoint: stop, save, cont), the
// backup's takeover (package failover, internal/agent: load and resume) and
// remusd's start-up and disk mirror (internal/agent). Errors are QMP's own
// (*qmp.Error) or say which command failed; callers add what they were
// doing.
package qemu

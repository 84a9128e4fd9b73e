package daemon

import (
	"encoding/json"
	"time"

	"github.com/remus-kvm/remus/libvirtdom"
)

// The daemon's APIs: JSON over HTTP.
//
// The control API, on a unix socket (mode 0660: root and --group), is
// remusctl's:
//
//	GET  /v1/vms                     []VMStatus, every VM this daemon protects or stands by for
//	GET  /v1/vms/{name}              VMStatus
//	POST /v1/vms/{name}/protect      ProtectRequest → VMStatus (the agents started; the first sync runs);
//	                                 409 Refusal when the domain cannot be protected, with the fixes
//	POST /v1/vms/{name}/unprotect    → Result, once both hosts ended protection
//	POST /v1/vms/{name}/switchover   → Result, once the guest runs on the backup
//	POST /v1/hook                    HookEvent → 202 at once (the libvirt hook hands events off here)
//	GET  /metrics                    Prometheus metrics: the daemon's and each agent's remus_* ones
//
// The peer API, on TCP (--listen), is the other host's daemon's; each
// request carries an AuthHeader made with the hosts' shared key:
//
//	GET  /v1/peer/hello              Hello
//	POST /v1/peer/standby            StandbyRequest → StandbyReply: the standby domain defined and started,
//	                                 the backup agent listening
//	POST /v1/peer/release            ReleaseRequest → Result: the backup agent stopped, the standby domain
//	                                 destroyed and undefined (never a domain that runs the guest)
//	GET  /v1/peer/vms/{name}         VMStatus
//
// Errors are {"error": "..."} with a 4xx or 5xx status.
const (
	pathVMs     = "/v1/vms"
	pathHook    = "/v1/hook"
	pathMetrics = "/metrics"
	pathHello   = "/v1/peer/hello"
	pathStandby = "/v1/peer/standby"
	pathRelease = "/v1/peer/release"
	pathPeerVMs = "/v1/peer/vms"
)

// Roles of a VM on a host.
const (
	RolePrimary = "primary" // the guest runs here; the agent checkpoints it
	RoleBackup  = "backup"  // the standby domain waits here; the agent holds the last checkpoint
)

// VM states, as VMStatus.State says them.
const (
	StateStarting     = "starting"      // the agent was started and does not answer yet
	StateSyncing      = "syncing"       // the first copy of guest RAM to the backup runs
	StateProtected    = "protected"     // epochs commit on the backup
	StateUnprotected  = "unprotected"   // the guest runs here without a backup (Why says why)
	StateStopped      = "stopped"       // the guest is stopped here (no witness lease and no backup)
	StateStandby      = "standby"       // backup: holds a committed epoch, resumable
	StateWaiting      = "waiting"       // backup: no epoch committed yet
	StateFailingOver  = "failing-over"  // backup: the primary was lost; resuming the guest here
	StateFailedOver   = "failed-over"   // backup: the guest runs here now
	StateSwitchedOver = "switched-over" // primary: the guest was handed to the backup
	StateEnded        = "ended"         // the agent exited; Why says how
	StateFailed       = "failed"        // the agent exits again and again, or cannot start
)

// VMStatus is one VM as a daemon sees it.
type VMStatus struct {
	Name string `json:"name"`
	Role string `json:"role"`
	// Domain is the libvirt domain the agent serves (the standby domain on
	// a backup).
	Domain string `json:"domain"`
	State  string `json:"state"`
	Why    string `json:"why,omitempty"`
	// Peer is the other host's daemon.
	Peer     string    `json:"peer"`
	AgentPID int       `json:"agent_pid,omitempty"`
	Since    time.Time `json:"agent_since,omitzero"`
	Restarts int       `json:"agent_restarts,omitempty"`
	// Agent is what the agent answered on its control socket
	// (agent.PrimaryStatus or agent.BackupStatus), absent when it did not.
	Agent json.RawMessage `json:"agent,omitempty"`
	// PeerView is the VM as the peer's daemon sees it (GET /v1/vms/NAME
	// only), or PeerError why it could not be asked.
	PeerView  *VMStatus `json:"peer_view,omitempty"`
	PeerError string    `json:"peer_error,omitempty"`
}

// ProtectRequest asks the primary host's daemon to protect a running
// domain.
type ProtectRequest struct {
	// Peer is the backup host's daemon, HOST[:PORT] (port: DefaultPeerPort).
	Peer string `json:"peer"`
	// Epoch is the checkpoint interval (0: remusd's default).
	Epoch time.Duration `json:"epoch,omitempty"`
	// Tap and PeerTap are the tap devices the guest's NIC is relayed to on
	// this host and on the backup (for a domain whose NIC is a -netdev
	// stream socket); Netns and PeerNetns their network namespaces
	// (paths), "" for the daemon's own.
	Tap       string `json:"tap,omitempty"`
	PeerTap   string `json:"peer_tap,omitempty"`
	Netns     string `json:"netns,omitempty"`
	PeerNetns string `json:"peer_netns,omitempty"`
}

// Refusal is the answer (409) to a protect request the domain cannot
// take: the error and, when the domain's definition is at fault, each
// problem with the XML that fixes it.
type Refusal struct {
	Error    string               `json:"error"`
	Problems []libvirtdom.Problem `json:"problems,omitempty"`
}

// Result is the answer to unprotect, switchover and release.
type Result struct {
	Result string `json:"result"`
	// Complete: everything the request asked was done (for unprotect: the
	// backup confirmed and its standby is gone).
	Complete bool    `json:"complete"`
	TookMS   float64 `json:"took_ms"`
}

// HookEvent is what the libvirt hook hands the daemon: libvirt's
// arguments (domain, operation, sub-operation) and the domain's XML from
// its standard input.
type HookEvent struct {
	Domain string `json:"domain"`
	Op     string `json:"op"`
	SubOp  string `json:"sub_op"`
	XML    string `json:"xml"`
}

// Hello is what a daemon says of itself to its peer.
type Hello struct {
	Host string `json:"host"`
	// Version of remus-kvm's peer API.
	API int `json:"api"`
	// HypervisorVersion is libvirt's QEMU version (major*1e6+minor*1e3+micro).
	HypervisorVersion uint64 `json:"hypervisor_version"`
	LibvirtVersion    uint64 `json:"libvirt_version"`
}

// APIVersion is this daemon's peer API version.
const APIVersion = 1

// StandbyRequest asks the backup host's daemon to stand by for a domain.
type StandbyRequest struct {
	VM string `json:"vm"`
	// XML is the primary domain's inactive XML.
	XML string `json:"xml"`
	// Primary is the primary host's daemon as the backup reaches it.
	Primary string `json:"primary"`
	// QEMUVersion is the version of the QEMU that runs the guest
	// (MAJOR.MINOR.MICRO): the backup refuses a standby QEMU of another.
	QEMUVersion string `json:"qemu_version,omitempty"`
	// DeviceStateXen: the primary agent saves device state with
	// xen-save-devices-state (libvirtdom.StandbyOptions.DeviceStateXen).
	DeviceStateXen bool   `json:"device_state_xen"`
	Tap            string `json:"tap,omitempty"`
	Netns          string `json:"netns,omitempty"`
	// Disk is the guest's writable disk, mirrored: the backup keeps a raw
	// image of it for the standby domain.
	Disk *StandbyDisk `json:"disk,omitempty"`
}

// StandbyDisk is the disk the primary mirrors.
type StandbyDisk struct {
	Target   string `json:"target"`   // its target in the domain (vda)
	Capacity uint64 `json:"capacity"` // its size as the guest sees it, bytes
}

// StandbyReply says where the backup agent listens.
type StandbyReply struct {
	// AgentPort is the backup agent's TCP port on the backup host.
	AgentPort int `json:"agent_port"`
	// Domain is the standby domain's name.
	Domain string `json:"domain"`
}

// ReleaseRequest asks the backup host's daemon to stop standing by.
type ReleaseRequest struct {
	VM string `json:"vm"`
}

type apiError struct {
	Error string `json:"error"`
}

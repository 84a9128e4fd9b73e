package daemon

import (
	"context"
	"encoding/json"
	"net/http"

	"github.com/remus-kvm/remus/internal/agent"
)

// status describes v: the record, and what its agent says on its control
// socket when it runs.
func (d *Daemon) status(ctx context.Context, v *vm) VMStatus {
	r := v.snapshot()
	st := VMStatus{Name: r.Name, Role: r.Role, Domain: r.Domain, Peer: r.Peer, Restarts: r.Restarts}
	if !v.alive() {
		st.State, st.Why = r.EndState, r.Ended
		if st.State == "" {
			st.State = StateEnded
		}
		return st
	}
	st.AgentPID, st.Since = r.PID, r.Since
	if r.Relay {
		st.State, st.Why = StateUnprotected, r.Ended+": remusd relays the guest's NIC, nothing held (remusctl protect protects it again)"
		return st
	}
	var raw []byte
	if err := agent.CallControl(ctx, r.Control, http.MethodGet, agent.ControlStatusPath, agentTimeout, &raw); err != nil {
		st.State, st.Why = StateStarting, "the agent does not answer on its control socket yet: "+err.Error()
		return st
	}
	st.Agent = json.RawMessage(raw)
	st.State, st.Why = agentState(raw)
	return st
}

// agentState maps an agent's status (agent.PrimaryStatus or
// agent.BackupStatus) to the VM's state.
func agentState(raw []byte) (string, string) {
	var a struct {
		State string `json:"state"`
		Why   string `json:"why"`
	}
	if err := json.Unmarshal(raw, &a); err != nil {
		return StateStarting, "the agent's status is unreadable: " + err.Error()
	}
	switch a.State {
	case "":
		return StateStarting, "the agent's status says no state"
	case "protecting":
		return StateProtected, a.Why
	case "failover-failed":
		return StateFailed, a.Why
	}
	return a.State, a.Why
}

package daemon

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/remus-kvm/remus/internal/agent"
)

// Metrics: GET /metrics on the control socket serves the daemon's own
//
//	remus_daemon_agent_up{vm,role}            gauge   1 while the VM's agent process runs
//	remus_daemon_agent_restarts_total{vm,role} counter times the daemon started it again after it died
//
// and, merged in, the remus_* metrics of every running agent (labelled vm;
// see internal/agent's metrics.go): one scrape per host covers all its VMs.
// An agent that does not answer is left out of that scrape.

var (
	descUp       = prometheus.NewDesc("remus_daemon_agent_up", "1 while the VM's agent process runs, else 0.", []string{"vm", "role"}, nil)
	descRestarts = prometheus.NewDesc("remus_daemon_agent_restarts_total", "Times the daemon started the VM's agent again after it died.", []string{"vm", "role"}, nil)
)

type daemonCollector struct{ d *Daemon }

func (c daemonCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descUp
	ch <- descRestarts
}

func (c daemonCollector) Collect(ch chan<- prometheus.Metric) {
	for _, v := range c.d.list() {
		r := v.snapshot()
		up := 0.0
		if v.alive() {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up, r.Name, r.Role)
		ch <- prometheus.MustNewConstMetric(descRestarts, prometheus.CounterValue, float64(r.Restarts), r.Name, r.Role)
	}
}

func (d *Daemon) newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), daemonCollector{d})
	return reg
}

// gatherer is the daemon's registry and each running agent's metrics.
func (d *Daemon) gatherer() prometheus.Gatherer {
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		gs := prometheus.Gatherers{d.reg}
		for _, v := range d.list() {
			if !v.alive() {
				continue
			}
			r := v.snapshot()
			gs = append(gs, prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
				return agentMetrics(r.Control)
			}))
		}
		return gs.Gather()
	})
}

// agentMetrics reads an agent's remus_* metrics from its control socket.
func agentMetrics(control string) ([]*dto.MetricFamily, error) {
	ctx, cancel := context.WithTimeout(context.Background(), agentTimeout)
	defer cancel()
	var raw []byte
	if err := agent.CallControl(ctx, control, http.MethodGet, agent.MetricsPath, agentTimeout, &raw); err != nil {
		return nil, fmt.Errorf("agent metrics at %s: %w", control, err)
	}
	var p expfmt.TextParser
	fams, err := p.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("agent metrics at %s: %w", control, err)
	}
	var out []*dto.MetricFamily
	for name, f := range fams {
		if strings.HasPrefix(name, "remus_") {
			out = append(out, f)
		}
	}
	return out, nil
}

"""The agent's Prometheus metrics, in its own registry, served on /metrics (aiohttp)."""
from __future__ import annotations

from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _KernelCounters:
    """Reads the per-CPU counters map at scrape time (no polling loop)."""

    def __init__(self, read: Callable[[], dict[str, int]], read_costs: Callable[[], dict[str, list[int]]] | None):
        self._read = read
        self._read_costs = read_costs

    def collect(self):
        from shoal.agent.mapsync import histogram_quantile
        values = self._read()
        family = CounterMetricFamily("shoal_agent_bpf_events", "Data-path events counted in the kernel",
                                     labels=["event"])
        for name, value in values.items():
            if not name.endswith(("_ns", "_runs")) and name != "ringbuf_lost":
                family.add_metric([name], value)
        yield family
        lost = CounterMetricFamily("shoal_agent_flow_events_lost", "Flow events the ring buffer could not take")
        lost.add_metric([], values.get("ringbuf_lost", 0))
        yield lost
        cost = GaugeMetricFamily("shoal_agent_capture_cost_nanoseconds",
                                 "In-kernel time per captured/balanced socket operation or steered packet",
                                 labels=["program", "stat"])
        histograms = self._read_costs() if self._read_costs else {}
        for program in ("connect", "sockops", "tc"):
            runs = values.get(f"{program}_runs", 0)
            if runs:
                cost.add_metric([program, "mean"], values.get(f"{program}_ns", 0) / runs)
            for label, quantile in (("p50", 0.5), ("p99", 0.99)):
                figure = histogram_quantile(histograms.get(program, []), quantile)
                if figure is not None:
                    cost.add_metric([program, label], figure)
        yield cost


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry, read_kernel_counters: Callable[[], dict[str, int]],
                 read_cost_histograms: Callable[[], dict[str, list[int]]] | None = None):
        self.registry = registry
        registry.register(_KernelCounters(read_kernel_counters, read_cost_histograms))
        self.enrolled_pods = Gauge("shoal_agent_enrolled_pods", "Meshed pods enrolled on this node",
                                   registry=registry)
        self.enrol_failures = Gauge("shoal_agent_enrolment_pending", "Meshed pods not enrolled yet (retrying)",
                                    registry=registry)
        self.map_entries = Gauge("shoal_agent_map_entries", "Entries the agent keeps in each map",
                                 ["map"], registry=registry)
        self.map_sync_seconds = Histogram("shoal_agent_map_sync_seconds",
                                          "Time from a config push received to the kernel maps updated",
                                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
                                          registry=registry)
        self.policies_skipped = Gauge("shoal_agent_policy_rules_not_in_kernel",
                                      "DENY rules left to the proxy (not pure L4)", registry=registry)
        self.flow_events = Counter("shoal_agent_flow_events", "Kernel flow events delivered", registry=registry)
        self.flow_events_malformed = Counter("shoal_agent_flow_events_malformed",
                                             "Ring-buffer records that failed to decode", registry=registry)
        self.capture_drift = Counter("shoal_capture_drift", "Capture found out of place by the audit "
                                     "(cgroup_program, tc_filter, sk_lookup, proxy_listener, netns_replaced)",
                                     ["kind"], registry=registry)
        self.capture_repaired = Counter("shoal_capture_drift_repaired", "Drift the audit put back",
                                        ["kind"], registry=registry)
        self.capture_audit_seconds = Gauge("shoal_capture_audit_seconds", "Duration of the last capture audit pass",
                                           registry=registry)
        self.config_rejected = Counter("shoal_agent_config_rejected", "Resources rejected from the config stream",
                                       ["type"], registry=registry)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        async def metrics(_request: web.Request) -> web.Response:
            body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def ready(_request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner

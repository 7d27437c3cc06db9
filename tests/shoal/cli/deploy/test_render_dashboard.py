"""The Grafana dashboard: valid, laid out, and every metric it queries is one Shoal exports."""
import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from shoal.agent.hubble import HubbleConfig, HubbleServer
from shoal.controller.relay import Relay
from shoal.flows.emitter import FlowEmitter

ROOT = Path(__file__).resolve().parents[4]
DASHBOARD = ROOT / "daemonset" / "dashboards" / "shoal.json"
METRIC = re.compile(r"\b((?:istio|hubble|shoal)_[a-z_]+?)(?:_bucket|_total)?\b(?=[{\[(\s/)]|$)")


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    server = HubbleServer(HubbleConfig(node_name="n", tcp_address=None), None, registry=registry)
    server.record_lost(1, 1)
    server.metrics.count_kernel("tc", "DROPPED", 133, "TCP")   # families without samples are not listed
    Relay([], registry=registry)
    FlowEmitter("/nonexistent", registry=registry)._drop("test")
    text = generate_latest(registry).decode()
    names = {re.sub(r"_total$", "", line.split()[2]) for line in text.splitlines() if line.startswith("# TYPE")}
    # Istio metrics come from the node proxy and the waypoint: they name them in their telemetry.
    for module in ("agent/ztunnel/telemetry.py", "waypoint/telemetry.py"):
        names |= set(re.findall(r"\"(istio_[a-z_]+)\"", (ROOT / module).read_text()))
    return names


def test_dashboard_panels_are_laid_out_and_query_known_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 8
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
    known = exported_names()
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("request", "tcp", "mtls", "drops by reason", "lost"):
        assert wanted in titles
    for panel in panels:
        for target in panel["targets"]:
            used = set(METRIC.findall(target["expr"]))
            assert used, target["expr"]
            assert used <= known, f"{panel['title']}: unknown metrics {used - known}"

"""One node proxy's pages from its workers' pages (pure)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shoal.agent.ztunnel.aggregate import merge_certs, merge_connections, merge_expositions


def worker_exposition(opened: int, active: int, pods: int, latency: float) -> str:
    registry = CollectorRegistry()
    Counter("istio_tcp_connections_opened", "opened", ["reporter"], registry=registry).labels("source").inc(opened)
    Gauge("shoal_proxy_active_connections", "live", ["reporter"], registry=registry).labels("source").set(active)
    Gauge("shoal_proxy_enrolled_pods", "pods", registry=registry).set(pods)
    Histogram("shoal_setup_seconds", "setup", registry=registry).observe(latency)
    return generate_latest(registry).decode()


def samples(text: bytes) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_counters_and_live_gauges_add_up_node_wide_gauges_do_not():
    merged = samples(merge_expositions([worker_exposition(3, 1, 4, 0.01), worker_exposition(5, 2, 4, 0.5)]))
    assert merged[("istio_tcp_connections_opened_total", (("reporter", "source"),))] == 8
    assert merged[("shoal_proxy_active_connections", (("reporter", "source"),))] == 3
    assert merged[("shoal_proxy_enrolled_pods", ())] == 4          # every worker serves every pod
    assert merged[("shoal_setup_seconds_count", ())] == 2
    assert merged[("shoal_setup_seconds_bucket", (("le", "0.025"),))] == 1


def test_the_merge_keeps_names_and_types_dashboards_use():
    one = worker_exposition(3, 1, 4, 0.01)
    text = merge_expositions([one]).decode()
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
    assert samples(text.encode()) == samples(one.encode())      # one worker: the very same series


def test_series_only_one_worker_has_are_kept():
    registry = CollectorRegistry()
    Counter("shoal_proxy_worker_restarts", "restarts", registry=registry).inc()
    merged = samples(merge_expositions([worker_exposition(1, 0, 1, 0.1), generate_latest(registry).decode()]))
    assert merged[("shoal_proxy_worker_restarts_total", ())] == 1
    assert merged[("istio_tcp_connections_opened_total", (("reporter", "source"),))] == 1


def test_admin_pages_name_the_worker_of_each_entry():
    pages = {0: {"connections": [{"src": "a"}], "pool": [], "inbound_hbone_sessions": 1},
             1: {"connections": [{"src": "b"}], "pool": [{"dst": "x"}], "inbound_hbone_sessions": 2}}
    merged = merge_connections(pages)
    assert merged["connections"] == [{"src": "a", "worker": 0}, {"src": "b", "worker": 1}]
    assert merged["pool"] == [{"dst": "x", "worker": 1}] and merged["inbound_hbone_sessions"] == 3
    certs = merge_certs({0: {"certificates": [{"identity": "i"}], "rotations": 1},
                         1: {"certificates": [{"identity": "i"}], "rotations": 2}})
    assert certs == {"certificates": [{"identity": "i", "worker": 0}, {"identity": "i", "worker": 1}], "rotations": 2}

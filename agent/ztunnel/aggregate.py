"""One node proxy seen from outside, however many workers it runs: the supervisor merges
its workers' Prometheus expositions and admin pages here. Pure (text in, text out).

Metrics keep their names and labels, so dashboards written for one process do not change:
counters, histograms and per-connection gauges are summed over the workers; gauges that
every worker reports for the whole node (the enrolled pods: each worker serves all of
them) take the maximum; ``*_created`` timestamps the earliest.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Gauges that state a node-wide fact each worker holds in full: the maximum, not the sum.
NODE_WIDE_GAUGES = frozenset({"shoal_proxy_enrolled_pods"})


class _Merged:
    """A collector that yields already merged families (for ``generate_latest``)."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def merge_expositions(texts: Iterable[str], node_wide: frozenset[str] = NODE_WIDE_GAUGES) -> bytes:
    """The text exposition of the sum (see the module docstring) of several expositions."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            if merged.type != family.type:
                raise ValueError(f"metric {family.name}: type {family.type} here, {merged.type} elsewhere")
            by_sample = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in by_sample:
                    by_sample[key] = sample.value
                elif sample.name.endswith("_created"):
                    by_sample[key] = min(by_sample[key], sample.value)
                elif family.type == "gauge" and family.name in node_wide:
                    by_sample[key] = max(by_sample[key], sample.value)
                else:
                    by_sample[key] += sample.value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)


def merge_connections(pages: dict[int, dict]) -> dict:
    """``/connections`` of every worker (by index) as one page; each entry names its worker."""
    return {
        "connections": [{**c, "worker": i} for i, page in sorted(pages.items()) for c in page.get("connections", [])],
        "pool": [{**p, "worker": i} for i, page in sorted(pages.items()) for p in page.get("pool", [])],
        "inbound_hbone_sessions": sum(page.get("inbound_hbone_sessions", 0) for page in pages.values()),
    }


def merge_certs(pages: dict[int, dict]) -> dict:
    """``/certs`` of every worker: each holds the SVIDs its supervisor handed it (the same
    ones); ``rotations`` is what a worker saw, the supervisor's own count replaces it."""
    return {
        "certificates": [{**c, "worker": i} for i, page in sorted(pages.items()) for c in page.get("certificates", [])],
        "rotations": max((page.get("rotations", 0) for page in pages.values()), default=0),
    }

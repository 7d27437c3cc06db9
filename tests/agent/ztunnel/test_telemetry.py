"""Close reports in batches (issue 18): a turn's closes cost one counter update per label
set, one access-log write and one flow datagram, and every connection is still reported."""
from __future__ import annotations

import asyncio
import json
import logging

from prometheus_client import CollectorRegistry

from shoal.agent.ztunnel import telemetry as telemetry_module
from shoal.agent.ztunnel.telemetry import FLAG_RESET, ConnectionRecord, ConnectionTelemetry, ProxyMetrics


class RecordingEmitter:
    def __init__(self) -> None:
        self.calls: list[list] = []

    def emit_many(self, flows: list) -> int:
        self.calls.append(list(flows))
        return len(flows)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(sample.value for metric in registry.collect() for sample in metric.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def _records(count: int) -> list[ConnectionRecord]:
    return [ConnectionRecord("destination", "10.0.0.1", 40000 + i, "10.0.0.2", 80, mtls=True,
                             src_identity="spiffe://cluster.local/ns/a/sa/client", bytes_in=i, bytes_out=2 * i)
            for i in range(count)]


async def test_a_turns_closes_are_reported_together_and_completely(caplog):
    caplog.set_level(logging.INFO, logger="shoal.proxy.access")
    registry = CollectorRegistry()
    emitter = RecordingEmitter()
    telemetry = ConnectionTelemetry(ProxyMetrics(registry), emitter)
    records = _records(300)
    for rec in records:
        telemetry.opened(rec)
    telemetry.send_flows()
    emitter.calls.clear()
    records[7].reset("peer reset")            # one ends differently: its own label set
    for rec in records:
        telemetry.closed(rec)
    assert not telemetry.live and _value(registry, "istio_tcp_connections_closed_total") == 0, \
        "nothing reported before the turn ends"
    await asyncio.sleep(0)
    assert _value(registry, "istio_tcp_connections_closed_total") == 300
    assert _value(registry, "istio_tcp_connections_closed_total", response_flags=FLAG_RESET) == 1
    assert _value(registry, "istio_tcp_received_bytes_total") == sum(range(300))
    assert _value(registry, "istio_tcp_sent_bytes_total") == 2 * sum(range(300))
    assert _value(registry, "shoal_proxy_active_connections", reporter="destination") == 0
    access = [r for r in caplog.records if r.name == "shoal.proxy.access"]
    assert len(access) == 1, "one write for the turn's lines"
    lines = [json.loads(line) for line in access[0].getMessage().splitlines()]
    assert sorted(line["src"] for line in lines) == sorted(f"10.0.0.1:{40000 + i}" for i in range(300))
    telemetry.send_flows()
    assert [len(call) for call in emitter.calls] == [300]


async def test_flows_leave_after_a_short_delay_or_when_a_datagrams_worth_waits():
    emitter = RecordingEmitter()
    telemetry = ConnectionTelemetry(ProxyMetrics(CollectorRegistry()), emitter)
    first = _records(3)
    for rec in first:
        telemetry.opened(rec)
    await asyncio.sleep(0)
    assert emitter.calls == [], "a few opens wait for company"
    await asyncio.sleep(telemetry_module.FLOW_DELAY * 3)
    assert [len(call) for call in emitter.calls] == [3]
    for rec in _records(telemetry_module.FLOW_BATCH):
        telemetry.opened(rec)
    assert [len(call) for call in emitter.calls] == [3, telemetry_module.FLOW_BATCH], "a full batch goes at once"


def test_without_a_running_loop_a_close_is_reported_at_once():
    registry = CollectorRegistry()
    emitter = RecordingEmitter()
    telemetry = ConnectionTelemetry(ProxyMetrics(registry), emitter)
    rec = _records(1)[0]
    telemetry.closed(rec)
    assert _value(registry, "istio_tcp_connections_closed_total") == 1
    assert _value(registry, "istio_tcp_connections_opened_total") == 1   # refused before opening: a pair
    assert [len(call) for call in emitter.calls] == [1]

"""The agent's flow metrics, Hubble's names where Hubble has them.

The hot path bumps plain dict counters (a Prometheus Counter.labels().inc() per kernel
event would cost more than the event itself); this collector reads them at scrape time.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shoal.api.flow import flow_pb2


class HubbleMetrics:
    def __init__(self) -> None:
        # (type, subtype, verdict) -> count, as hubble_flows_processed_total.
        self.processed: dict[tuple[str, str, str], int] = {}
        # (reason, protocol) -> count, as hubble_drop_total.
        self.drops: dict[tuple[str, str], int] = {}
        self.malformed_records = 0
        self.bad_requests = 0
        self.slow_clients_cut = 0
        self.client_disconnects = 0
        self.store = None
        # Raw kernel records counted by their key bytes (see server.RawRecordLayout).
        self.raw_counts: dict[bytes, int] = {}
        self.raw_layout = None
        # Enum numbers -> names, looked up per flow (the enum wrapper's Name() is Python).
        self._type_names = {number: name for name, number in flow_pb2.FlowType.items()}
        self._verdict_names = {number: name for name, number in flow_pb2.Verdict.items()}

    def count_kernel(self, kind: str, verdict: str, drop_reason: int, protocol) -> None:
        key = ("L3_L4", kind, verdict)
        self.processed[key] = self.processed.get(key, 0) + 1
        if verdict == "DROPPED":
            drop = (drop_reason, protocol)
            self.drops[drop] = self.drops.get(drop, 0) + 1

    def count_flow(self, flow: flow_pb2.Flow) -> None:
        kind = self._type_names.get(flow.Type) or flow_pb2.FlowType.Name(flow.Type)
        verdict = self._verdict_names.get(flow.verdict) or flow_pb2.Verdict.Name(flow.verdict)
        subtype = "http" if flow.l7.WhichOneof("record") == "http" else "proxy"
        key = (kind, subtype, verdict)
        self.processed[key] = self.processed.get(key, 0) + 1
        if flow.verdict == flow_pb2.DROPPED:
            protocol = flow.l4.WhichOneof("protocol") or "unknown"
            drop = (int(flow.drop_reason_desc) or flow.drop_reason, protocol)
            self.drops[drop] = self.drops.get(drop, 0) + 1

    def _fold_raw(self) -> tuple[dict, dict]:
        processed, drops = dict(self.processed), dict(self.drops)
        if self.raw_layout is not None:
            for key, value in list(self.raw_counts.items()):
                kind, verdict, reason, protocol = self.raw_layout.describe(key)
                label = ("L3_L4", kind, verdict)
                processed[label] = processed.get(label, 0) + value
                if verdict == "DROPPED":
                    drops[(reason, protocol)] = drops.get((reason, protocol), 0) + value
        return processed, drops

    def collect(self):
        processed_counts, drop_counts = self._fold_raw()
        processed = CounterMetricFamily(
            "hubble_flows_processed", "Flows processed by the node's flow store",
            labels=["type", "subtype", "verdict"])
        for (kind, subtype, verdict), value in processed_counts.items():
            processed.add_metric([kind, subtype, verdict], value)
        yield processed
        drops = CounterMetricFamily("hubble_drop", "Dropped flows by reason", labels=["reason", "protocol"])
        for (reason, protocol), value in drop_counts.items():
            drops.add_metric([_reason_name(reason), _protocol_name(protocol)], value)
        yield drops
        lost = CounterMetricFamily("hubble_lost_events", "Flow events lost, by where", labels=["source"])
        if self.store is not None:
            for source, value in list(self.store.lost_by_source.items()):
                lost.add_metric([flow_pb2.LostEventSource.Name(source)], value)
        yield lost
        for name, doc, value in (
            ("shoal_hubble_malformed_records", "Flow records from proxies/waypoints that did not parse",
             self.malformed_records),
            ("shoal_hubble_bad_requests", "Observer requests rejected as invalid", self.bad_requests),
            ("shoal_hubble_slow_clients_cut", "Follow streams cut because the client fell behind",
             self.slow_clients_cut),
            ("shoal_hubble_client_disconnects", "Streams the client closed before the end",
             self.client_disconnects),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        if self.store is not None:
            yield GaugeMetricFamily("hubble_flows_stored", "Entries in the flow ring", value=len(self.store))
            yield GaugeMetricFamily("hubble_flows_capacity", "Size of the flow ring", value=self.store.capacity)
            seen = CounterMetricFamily("hubble_flows_seen", "Entries ever appended to the flow ring")
            seen.add_metric([], self.store.head)
            yield seen


def _reason_name(reason) -> str:
    try:
        return flow_pb2.DropReason.Name(int(reason))
    except ValueError:
        return str(reason)


def _protocol_name(protocol) -> str:
    names = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMPv4", 58: "ICMPv6"}
    return names.get(protocol, str(protocol).upper()) if isinstance(protocol, int) else str(protocol).upper()

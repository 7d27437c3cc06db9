"""Hubble's output formats for GetFlows responses, without I/O beyond the given streams.

- ``compact``: ``TIME [NODE]: SRC (ID) -> DST (ID) TYPE VERDICT (SUMMARY)``; a reply is
  printed ``DST <- SRC`` so the client stays on the left, an unknown direction ``<>``;
- ``json`` / ``jsonpb``: the whole GetFlowsResponse (``{"flow": {...}, "node_name", "time"}``,
  proto3 JSON mapping with proto field names), one object per line, as current Hubble
  prints both (its flow-only legacy json is gone);
- ``dict``: one ``KEY: value`` block per flow, separated by ``------------``;
- ``table``: aligned columns, written when the printer is closed.
Node status and lost events go to the error stream, as Hubble does.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import TextIO

from google.protobuf import json_format

from shoal.api.flow import flow_pb2
from shoal.api.observer import observer_pb2, relay_pb2
from shoal.flows import records as F

OUTPUTS = ("compact", "json", "jsonpb", "dict", "table")
DICT_SEPARATOR = "------------"

# Cilium's descriptions of the drop reasons Shoal emits (others print as the enum name).
DROP_REASONS = {
    130: "Invalid source mac", 132: "Invalid source ip", 133: "Policy denied",
    134: "Invalid packet", 151: "Stale or unroutable IP", 152: "No matching local container found",
    158: "Service backend not found", 165: "No configuration available to perform policy decision",
    171: "Invalid identity", 178: "Socket lookup failed", 179: "Socket assign failed",
    181: "Policy denied by denylist", 189: "Authentication required",
}
TRACE_POINTS = {value: name for name, value in (
    ("to-endpoint", 0), ("to-proxy", 1), ("to-host", 2), ("to-stack", 3), ("to-overlay", 4),
    ("from-endpoint", 5), ("from-proxy", 6), ("from-host", 7), ("from-stack", 8),
    ("from-overlay", 9), ("from-network", 10), ("to-network", 11))}
TCP_FLAG_ORDER = ("SYN", "FIN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
RESERVED_IDENTITIES = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init"}


def format_time(timestamp) -> str:
    """Go's time.StampMilli ("Jan _2 15:04:05.000") in local time, "N/A" when unset."""
    nanos = timestamp.ToNanoseconds()
    if nanos <= 0:
        return "N/A"
    moment = dt.datetime.fromtimestamp(nanos / 1e9)
    return f"{moment:%b} {moment.day:>2} {moment:%H:%M:%S}.{moment.microsecond // 1000:03d}"


def drop_reason_text(reason: int) -> str:
    if reason in DROP_REASONS:
        return DROP_REASONS[reason]
    try:
        return flow_pb2.DropReason.Name(reason)
    except ValueError:
        return f"drop reason {reason}"


def flow_type(flow: flow_pb2.Flow) -> str:
    """Hubble's TYPE column: l7 kind, trace point, drop reason or policy verdict."""
    if flow.HasField("l7"):
        record = flow.l7.WhichOneof("record") or "l7"
        return f"{record}-{flow_pb2.L7FlowType.Name(flow.l7.type).lower()}"
    kind = flow.event_type.type
    if kind == F.MSG_TRACE:
        return TRACE_POINTS.get(flow.event_type.sub_type, f"trace-{flow.event_type.sub_type}")
    if kind == F.MSG_DROP:
        return drop_reason_text(flow.event_type.sub_type or int(flow.drop_reason_desc))
    if kind == F.MSG_POLICY_VERDICT:
        direction = flow_pb2.TrafficDirection.Name(flow.traffic_direction)
        outcome = "DENIED" if flow.verdict == flow_pb2.DROPPED else "ALLOWED"
        return f"policy-verdict:L3-L4 {direction} {outcome}"
    if kind == F.MSG_TRACE_SOCK:
        return "trace-sock"
    return "UNKNOWN"


def _ports(flow: flow_pb2.Flow) -> tuple[int, int]:
    kind = flow.l4.WhichOneof("protocol")
    if kind in ("TCP", "UDP", "SCTP"):
        layer = getattr(flow.l4, kind)
        return layer.source_port, layer.destination_port
    return 0, 0


def _host(ip: str, port: int, endpoint: flow_pb2.Endpoint, service: flow_pb2.Service, names) -> str:
    host = ip
    if endpoint.pod_name:
        host = f"{endpoint.namespace}/{endpoint.pod_name}" if endpoint.namespace else endpoint.pod_name
    elif service.name:
        host = f"{service.namespace}/{service.name}" if service.namespace else service.name
    elif names:
        host = ",".join(names)
    if port:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host


def _identity(endpoint: flow_pb2.Endpoint) -> str:
    if endpoint.identity in RESERVED_IDENTITIES:
        return f"({RESERVED_IDENTITIES[endpoint.identity]})"
    return f"(ID:{endpoint.identity})" if endpoint.identity else ""


def host_names(flow: flow_pb2.Flow) -> tuple[str, str]:
    sport, dport = _ports(flow)
    src = _host(flow.IP.source, sport, flow.source, flow.source_service, flow.source_names)
    dst = _host(flow.IP.destination, dport, flow.destination, flow.destination_service, flow.destination_names)
    return src, dst


def summary(flow: flow_pb2.Flow) -> str:
    """Hubble's SUMMARY: TCP flags, or the L7 record; Shoal adds mTLS and the proxy's note."""
    if flow.HasField("l7") and flow.l7.WhichOneof("record") == "http":
        http = flow.l7.http
        if flow.l7.type == flow_pb2.RESPONSE:
            text = f"{http.protocol} {http.code} {flow.l7.latency_ns // 1_000_000}ms ({http.method} {http.url})"
        else:
            text = f"{http.protocol} {http.method} {http.url}"
    elif flow.l4.WhichOneof("protocol") == "TCP":
        flags = [name for name in TCP_FLAG_ORDER if getattr(flow.l4.TCP.flags, name)]
        text = f"TCP Flags: {', '.join(flags)}" if flags else "TCP"
        if flow.Summary and flow.Summary.startswith("TCP "):
            # A node-proxy event: its note carries mTLS identities and byte counts.
            text = f"{text}; {flow.Summary[4:]}"
    else:
        text = flow.Summary or flow.l4.WhichOneof("protocol") or ""
    if flow.IP.encrypted and "mTLS" not in text:
        text += "; mTLS"
    policies = [f"{p.namespace}/{p.name}" for p in (*flow.egress_denied_by, *flow.ingress_denied_by)]
    if policies:
        text += f"; denied by {', '.join(policies)}"
    return text


def compact_line(response: observer_pb2.GetFlowsResponse) -> str:
    flow = response.flow
    src, dst = host_names(flow)
    src = f"{src} {_identity(flow.source)}".rstrip()
    dst = f"{dst} {_identity(flow.destination)}".rstrip()
    if not flow.HasField("is_reply"):
        left, arrow, right = src, "<>", dst
    elif flow.is_reply.value:
        left, arrow, right = dst, "<-", src
    else:
        left, arrow, right = src, "->", dst
    node = flow.node_name or response.node_name
    return (f"{format_time(flow.time)} [{node}]: {left} {arrow} {right} {flow_type(flow)} "
            f"{flow_pb2.Verdict.Name(flow.verdict)} ({summary(flow)})")


def to_json(message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True),
                      separators=(",", ":"))


class Printer:
    def __init__(self, output: str, out: TextIO, err: TextIO) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}, want one of {', '.join(OUTPUTS)}")
        self.output = output
        self.out = out
        self.err = err
        self.count = 0
        self._rows: list[tuple[str, ...]] = []

    def write(self, response: observer_pb2.GetFlowsResponse) -> None:
        kind = response.WhichOneof("response_types")
        if kind == "flow":
            self._flow(response)
        elif kind == "node_status":
            self._node_status(response)
        elif kind == "lost_events":
            self._lost(response)

    def _flow(self, response) -> None:
        flow = response.flow
        if self.output == "compact":
            print(compact_line(response), file=self.out, flush=True)
        elif self.output in ("json", "jsonpb"):
            print(to_json(response), file=self.out, flush=True)
        else:
            src, dst = host_names(flow)
            fields = (format_time(flow.time), flow.node_name or response.node_name, src, dst, flow_type(flow),
                      flow_pb2.Verdict.Name(flow.verdict), summary(flow))
            if self.output == "dict":
                if self.count:
                    print(DICT_SEPARATOR, file=self.out)
                labels = ("TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
                for label, value in zip(labels, fields):
                    print(f"{label:>11}: {value}", file=self.out)
                self.out.flush()
            else:
                self._rows.append(fields)
        self.count += 1

    def _node_status(self, response) -> None:
        status = response.node_status
        if self.output in ("json", "jsonpb"):
            if status.state_change in (relay_pb2.NODE_UNAVAILABLE, relay_pb2.NODE_ERROR):
                print(to_json(response), file=self.err, flush=True)
            return
        names = ", ".join(status.node_names)
        count = len(status.node_names)
        prefix = format_time(response.time)
        if status.state_change == relay_pb2.NODE_UNAVAILABLE:
            print(f"{prefix}: {count} nodes are unavailable: {names}", file=self.err, flush=True)
        elif status.state_change == relay_pb2.NODE_ERROR:
            print(f"{prefix}: Error {status.message!r} on {count} nodes: {names}", file=self.err, flush=True)

    def _lost(self, response) -> None:
        lost = response.lost_events
        if self.output in ("json", "jsonpb"):
            print(to_json(response), file=self.out, flush=True)
            return
        source = flow_pb2.LostEventSource.Name(lost.source)
        print(f"{format_time(response.time)} [{response.node_name}]: EVENTS LOST: {source} "
              f"{lost.num_events_lost}", file=self.err, flush=True)

    def close(self) -> None:
        if self.output != "table" or not self._rows:
            return
        header = ("TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
        rows = [header, *self._rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            cells = [cell.ljust(width + 3) for cell, width in zip(row, widths)]
            print("".join(cells) + row[-1], file=self.out)
        self.out.flush()
        self._rows.clear()

"""Builders for the Hubble flows the node proxy (L4) and the waypoint (L7) emit.

The emitters only know addresses, identities and protocol facts; the agent fills in
``node_name`` and the endpoints (namespace, pod, labels, workload, service) from its
ConfigState when the flow arrives. Field choices follow what Hubble's printers read:
``Type``, ``event_type``, ``verdict``, ``l4``, ``IP``, ``is_reply``,
``traffic_direction``, ``l7`` and ``Summary``.
"""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from typing import cast

from google.protobuf.wrappers_pb2 import BoolValue

from shoal.api.flow import flow_pb2

# Cilium monitor message types (pkg/monitor/api), the ``event_type.type`` Hubble filters on.
MSG_DROP = 1
MSG_TRACE = 4
MSG_POLICY_VERDICT = 5
MSG_TRACE_SOCK = 7
MSG_ACCESS_LOG = 129  # L7

# Trace sub types (observation points), as Cilium numbers them.
TRACE_TO_ENDPOINT = 0
TRACE_TO_PROXY = 1
TRACE_FROM_ENDPOINT = 5
TRACE_FROM_PROXY = 6

TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")


def verdict_value(name: str) -> flow_pb2.Verdict:
    """``"FORWARDED"`` -> the enum value; a ValueError for an unknown name. (The generated
    stubs type ``Value()`` as int and the field as the enum: the cast says they agree.)"""
    return cast(flow_pb2.Verdict, flow_pb2.Verdict.Value(name))


def tcp_flags_from_bits(bits: int) -> flow_pb2.TCPFlags:
    """Kernel TCP flag bits (FIN=0x01 ... CWR=0x80, NS=0x100) -> TCPFlags."""
    return flow_pb2.TCPFlags(**{name: bool(bits & (1 << i)) for i, name in enumerate(TCP_FLAG_NAMES)})


def set_addresses(flow: flow_pb2.Flow, src_ip: str, dst_ip: str, src_port: int, dst_port: int,
                  protocol: str = "TCP") -> None:
    # Callers pass addresses already formatted from kernel records or sockets; the colon
    # tells the family without parsing (ipaddress.ip_address cost ~3 % of flow export).
    flow.IP.source = src_ip
    flow.IP.destination = dst_ip
    flow.IP.ipVersion = flow_pb2.IPv6 if ":" in src_ip else flow_pb2.IPv4
    if protocol == "TCP":
        flow.l4.TCP.source_port = src_port
        flow.l4.TCP.destination_port = dst_port
    elif protocol == "UDP":
        flow.l4.UDP.source_port = src_port
        flow.l4.UDP.destination_port = dst_port
    elif protocol == "SCTP":
        flow.l4.SCTP.source_port = src_port
        flow.l4.SCTP.destination_port = dst_port
    else:
        raise ValueError(f"unsupported L4 protocol {protocol!r}")


def set_time(flow: flow_pb2.Flow, ts_ns: int | None) -> None:
    flow.time.FromNanoseconds(ts_ns if ts_ns is not None else time.time_ns())


def l4_flow(
    src_ip: str, src_port: int, dst_ip: str, dst_port: int, *,
    event: str,
    verdict: str = "FORWARDED",
    direction: str = "EGRESS",
    mtls: bool = False,
    src_spiffe: str = "",
    dst_spiffe: str = "",
    bytes_sent: int = 0,
    bytes_received: int = 0,
    drop_reason: int = 0,
    error: str = "",
    denied_by: str = "",
    ts_ns: int | None = None,
) -> flow_pb2.Flow:
    """A node-proxy connection event: ``event`` is "open" (SYN) or "close" (FIN).

    ``direction`` is EGRESS for the client side's proxy (outbound), INGRESS for the
    server side's (inbound). mTLS flows carry ``IP.encrypted`` (``auth_type`` stays
    DISABLED: it names Cilium's SPIRE mutual-auth mode, which Shoal is not); the peers'
    SPIFFE IDs and the byte counts go into ``Summary`` (Hubble has no field for them).
    ``denied_by`` ("namespace/name") names the AuthorizationPolicy that refused it.
    """
    if event not in ("open", "close"):
        raise ValueError(f"l4 event must be 'open' or 'close', got {event!r}")
    flow = flow_pb2.Flow()
    set_time(flow, ts_ns)
    set_addresses(flow, src_ip, dst_ip, src_port, dst_port)
    flow.Type = flow_pb2.L3_L4
    flow.verdict = verdict_value(verdict)
    flow.traffic_direction = cast(flow_pb2.TrafficDirection, flow_pb2.TrafficDirection.Value(direction))
    flow.is_reply.CopyFrom(BoolValue(value=False))
    flow.l4.TCP.flags.CopyFrom(tcp_flags_from_bits(0x02 if event == "open" else 0x11))
    if verdict == "DROPPED":
        flow.event_type.type = MSG_DROP
        flow.event_type.sub_type = drop_reason
        flow.drop_reason = drop_reason
        flow.drop_reason_desc = drop_reason  # type: ignore[assignment]
    else:
        flow.event_type.type = MSG_TRACE
        flow.event_type.sub_type = TRACE_FROM_PROXY if direction == "EGRESS" else TRACE_TO_ENDPOINT
        flow.trace_observation_point = (
            flow_pb2.FROM_PROXY if direction == "EGRESS" else flow_pb2.TO_ENDPOINT)
    if mtls:
        flow.IP.encrypted = True
    if denied_by:
        namespace, _, name = denied_by.rpartition("/")
        policies = flow.egress_denied_by if direction == "EGRESS" else flow.ingress_denied_by
        policies.add(namespace=namespace, name=name, kind="AuthorizationPolicy")
    parts = [f"TCP {event}"]
    if mtls:
        parts.append(f"mTLS {src_spiffe or '?'} -> {dst_spiffe or '?'}")
    if event == "close":
        parts.append(f"sent={bytes_sent} received={bytes_received}")
    if error:
        parts.append(f"error={error}")
    flow.Summary = " ".join(parts)
    return flow


def capture_drift_flow(pod_ip: str, kind: str, detail: str, repaired: bool,
                       ts_ns: int | None = None) -> flow_pb2.Flow:
    """The capture audit found part of a pod's capture missing: an AUDIT flow from the pod
    (the agent fills in its endpoint), saying what was missing and whether it was put back."""
    flow = flow_pb2.Flow()
    set_time(flow, ts_ns)
    flow.IP.source = flow.IP.destination = pod_ip   # no L4: printers show the Summary
    flow.IP.ipVersion = flow_pb2.IPv4 if ipaddress.ip_address(pod_ip).version == 4 else flow_pb2.IPv6
    flow.Type = flow_pb2.L3_L4
    flow.verdict = flow_pb2.AUDIT
    flow.traffic_direction = flow_pb2.INGRESS
    flow.event_type.type = MSG_POLICY_VERDICT
    flow.Summary = f"capture drift: {kind}: {detail} ({'repaired' if repaired else 'NOT repaired'})"
    return flow


def http_flow(
    src_ip: str, src_port: int, dst_ip: str, dst_port: int, *,
    kind: str,
    method: str,
    url: str,
    code: int = 0,
    protocol: str = "HTTP/1.1",
    latency_ns: int = 0,
    headers: Mapping[str, str] | None = None,
    verdict: str = "FORWARDED",
    mtls: bool = True,
    trace_id: str = "",
    ts_ns: int | None = None,
) -> flow_pb2.Flow:
    """A waypoint L7 event: ``kind`` "request" (client -> server) or "response".

    For a response pass the addresses as seen on the reply (server -> client); it is
    marked ``is_reply`` and carries ``code`` and ``latency_ns``. A request denied by L7
    policy is ``verdict="DROPPED"`` (Hubble prints it as such, with code 403).
    """
    if kind not in ("request", "response"):
        raise ValueError(f"http flow kind must be 'request' or 'response', got {kind!r}")
    flow = flow_pb2.Flow()
    set_time(flow, ts_ns)
    set_addresses(flow, src_ip, dst_ip, src_port, dst_port)
    flow.Type = flow_pb2.L7
    flow.event_type.type = MSG_ACCESS_LOG
    flow.verdict = verdict_value(verdict)
    reply = kind == "response"
    flow.is_reply.CopyFrom(BoolValue(value=reply))
    flow.traffic_direction = flow_pb2.INGRESS
    flow.l7.type = flow_pb2.RESPONSE if reply else flow_pb2.REQUEST
    flow.l7.latency_ns = latency_ns
    http = flow.l7.http
    http.method = method
    http.url = url
    http.protocol = protocol
    http.code = code
    for key, value in (headers or {}).items():
        http.headers.add(key=key, value=value)
    if mtls:
        flow.IP.encrypted = True
    if trace_id:
        flow.trace_context.parent.trace_id = trace_id
    if reply:
        flow.Summary = f"{protocol} {code} {latency_ns // 1_000_000}ms ({method} {url})"
    else:
        flow.Summary = f"{protocol} {method} {url}"
    return flow

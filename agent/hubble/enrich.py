"""Kernel events and bare proxy/waypoint flows -> Hubble flows with their endpoints.

Endpoints (identity, namespace, pod, labels, workload) and services come from the
agent's ConfigState (contract A), looked up by IP. The reverse map workload -> service
is rebuilt only when the state's version changes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.wrappers_pb2 import BoolValue

from shoal.agent.compiler import rule_id as kernel_rule_id  # what the kernel's deny entries carry
from shoal.api.flow import flow_pb2
from shoal.flows import records as F
from shoal.telemetry_labels import workload_name

# Cilium's reserved identities, for addresses no workload owns.
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
# Kernel timestamps below this are CLOCK_MONOTONIC (bpf_ktime_get_ns), not wall time.
_WALL_CLOCK_FLOOR_NS = 10**18

_PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMPv4", 58: "ICMPv6"}
# Endpoints filled per (address, identity) and kept while the state's version stands; past
# this many they are forgotten and filled again.
ENDPOINTS_KEPT = 4096


class StateView(Protocol):
    """What enrichment reads from ``shoal.xds.state.ConfigState``."""

    version: Any

    def workload_by_ip(self, ip: str): ...

    def service_by_vip(self, vip: str): ...

    def all_services(self): ...

    def all_policies(self): ...


@dataclass(frozen=True)
class _ServiceIndex:
    version: Any
    by_workload_uid: dict


@dataclass(frozen=True)
class _FilledEndpoint:
    endpoint: flow_pb2.Endpoint   # never handed out: merged into each flow's own
    service: Any                  # the Service whose VIP or endpoint the address is, or None
    owner: Any                    # the workload or Service it was filled from (None: neither)


@dataclass(frozen=True)
class _PolicyIndex:
    version: Any
    by_rule_id: dict      # the kernel's rule_id (crc32 of "<namespace>/<name>") -> (namespace, name)


class Enricher:
    def __init__(self, state: StateView | None, node_name: str, cluster_name: str = "") -> None:
        self.state = state
        self.node_name = node_name
        self.cluster_name = cluster_name
        self._index = _ServiceIndex(version=object(), by_workload_uid={})
        self._policies = _PolicyIndex(version=object(), by_rule_id={})
        self._endpoints: dict[tuple[str, int], _FilledEndpoint] = {}
        self._endpoints_version: Any = object()
        # Offset turning CLOCK_MONOTONIC kernel stamps into wall-clock ones.
        self._mono_to_wall = time.time_ns() - time.monotonic_ns()

    # -- timestamps
    def wall_ns(self, ts_ns: int) -> int:
        return ts_ns if ts_ns >= _WALL_CLOCK_FLOOR_NS else ts_ns + self._mono_to_wall

    # -- endpoints
    def _services_by_uid(self) -> dict:
        version = getattr(self.state, "version", None)
        if self._index.version != version:
            by_uid: dict = {}
            for service in self.state.all_services():
                for uid in service.endpoints:
                    by_uid.setdefault(uid, service)
            self._index = _ServiceIndex(version=version, by_workload_uid=by_uid)
        return self._index.by_workload_uid

    def policy_of_rule(self, rule_id: int) -> tuple[str, str] | None:
        """(namespace, name) of the AuthorizationPolicy behind a kernel rule_id."""
        if not rule_id or self.state is None:
            return None
        version = getattr(self.state, "version", None)
        if self._policies.version != version:
            by_rule = {kernel_rule_id(p): (p.namespace, p.name) for p in self.state.all_policies()}
            self._policies = _PolicyIndex(version=version, by_rule_id=by_rule)
        return self._policies.by_rule_id.get(rule_id)

    def fill_endpoint(self, endpoint: flow_pb2.Endpoint, ip: str, identity: int = 0):
        """Fills ``endpoint`` for ``ip``; returns the Service whose VIP or endpoint it is.

        Filled once per address and identity, then merged from that copy (one C call) while
        the address has the same owner (the very workload or Service object: a new pod on
        an old address is filled anew) and the state's version stands (which Service a
        workload is in). Filling field by field took 17 µs of the 30 a waypoint's L7 flow
        cost, and a waypoint sends its flows in batches (50 every 50 ms at 1,000 req/s): the
        agent's 1.5 ms burst per batch was the mesh path's p99 (perf README, session 12)."""
        state = self.state
        workload = state.workload_by_ip(ip) if (state is not None and ip) else None
        service = state.service_by_vip(ip) if (workload is None and state is not None and ip) else None
        owner = workload if workload is not None else service
        version = getattr(state, "version", None)
        if version != self._endpoints_version or len(self._endpoints) >= ENDPOINTS_KEPT:
            self._endpoints, self._endpoints_version = {}, version
        filled = self._endpoints.get((ip, identity))
        if filled is None or filled.owner is not owner:
            template = flow_pb2.Endpoint()
            found = self._fill_endpoint(template, ip, identity, workload, service)
            filled = self._endpoints[(ip, identity)] = _FilledEndpoint(template, found, owner)
        endpoint.MergeFrom(filled.endpoint)
        endpoint.identity = filled.endpoint.identity   # set even when 0 (a VIP), as filling does
        return filled.service

    def _fill_endpoint(self, endpoint: flow_pb2.Endpoint, ip: str, identity: int, workload, service):
        if workload is not None:
            endpoint.identity = identity or workload.identity
            endpoint.namespace = workload.namespace
            endpoint.pod_name = workload.name
            labels = [f"k8s:{key}={value}" for key, value in workload.labels.items()]
            labels.append(f"k8s:io.kubernetes.pod.namespace={workload.namespace}")
            labels.append(f"k8s:io.cilium.k8s.policy.serviceaccount={workload.service_account}")
            endpoint.labels.extend(sorted(labels))
            # The real owner, as the controller derived it (a bare Pod is kind Pod).
            endpoint.workloads.add(name=workload_name(workload), kind=workload.workload_kind or "Pod")
            if self.cluster_name:
                endpoint.cluster_name = self.cluster_name
            return self._services_by_uid().get(workload.uid)
        if service is not None:
            endpoint.identity = identity   # a VIP is no workload: no identity of its own
            endpoint.namespace = service.namespace
            endpoint.labels.append(f"k8s:io.kubernetes.pod.namespace={service.namespace}")
            return service
        endpoint.identity = identity or (IDENTITY_HOST if ip.startswith("127.") or ip == "::1" else IDENTITY_WORLD)
        if endpoint.identity in (IDENTITY_HOST, IDENTITY_WORLD):
            endpoint.labels.append("reserved:host" if endpoint.identity == IDENTITY_HOST else "reserved:world")
        return None

    def fill_endpoints(self, flow: flow_pb2.Flow, src_identity: int = 0, dst_identity: int = 0) -> None:
        source_service = self.fill_endpoint(flow.source, flow.IP.source, src_identity)
        if source_service is not None:
            flow.source_service.name = source_service.name
            flow.source_service.namespace = source_service.namespace
        destination_service = self.fill_endpoint(flow.destination, flow.IP.destination, dst_identity)
        if destination_service is not None:
            flow.destination_service.name = destination_service.name
            flow.destination_service.namespace = destination_service.namespace

    # -- kernel events
    def kernel_flow(self, event) -> flow_pb2.Flow:
        """A ``shoal.flows.kernel.KernelFlowEvent`` (or its raw record bytes) -> Flow."""
        if isinstance(event, bytes):
            from shoal.flows.kernel import decode  # raises MalformedRecord (a ValueError)

            event = decode(event)
        flow = flow_pb2.Flow()
        flow.time.FromNanoseconds(self.wall_ns(event.ts_ns))
        protocol = event.protocol
        if isinstance(protocol, int):
            protocol = _PROTOCOL_NAMES.get(protocol, str(protocol))
        protocol = str(protocol).upper().replace("ICMPV", "ICMPv")
        if protocol in ("TCP", "UDP", "SCTP"):
            F.set_addresses(flow, event.src_ip, event.dst_ip, event.src_port, event.dst_port, protocol)
        else:
            flow.IP.source, flow.IP.destination = event.src_ip, event.dst_ip
            flow.IP.ipVersion = flow_pb2.IPv6 if ":" in event.src_ip else flow_pb2.IPv4
        flow.Type = flow_pb2.L3_L4
        flow.node_name = self.node_name
        flow.verdict = flow_pb2.Verdict.Value(event.verdict)
        direction = event.direction or "TRAFFIC_DIRECTION_UNKNOWN"
        flow.traffic_direction = flow_pb2.TrafficDirection.Value(direction)
        flags = event.tcp_flags
        if protocol == "TCP":
            if flags == 0 and event.kind == "connect":
                flags = 0x02  # a connect() is the SYN Hubble would have seen
            flow.l4.TCP.flags.CopyFrom(F.tcp_flags_from_bits(flags))
        if event.kind == "connect" or (protocol == "TCP" and flags & 0x12 == 0x02):
            flow.is_reply.CopyFrom(BoolValue(value=False))
        elif protocol == "TCP" and flags & 0x12 == 0x12:
            flow.is_reply.CopyFrom(BoolValue(value=True))
        if event.verdict == "DROPPED":
            reason = int(event.drop_reason or 0)
            flow.event_type.type = F.MSG_DROP
            flow.event_type.sub_type = reason
            flow.drop_reason = reason
            if reason in flow_pb2.DropReason.values():
                flow.drop_reason_desc = reason
            policy = self.policy_of_rule(getattr(event, "rule_id", 0))
            if policy is not None:
                # Hubble's --print-policy-names: the connect() is the client's egress.
                denied_by = flow.egress_denied_by if direction == "EGRESS" else flow.ingress_denied_by
                denied_by.add(namespace=policy[0], name=policy[1], kind="AuthorizationPolicy")
        elif event.verdict == "REDIRECTED":
            flow.event_type.type = F.MSG_TRACE
            flow.event_type.sub_type = F.TRACE_TO_PROXY
            flow.trace_observation_point = flow_pb2.TO_PROXY
        else:
            flow.event_type.type = F.MSG_TRACE
            egress = direction == "EGRESS"
            flow.event_type.sub_type = F.TRACE_FROM_ENDPOINT if egress else F.TRACE_TO_ENDPOINT
            flow.trace_observation_point = flow_pb2.FROM_ENDPOINT if egress else flow_pb2.TO_ENDPOINT
        self.fill_endpoints(flow, event.src_identity, event.dst_identity)
        return flow

    def namespaces_of(self, payload) -> tuple[str, ...]:
        """The namespaces at either end of a stored entry, without building a Flow."""
        if isinstance(payload, flow_pb2.Flow):
            return payload.source.namespace, payload.destination.namespace
        if isinstance(payload, flow_pb2.LostEvent) or self.state is None:
            return ()
        if isinstance(payload, bytes):
            from shoal.flows.kernel import decode

            try:
                payload = decode(payload)
            except ValueError:
                return ()
        found = []
        for ip in (payload.src_ip, payload.dst_ip):
            workload = self.state.workload_by_ip(ip)
            if workload is not None:
                found.append(workload.namespace)
        return tuple(found)

    # -- proxy / waypoint flows
    def proxy_flow(self, flow: flow_pb2.Flow) -> flow_pb2.Flow:
        """Completes a flow built by ``flows.l4_flow`` / ``flows.http_flow`` in place."""
        flow.node_name = self.node_name
        if not flow.HasField("time"):
            flow.time.FromNanoseconds(time.time_ns())
        if not (flow.source.namespace or flow.source.identity):
            service = self.fill_endpoint(flow.source, flow.IP.source)
            if service is not None and not flow.source_service.name:
                flow.source_service.name, flow.source_service.namespace = service.name, service.namespace
        if not (flow.destination.namespace or flow.destination.identity):
            service = self.fill_endpoint(flow.destination, flow.IP.destination)
            if service is not None and not flow.destination_service.name:
                flow.destination_service.name = service.name
                flow.destination_service.namespace = service.namespace
        return flow

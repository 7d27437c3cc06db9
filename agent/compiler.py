"""From the config stream's view of the cluster to the kernel maps' desired contents.

Pure functions, no I/O: the reconciler diffs their output against the pinned maps.
Only what the kernel can enforce exactly is compiled; anything else (L7 fields,
negations, ip blocks, wildcards, selectors narrower than an identity) is left to
the node proxy and the waypoint, which enforce the full policy anyway.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping

from shoal.datapath.structs import ENDPOINT_LOCAL, ENDPOINT_MESHED, ENDPOINT_STRICT, IDENTITY_ANY
from shoal.xds import model as m

log = logging.getLogger(__name__)

PROTO_TCP = socket.IPPROTO_TCP
PROTO_UDP = socket.IPPROTO_UDP
# Service port protocols -> the IP protocol the kernel balances (SCTP is not balanced).
SERVICE_PROTOCOLS = {"TCP": PROTO_TCP, "HTTP": PROTO_TCP, "HTTP2": PROTO_TCP, "GRPC": PROTO_TCP, "": PROTO_TCP,
                     "UDP": PROTO_UDP}


def namespace_id(namespace: str) -> int:
    """Stable across agents and restarts: no allocation needed for a 32-bit tag."""
    return zlib.crc32(namespace.encode()) or 1


def rule_id(policy: m.Authorization) -> int:
    return zlib.crc32(policy.key.encode()) or 1


@dataclass(frozen=True)
class Endpoint:
    identity: int
    ns_id: int
    flags: int


@dataclass(frozen=True)
class PolicyEntry:
    src_identity: int
    dst_identity: int
    dport: int
    proto: int


@dataclass(frozen=True)
class Skipped:
    policy: str
    reason: str


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError as err:
        raise ValueError(f"{what}: bad address {text!r}") from err
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped    # the data path keys IPv4 as mapped anyway: one form
    return address


def validate_workload(workload: m.Workload) -> None:
    """ValueError for a workload the data path cannot use (the stream client NACKs it)."""
    for ip in workload.ips or (workload.ip,):
        _address(ip, f"workload {workload.uid}")
    if not 0 < workload.identity < 2**32 or workload.identity in (1, 2):
        raise ValueError(f"workload {workload.uid}: identity {workload.identity} out of range or reserved")


def validate_service(service: m.Service) -> None:
    for vip in service.vips or (service.vip,):
        _address(vip, f"service {service.key}: vip")
    for port in service.ports:
        for value in (port.port, port.target_port):
            if not isinstance(value, int) or not 0 < value < 65536:
                raise ValueError(f"service {service.key}: bad port {value!r}")


def validate_policy(policy: m.Authorization) -> None:
    if policy.action not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
        raise ValueError(f"authorization {policy.key}: unknown action {policy.action!r}")
    for rule in policy.rules:
        for operation in rule.operations:
            for port in (*operation.ports, *operation.not_ports):
                if not isinstance(port, int) or not 0 < port < 65536:
                    raise ValueError(f"authorization {policy.key}: bad port {port!r}")


def validate(resource: object) -> None:
    """The config client's validator: NACK what the data path would choke on."""
    if isinstance(resource, m.Workload):
        validate_workload(resource)
    elif isinstance(resource, m.Service):
        validate_service(resource)
    elif isinstance(resource, m.Authorization):
        validate_policy(resource)


def endpoints(workloads: Iterable[m.Workload], node: str) -> dict[str, Endpoint]:
    """ipcache: every address (both families) of every workload in the cluster."""
    out = {}
    for workload in workloads:
        try:
            validate_workload(workload)
        except ValueError as err:
            log.warning("ipcache: skipping %s", err)
            continue
        flags = ((ENDPOINT_MESHED if workload.meshed else 0) | (ENDPOINT_LOCAL if workload.node == node else 0)
                 | (ENDPOINT_STRICT if workload.meshed and workload.mtls_mode == "STRICT" else 0))
        for ip in workload.ips:
            out[str(_address(ip, workload.uid))] = Endpoint(workload.identity, namespace_id(workload.namespace), flags)
    return out


def services(all_services: Iterable[m.Service], workload: Mapping[str, m.Workload]
             ) -> dict[tuple[str, int, int], tuple[tuple[str, int], ...]]:
    """(vip, port, IP protocol) -> backends (ip, target port), in a stable order, for
    every ClusterIP of the Service; each VIP gets the backends' addresses of its own family."""
    out = {}
    for service in all_services:
        try:
            validate_service(service)
        except ValueError as err:
            log.warning("services: skipping %s", err)
            continue
        members = [workload[uid] for uid in service.endpoints if uid in workload]
        for vip in service.vips:
            address = _address(vip, service.key)
            family = m.IPV4 if address.version == 4 else m.IPV6
            ips = sorted({str(_address(ip, w.uid)) for w in members if (ip := w.address(family))})
            for port in service.ports:
                proto = SERVICE_PROTOCOLS.get(port.protocol.upper())
                if proto is None:
                    continue
                out[(str(address), port.port, proto)] = tuple((ip, port.target_port) for ip in ips)
    return out


def _principal_identity(principal: str, identities: Mapping[tuple[str, str], int]) -> int | None:
    """'cluster.local/ns/<ns>/sa/<sa>' (or spiffe://...) -> identity; None when unknown."""
    text = principal.removeprefix("spiffe://")
    parts = text.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        raise ValueError(f"principal {principal!r} is not <trust-domain>/ns/<ns>/sa/<sa>")
    return identities.get((parts[2], parts[4]))


def _source_identities(source: m.Source, identities: Mapping[tuple[str, str], int]) -> set[int] | None:
    """Identities one Source matches; None means any source. ValueError: not kernel-enforceable."""
    if source.not_principals or source.not_namespaces or source.ip_blocks or source.not_ip_blocks:
        raise ValueError("negations and ip blocks are left to the proxy")
    matched: set[int] | None = None
    if source.principals:
        if any("*" in p for p in source.principals):
            raise ValueError("principal wildcards are left to the proxy")
        matched = {i for p in source.principals if (i := _principal_identity(p, identities)) is not None}
    if source.namespaces:
        if any("*" in n for n in source.namespaces):
            raise ValueError("namespace wildcards are left to the proxy")
        in_namespaces = {i for (ns, _sa), i in identities.items() if ns in source.namespaces}
        matched = in_namespaces if matched is None else matched & in_namespaces
    return matched


def _rule_ports(rule: m.Rule) -> set[int]:
    """Destination ports of a rule; {0} means any port."""
    if not rule.operations:
        return {0}
    ports: set[int] = set()
    for operation in rule.operations:
        if (operation.not_ports or operation.methods or operation.not_methods or operation.paths
                or operation.not_paths or operation.hosts or operation.not_hosts):
            raise ValueError("L7 operations are left to the proxy/waypoint")
        if not operation.ports:
            return {0}
        ports.update(operation.ports)
    return ports


def deny_entries(policies: Iterable[m.Authorization], workloads: Iterable[m.Workload]
                 ) -> tuple[dict[PolicyEntry, int], list[Skipped]]:
    """Pure-L4 DENY rules as (src identity, dst identity, port, proto) -> rule id, for TCP and UDP."""
    workloads = list(workloads)
    identities = {(w.namespace, w.service_account): w.identity for w in workloads}
    by_identity: dict[int, list[m.Workload]] = {}
    for workload in workloads:
        by_identity.setdefault(workload.identity, []).append(workload)
    entries: dict[PolicyEntry, int] = {}
    skipped: list[Skipped] = []
    for policy in policies:
        if policy.action != "DENY":
            continue
        selected = [w for w in workloads if policy.selects(w)]
        dst_identities = set()
        for identity in {w.identity for w in selected}:
            # Keys carry identities (namespace + service account); a selector that picks only
            # some workloads of an identity cannot be expressed exactly: leave it to the proxy.
            if all(policy.selects(w) for w in by_identity[identity]):
                dst_identities.add(identity)
            else:
                skipped.append(Skipped(policy.key, f"selector narrower than identity {identity}"))
        the_id = rule_id(policy)
        for index, rule in enumerate(policy.rules):
            try:
                if rule.conditions:
                    raise ValueError("conditions are left to the proxy")
                ports = _rule_ports(rule)
                if not rule.sources:
                    sources: set[int] = {IDENTITY_ANY}
                else:
                    sources = set()
                    for source in rule.sources:
                        matched = _source_identities(source, identities)
                        sources |= {IDENTITY_ANY} if matched is None else matched
            except ValueError as err:
                skipped.append(Skipped(policy.key, f"rule {index}: {err}"))
                continue
            # An Istio L4 rule names ports, not protocols: it holds for TCP and, since UDP
            # is not tunnelled and the kernel is its only enforcer, for UDP as well.
            for src in sources:
                for dst in dst_identities:
                    for port in ports:
                        for proto in (PROTO_TCP, PROTO_UDP):
                            entries.setdefault(PolicyEntry(src, dst, port, proto), the_id)
    return entries, skipped

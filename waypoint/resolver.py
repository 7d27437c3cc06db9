"""Where services, endpoints, policies and source workloads come from.

``StateResolver`` reads the node's ``ConfigState`` (the mesh); ``StaticResolver`` is a
fixed table, for tests and benchmarks that run the proxy without a control plane.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from shoal.config import DEFAULT_TRUST_DOMAIN
from shoal.telemetry_labels import CLUSTER_DOMAIN, peer, service_fqdn
from shoal.xds.model import Authorization, Service, Workload
from shoal.xds.state import ConfigState

from .http import PeerInfo
from .proxy import ServiceInfo, WorkloadInfo
from .routing import ServiceKey
from .upstream import Endpoint
from .upstream_h2 import speaks_h2c

MEMO_LIMIT = 4096   # remembered lookups per config version


def fqdn(namespace: str, name: str) -> str:
    return service_fqdn(name, namespace)


def split_host(authority: str) -> tuple[str, int | None]:
    """'web.demo:8080' -> ('web.demo', 8080); '[fd00::1]:80' -> ('fd00::1', 80); no port -> None."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = authority.rpartition(":")
        if not sep:
            host, port = authority, ""
    return host.lower(), int(port) if port.isdigit() else None


def service_name_from_host(host: str, default_namespace: str) -> tuple[str, str] | None:
    """'web' / 'web.demo' / 'web.demo.svc' / 'web.demo.svc.cluster.local' -> (namespace, name)."""
    parts = host.split(".")
    if len(parts) == 1:
        return default_namespace, parts[0]
    if len(parts) == 2 or parts[2:] in (["svc"], CLUSTER_DOMAIN.split(".")):
        return parts[1], parts[0]
    return None


class StateResolver:
    """The mesh: services by VIP (the HBONE destination) or by Host name, from ConfigState."""

    def __init__(self, state: ConfigState, namespace: str, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 gateway: tuple[str, str] | None = None) -> None:
        self.state = state
        # Per-request lookups (endpoints, policies, source workloads) computed once per
        # config version: each push clears them.
        self._memo: dict[tuple, object] = {}
        self.generation = 0   # counts config pushes: what callers remembered from answers before is stale
        state.subscribe(self._changed)
        self.namespace = namespace  # the waypoint's own: default for short Host names
        self.trust_domain = trust_domain
        self.gateway = gateway      # (namespace, name) of this waypoint's Gateway

    def _changed(self, _delta) -> None:
        self._memo.clear()
        self.generation += 1

    def _remembered(self, key: tuple, compute):
        memo = self._memo
        try:
            return memo[key]
        except KeyError:
            if len(memo) >= MEMO_LIMIT:
                memo.clear()       # many distinct keys (addresses): stay bounded
            value = memo[key] = compute()
            return value

    def service_for(self, peer: PeerInfo, authority: str) -> ServiceInfo | None:
        return self._remembered(("service", peer.destination_ip, peer.destination_port, authority),
                                lambda: self._service_for(peer, authority))

    def _service_for(self, peer: PeerInfo, authority: str) -> ServiceInfo | None:
        service = self.state.service_by_vip(peer.destination_ip) if peer.destination_ip else None
        port = peer.destination_port
        if service is None:
            host, host_port = split_host(authority)
            named = service_name_from_host(host, self.namespace)
            if named is not None:
                service = self.state.service(*named)
            port = port or host_port or 80
        if service is None:
            return None
        return ServiceInfo(ServiceKey(service.namespace, service.name, port), fqdn(service.namespace, service.name), service.vip)

    def speaks_http2(self, namespace: str, name: str, port: int) -> bool:
        """Istio's protocol selection on the backend's Service port (upstream_h2.speaks_h2c)."""
        service = self.state.service(namespace, name)
        for p in service.ports if service is not None else ():
            if p.port == port:
                return speaks_h2c(p.app_protocol, p.name)
        return False

    def _service_port(self, service: Service, port: int) -> int:
        for p in service.ports:
            if p.port == port:
                return p.target_port or p.port
        return port

    def endpoints(self, namespace: str, name: str, port: int) -> list[Endpoint] | None:
        return self._remembered(("endpoints", namespace, name, port), lambda: self._endpoints(namespace, name, port))

    def _endpoints(self, namespace: str, name: str, port: int) -> list[Endpoint] | None:
        service = self.state.service(namespace, name)
        if service is None:
            return None
        target = self._service_port(service, port)
        return [Endpoint(w.ip, target, w.uid, w.name, w.namespace, w.spiffe_id,
                         "HBONE" if w.protocol == "HBONE" and w.meshed else "TCP",
                         w.canonical_service or w.labels.get("app", w.name), peer(w))
                for w in self.state.endpoints(service) if w.ip]

    def policies_for(self, service: ServiceKey) -> Iterable[Authorization]:
        """The policies that hold for a request to the Service at this waypoint.

        Those attached to the Service or to this waypoint's Gateway (targetRefs), and
        those selecting any endpoint of the Service (a workload's policies hold at its
        waypoint too).
        """
        return self._remembered(("policies", service), lambda: self._policies_for(service))

    def _policies_for(self, service: ServiceKey) -> list[Authorization]:
        svc = self.state.service(service.namespace, service.name)
        if svc is None:
            return []
        seen: dict[str, Authorization] = {
            p.key: p for p in self.state.all_policies()
            if p.targets("Service", svc.namespace, svc.name)
            or (self.gateway is not None and p.targets("Gateway", *self.gateway))}
        for workload in self.state.endpoints(svc):
            for policy in self.state.policies_for(workload):
                seen.setdefault(policy.key, policy)
        if not seen:
            # No endpoint known: namespace-wide and mesh-wide policies still hold.
            probe = Workload(uid="", name="", namespace=service.namespace, service_account="", node="", ip="",
                             identity=0, spiffe_id="", meshed=True)
            for policy in self.state.policies_for(probe):
                seen.setdefault(policy.key, policy)
        return list(seen.values())

    def workload_by_ip(self, ip: str) -> WorkloadInfo | None:
        return self._remembered(("workload", ip), lambda: self._workload_by_ip(ip))

    def _workload_by_ip(self, ip: str) -> WorkloadInfo | None:
        w = self.state.workload_by_ip(ip)
        if w is None:
            return None
        app = w.canonical_service or w.labels.get("app", w.name)
        return WorkloadInfo(w.name, w.namespace, app, w.spiffe_id, peer(w))


@dataclass
class StaticResolver:
    """A fixed cluster: {(namespace, name): [endpoints]}, services found by Host name."""

    services: Mapping[tuple[str, str], list[Endpoint]]
    namespace: str = "default"
    policies: list[Authorization] = field(default_factory=list)
    workloads: Mapping[str, WorkloadInfo] = field(default_factory=dict)
    vips: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    default: tuple[str, str] | None = None   # serves Hosts that name no known service (benchmarks)
    http2: frozenset[tuple[str, str]] = frozenset()   # (namespace, name) of Services that speak h2c
    generation: int = 0   # bump after changing the tables while connections are open

    def service_for(self, peer: PeerInfo, authority: str) -> ServiceInfo | None:
        named = self.vips.get(peer.destination_ip)
        port = peer.destination_port
        if named is None:
            host, host_port = split_host(authority)
            named = service_name_from_host(host, self.namespace)
            port = port or host_port or 80
        if named is None or tuple(named) not in self.services:
            named = self.default
        if named is None:
            return None
        return ServiceInfo(ServiceKey(named[0], named[1], port), fqdn(*named))

    def endpoints(self, namespace: str, name: str, port: int) -> list[Endpoint] | None:
        return self.services.get((namespace, name))

    def speaks_http2(self, namespace: str, name: str, port: int) -> bool:
        return (namespace, name) in self.http2

    def policies_for(self, service: ServiceKey) -> Iterable[Authorization]:
        return [p for p in self.policies if p.namespace in (service.namespace, "shoal-system")]

    def workload_by_ip(self, ip: str) -> WorkloadInfo | None:
        return self.workloads.get(ip)

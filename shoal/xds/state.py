"""``ConfigState``: the cluster as the data path sees it.

Written only by the config client (``apply``), read by everyone else on the node. Keeps
indexes for the data path's lookups (by IP, by node, by VIP) and tells subscribers about
every applied push, with the objects it replaced so they can undo derived state.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from typing import Callable, Iterable

from shoal.xds import model as m

log = logging.getLogger(__name__)

Subscriber = Callable[[m.ConfigDelta], None]


class ConfigState:
    def __init__(self) -> None:
        self._workloads: dict[str, m.Workload] = {}
        self._by_ip: dict[str, m.Workload] = {}
        self._by_node: dict[str, dict[str, m.Workload]] = defaultdict(dict)
        self._services: dict[str, m.Service] = {}
        self._by_vip: dict[str, m.Service] = {}
        self._policies: dict[str, m.Authorization] = {}
        self._policies_by_ns: dict[str, dict[str, m.Authorization]] = defaultdict(dict)
        self._waypoints: dict[str, m.Waypoint] = {}
        self._objects: dict[str, m.KubeObject] = {}
        self._subscribers: list[Subscriber] = []
        self.version = ""

    # -- writing (config client only) ---------------------------------------------------

    def apply(self, delta: m.ConfigDelta) -> m.ConfigDelta:
        """Applies one push; returns it with ``previous`` filled and notifies subscribers."""
        previous: dict[str, m.Resource] = {}
        for key in delta.removed:
            old = self._remove(key)
            if old is not None:
                previous[key] = old
        for resource in delta.upserted:
            key = m.resource_key(resource)
            old = self._remove(key)
            if old is not None:
                previous[key] = old
            self._insert(resource)
        if delta.version:
            self.version = delta.version
        applied = replace(delta, previous=previous)
        for callback in list(self._subscribers):
            try:
                callback(applied)
            except Exception:  # one broken subscriber must not starve the others
                log.exception("config subscriber %r failed on version %s", callback, delta.version)
        return applied

    def _insert(self, resource: m.Resource) -> None:
        if isinstance(resource, m.Workload):
            self._workloads[resource.uid] = resource
            for address in resource.ips:      # every family: the data path keys by each
                self._by_ip[address] = resource
            self._by_node[resource.node][resource.uid] = resource
        elif isinstance(resource, m.Service):
            self._services[resource.key] = resource
            for address in resource.vips:
                self._by_vip[address] = resource
        elif isinstance(resource, m.Authorization):
            self._policies[resource.key] = resource
            self._policies_by_ns[resource.namespace][resource.key] = resource
        elif isinstance(resource, m.Waypoint):
            self._waypoints[resource.key] = resource
        elif isinstance(resource, m.KubeObject):
            self._objects[resource.key] = resource

    def _remove(self, key: str) -> m.Resource | None:
        kind, name = m.split_key(key)
        if kind == m.WORKLOAD:
            workload = self._workloads.pop(name, None)
            if workload is not None:
                for address in workload.ips:
                    if self._by_ip.get(address) is workload:
                        del self._by_ip[address]
                self._by_node[workload.node].pop(workload.uid, None)
            return workload
        if kind == m.SERVICE:
            service = self._services.pop(name, None)
            for address in service.vips if service is not None else ():
                if self._by_vip.get(address) is service:
                    del self._by_vip[address]
            return service
        if kind == m.AUTHORIZATION:
            policy = self._policies.pop(name, None)
            if policy is not None:
                self._policies_by_ns[policy.namespace].pop(name, None)
            return policy
        if kind == m.WAYPOINT:
            return self._waypoints.pop(name, None)
        return self._objects.pop(name, None)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Calls ``callback(delta)`` after each applied push; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    # -- reading ------------------------------------------------------------------------

    def workload(self, uid: str) -> m.Workload | None:
        return self._workloads.get(uid)

    def workload_by_ip(self, ip: str) -> m.Workload | None:
        """The workload with address ``ip`` (either family; IPv4-mapped IPv6 is IPv4)."""
        return self._by_ip.get(ip) or self._by_ip.get(m.canonical_ip(ip)) if ip else None

    def workloads_on_node(self, node: str) -> list[m.Workload]:
        return list(self._by_node.get(node, {}).values())

    def all_workloads(self) -> list[m.Workload]:
        return list(self._workloads.values())

    def service(self, namespace: str, name: str) -> m.Service | None:
        return self._services.get(f"{namespace}/{name}")

    def service_by_vip(self, vip: str) -> m.Service | None:
        """The Service with ClusterIP ``vip`` (either family; IPv4-mapped is IPv4)."""
        return self._by_vip.get(vip) or self._by_vip.get(m.canonical_ip(vip)) if vip else None

    def all_services(self) -> list[m.Service]:
        return list(self._services.values())

    def endpoints(self, service: m.Service) -> list[m.Workload]:
        """The service's endpoint workloads that this node knows."""
        return [w for uid in service.endpoints if (w := self._workloads.get(uid)) is not None]

    def policies_for(self, workload: m.Workload) -> list[m.Authorization]:
        """The Authorizations selecting ``workload``: its namespace's plus mesh-wide ones."""
        namespaces: Iterable[str] = (workload.namespace, m.MESH_ROOT_NAMESPACE)
        if workload.namespace == m.MESH_ROOT_NAMESPACE:
            namespaces = (workload.namespace,)
        return [p for ns in namespaces for p in self._policies_by_ns.get(ns, {}).values()
                if p.selects(workload)]

    def all_policies(self) -> list[m.Authorization]:
        return list(self._policies.values())

    def waypoint(self, namespace: str, name: str) -> m.Waypoint | None:
        return self._waypoints.get(f"{namespace}/{name}")

    def all_waypoints(self) -> list[m.Waypoint]:
        return list(self._waypoints.values())

    def resources(self) -> list[m.Resource]:
        """Everything held: what a node proxy's supervisor hands a new worker as its snapshot."""
        return [*self._workloads.values(), *self._services.values(), *self._policies.values(),
                *self._waypoints.values(), *self._objects.values()]

    def objects(self, kind: str) -> list[m.KubeObject]:
        """Pass-through Kubernetes objects of one kind (HTTPRoute, TrafficPolicy): waypoints."""
        return [o for o in self._objects.values() if o.kind == kind]

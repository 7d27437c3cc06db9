"""The data path's view of the cluster: immutable, hashable resources.

Built by the controller from Kubernetes-shaped objects, carried on the config stream
(``shoal/api/config.proto``) and held by ``ConfigState`` on every node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Union

MESH_ROOT_NAMESPACE = "shoal-system"   # policies here apply mesh-wide

WORKLOAD = "workload"
SERVICE = "service"
AUTHORIZATION = "authorization"
WAYPOINT = "waypoint"
OBJECT = "object"
RESOURCE_TYPES = (WORKLOAD, SERVICE, AUTHORIZATION, WAYPOINT, OBJECT)


class Labels(Mapping[str, str]):
    """A read-only, hashable str -> str mapping (labels, selectors)."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items = dict(sorted((items or {}).items()))
        self._hash = hash(tuple(self._items.items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when every key/value of this selector is in ``labels`` (empty matches all)."""
        return all(labels.get(k) == v for k, v in self._items.items())


EMPTY_LABELS = Labels()


@dataclass(frozen=True)
class WaypointRef:
    namespace: str
    name: str


@dataclass(frozen=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    identity: int
    spiffe_id: str
    meshed: bool
    waypoint: WaypointRef | None = None
    protocol: str = "HBONE"             # "HBONE" | "TCP"
    labels: Labels = EMPTY_LABELS
    canonical_service: str = ""
    mtls_mode: str = "PERMISSIVE"       # "PERMISSIVE" | "STRICT"

    @property
    def key(self) -> str:
        return self.uid


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...] = ()
    endpoints: tuple[str, ...] = ()     # workload uids
    waypoint: WaypointRef | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


TARGET_KINDS = ("Gateway", "Service")


@dataclass(frozen=True)
class TargetRef:
    """What a targeted policy attaches to, in the policy's own namespace."""

    kind: str                            # "Gateway" (a waypoint) | "Service"
    name: str
    group: str = ""


@dataclass(frozen=True)
class Authorization:
    """Istio AuthorizationPolicy semantics: DENY first, then allow-if-any-ALLOW-matches.

    ``selector`` empty selects the whole namespace; in ``MESH_ROOT_NAMESPACE`` it selects
    the whole mesh. An ALLOW with no rules matches nothing (deny all); a rule with no
    sources/operations/conditions matches everything.

    A policy with ``target_refs`` (Istio's targetRefs) selects no workload: it attaches to
    a waypoint Gateway or a Service and only that waypoint enforces it. This is how L7
    rules reach the waypoint without the node proxies failing closed on rules they
    cannot see (Istio's ambient rule for L7 policies on workloads).
    """

    name: str
    namespace: str
    action: str                          # "ALLOW" | "DENY"
    selector: Labels = EMPTY_LABELS
    rules: tuple[Rule, ...] = ()
    target_refs: tuple[TargetRef, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, workload: Workload) -> bool:
        if self.target_refs:
            return False
        if self.namespace != MESH_ROOT_NAMESPACE and self.namespace != workload.namespace:
            return False
        return self.selector.matches(workload.labels)

    def targets(self, kind: str, namespace: str, name: str) -> bool:
        """Whether this policy attaches to the Gateway or Service ``namespace/name``."""
        return self.namespace == namespace and any(
            ref.kind == kind and ref.name == name for ref in self.target_refs)


@dataclass(frozen=True)
class Waypoint:
    name: str
    namespace: str
    ip: str
    service_account: str
    spiffe_id: str
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class KubeObject:
    """A Kubernetes-shaped object passed through as JSON (HTTPRoute, TrafficPolicy) for
    waypoints, which parse it with their own model."""

    kind: str
    namespace: str
    name: str
    json: str

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def body(self) -> dict:
        return json.loads(self.json)


Resource = Union[Workload, Service, Authorization, Waypoint, KubeObject]

_TYPE_OF = {Workload: WORKLOAD, Service: SERVICE, Authorization: AUTHORIZATION, Waypoint: WAYPOINT,
            KubeObject: OBJECT}


def resource_type(resource: Resource) -> str:
    return _TYPE_OF[type(resource)]


def resource_key(resource: Resource) -> str:
    """The stream key of a resource: ``"<type>/<name>"``."""
    return f"{_TYPE_OF[type(resource)]}/{resource.key}"


def split_key(key: str) -> tuple[str, str]:
    """``"service/demo/web"`` -> ``("service", "demo/web")``; ValueError on an unknown type."""
    kind, _, name = key.partition("/")
    if kind not in RESOURCE_TYPES or not name:
        raise ValueError(f"bad resource key {key!r}")
    return kind, name


@dataclass(frozen=True)
class ConfigDelta:
    """One applied push: what was upserted and which keys were removed.

    ``previous`` holds the replaced/removed objects (filled by ``ConfigState.apply``) so
    subscribers can undo what they derived from them (e.g. delete an old IP from a map).
    """

    version: str
    upserted: tuple[Resource, ...] = ()
    removed: tuple[str, ...] = ()                  # resource keys
    previous: Mapping[str, Resource] = field(default_factory=dict)

    def of_type(self, kind: type) -> tuple:
        return tuple(r for r in self.upserted if isinstance(r, kind))

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return self.of_type(Workload)

    @property
    def services(self) -> tuple[Service, ...]:
        return self.of_type(Service)

    @property
    def authorizations(self) -> tuple[Authorization, ...]:
        return self.of_type(Authorization)

    @property
    def waypoints(self) -> tuple[Waypoint, ...]:
        return self.of_type(Waypoint)

    @property
    def objects(self) -> tuple[KubeObject, ...]:
        return self.of_type(KubeObject)

    def removed_of_type(self, kind: str) -> tuple[str, ...]:
        """Names (without the type prefix) of removed resources of one type."""
        return tuple(split_key(k)[1] for k in self.removed if k.startswith(kind + "/"))

"""The data path's view of the cluster: immutable, hashable resources.

Built by the controller from Kubernetes-shaped objects, carried on the config stream
(``shoal/api/config.proto``) and held by ``ConfigState`` on every node.
"""
from __future__ import annotations

import ipaddress
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

# Kubernetes' IP family names (Service ``spec.ipFamilies``) and family policies.
IPV4, IPV6 = "IPv4", "IPv6"
IP_FAMILIES = (IPV4, IPV6)
SINGLE_STACK, PREFER_DUAL_STACK, REQUIRE_DUAL_STACK = (
    "SingleStack", "PreferDualStack", "RequireDualStack")
IP_FAMILY_POLICIES = (SINGLE_STACK, PREFER_DUAL_STACK, REQUIRE_DUAL_STACK)


def ip_family(address: str) -> str:
    """``"IPv4"`` or ``"IPv6"`` for an address; an IPv4-mapped IPv6 address is IPv4, because
    the data path treats ``::ffff:a.b.c.d`` exactly as ``a.b.c.d``."""
    parsed = ipaddress.ip_address(address)
    if parsed.version == 6 and parsed.ipv4_mapped is None:
        return IPV6
    return IPV4


def canonical_ip(address: str) -> str:
    """``address`` as the data path keys it: ``::ffff:a.b.c.d`` is ``a.b.c.d`` (an AF_INET6
    socket reports IPv4 peers that way); anything else, non-addresses included, unchanged."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else address


def _family_or_empty(address: str) -> str:
    """``ip_family`` for model construction, which does not validate: "" for a non-address
    (the config stream's decoder rejects those with the field named)."""
    try:
        return ip_family(address)
    except ValueError:
        return ""


def ipv4_first(addresses: tuple[str, ...]) -> tuple[str, ...]:
    """The addresses with IPv4 before IPv6, each family keeping its order (stable sort):
    one canonical order, so the same set of addresses always hashes and encodes the same."""
    return tuple(sorted(addresses, key=lambda a: _family_or_empty(a) == IPV6))


def _with_primary(primary: str, addresses: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """Fills the primary address and the full list from each other (backwards compatible:
    an object built with only ``ip`` has ``ips == (ip,)``), IPv4 first."""
    if not addresses:
        addresses = (primary,) if primary else ()
    addresses = ipv4_first(tuple(addresses))
    if not primary and addresses:
        primary = addresses[0]
    return primary, addresses


def address_of_family(addresses: tuple[str, ...], family: str) -> str:
    """The first address of ``family`` ("IPv4"/"IPv6") among ``addresses``, or ""."""
    return next((a for a in addresses if _family_or_empty(a) == family), "")


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
    # The owning workload, for telemetry (Istio's *_workload): a Deployment's pods carry
    # the Deployment; a bare Pod itself ("" : the pod's own name and kind Pod).
    workload_name: str = ""
    workload_kind: str = ""
    # Every address of the pod (Kubernetes ``status.podIPs``), IPv4 first when present, at
    # most one per family. ``ip`` stays the primary address (``status.podIP``) and is one of
    # them; built with only ``ip``, ``ips == (ip,)``.
    ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        primary, addresses = _with_primary(self.ip, self.ips)
        object.__setattr__(self, "ip", primary)
        object.__setattr__(self, "ips", addresses)

    @property
    def key(self) -> str:
        return self.uid

    def address(self, family: str) -> str:
        """The pod's address of ``family`` ("IPv4"/"IPv6"), or "" when it has none."""
        return address_of_family(self.ips, family)


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int
    protocol: str = "TCP"
    app_protocol: str = ""    # spec.ports[].appProtocol: the L7 protocol (waypoints pick HTTP/2 by it)


@dataclass(frozen=True)
class Service:
    """A Service. ``vip`` is the primary ClusterIP (``spec.clusterIP``); ``vips`` every
    ClusterIP (``spec.clusterIPs``), IPv4 first, at most one per family.

    ``ip_families`` and ``ip_family_policy`` are Kubernetes' ``spec.ipFamilies`` (in the
    object's order: the primary family first) and ``spec.ipFamilyPolicy``. Built with only
    ``vip``, ``vips == (vip,)`` and ``ip_families`` is that address's family; a headless
    Service (no ClusterIP) keeps ``ip_families`` empty unless given.
    """

    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...] = ()
    endpoints: tuple[str, ...] = ()     # workload uids
    waypoint: WaypointRef | None = None
    vips: tuple[str, ...] = ()
    ip_families: tuple[str, ...] = ()   # "IPv4" | "IPv6", primary first
    ip_family_policy: str = SINGLE_STACK

    def __post_init__(self) -> None:
        primary, addresses = _with_primary(self.vip, self.vips)
        object.__setattr__(self, "vip", primary)
        object.__setattr__(self, "vips", addresses)
        if not self.ip_families and primary:
            families = tuple(dict.fromkeys(
                f for f in map(_family_or_empty, (primary, *addresses)) if f))
            object.__setattr__(self, "ip_families", families)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def address(self, family: str) -> str:
        """The ClusterIP of ``family`` ("IPv4"/"IPv6"), or "" when the Service has none."""
        return address_of_family(self.vips, family)


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
    ips: tuple[str, ...] = ()           # every address, IPv4 first; ``ip`` is the primary

    def __post_init__(self) -> None:
        primary, addresses = _with_primary(self.ip, self.ips)
        object.__setattr__(self, "ip", primary)
        object.__setattr__(self, "ips", addresses)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def address(self, family: str) -> str:
        return address_of_family(self.ips, family)


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

"""The mesh model: Kubernetes-shaped objects in, config-stream resources out.

Both sources (the embedded store and Kubernetes list/watch) feed ``MeshModel.apply`` with
(event, object) pairs. The model keeps the raw objects, rebuilds only the resources an
event can affect (a pod change touches one workload and the services selecting it), and
returns the changed resource keys. Each resource is encoded once: its serialized
``Resource`` protobuf and a content-hash version, which is why versions survive a
controller restart and a reconnecting agent resumes with only what really changed.

Per-node filtering of policies is kept incrementally: which workloads each policy
selects, hence on which nodes it is needed.

Mesh membership: a namespace joins with ``shoal.io/mesh=enabled`` (alias
``istio.io/dataplane-mode=ambient``); a pod leaves with ``shoal.io/mesh=disabled`` (alias
``istio.io/dataplane-mode=none``); host-network pods are not workloads at all (they share
the node's IP).

mTLS mode: ``PeerAuthentication`` (Istio's shape, ``spec.mtls.mode`` STRICT|PERMISSIVE|UNSET,
optional ``spec.selector.matchLabels``). The most specific wins: a workload-selecting one in
the pod's namespace, then a namespace-wide one, then one in the root namespace
``shoal-system``; UNSET defers to the next level; the default is PERMISSIVE.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from shoal.config import (
    DEFAULT_TRUST_DOMAIN,
    LABEL_MESH,
    LABEL_MESH_ISTIO,
    LABEL_USE_WAYPOINT,
    LABEL_USE_WAYPOINT_ISTIO,
    WAYPOINT_GATEWAY_CLASS,
    spiffe_id,
)
from shoal.controller.identity import IdentityAllocator, IdentityPending
from shoal.xds import convert
from shoal.xds import model as m

log = logging.getLogger(__name__)

Obj = dict[str, Any]

WATCHED_KINDS = ("Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount",
                 "AuthorizationPolicy", "PeerAuthentication", "Gateway", "HTTPRoute", "GRPCRoute",
                 "TrafficPolicy")
PASS_THROUGH_KINDS = ("HTTPRoute", "GRPCRoute", "TrafficPolicy")   # sent to waypoints as KubeObjects
LABEL_SERVICE_NAME = "kubernetes.io/service-name"     # EndpointSlice -> Service
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"   # waypoint pods
TERMINAL_PHASES = ("Succeeded", "Failed")


class ObjectError(ValueError):
    """An object the model cannot use; the message names the field."""


@dataclass(frozen=True)
class Entry:
    """One resource as distributed: the model object, its version, its encoded bytes."""

    version: str
    resource: m.Resource
    encoded: bytes      # a serialized pb.Resource, version included


@dataclass
class Change:
    """What one ``apply`` changed: resource keys to re-diff for every connected node."""

    generation: int
    keys: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.keys)


def encode_entry(resource: m.Resource) -> Entry:
    body = convert.to_proto(resource).SerializeToString(deterministic=True)
    version = hashlib.blake2b(body, digest_size=8).hexdigest()
    # Field 3 (version, a 16-byte string) appended: protobuf accepts fields in any order,
    # so the message is serialized once.
    return Entry(version=version, resource=resource, encoded=body + b"\x1a\x10" + version.encode())


def namespace_meshed(namespace: Obj | None) -> bool:
    labels = _labels(namespace) if namespace else {}
    return labels.get(LABEL_MESH) == "enabled" or labels.get(LABEL_MESH_ISTIO) == "ambient"


def pod_meshed(pod: Obj, namespace: Obj | None) -> bool:
    """The mesh captures this pod: its namespace joined and the pod did not opt out.
    (The local kubelet asks the same question before it starts a pod.)"""
    labels = _labels(pod)
    return (namespace_meshed(namespace) and labels.get(LABEL_MESH) != "disabled"
            and labels.get(LABEL_MESH_ISTIO) != "none" and not (pod.get("spec") or {}).get("hostNetwork"))


def _labels(obj: Obj | None) -> dict[str, str]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


def _meta(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def _describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace + '/' if namespace else ''}{name}"


def _selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _waypoint_label(namespace: str, *objs: Obj | None) -> m.WaypointRef | None:
    """The first ``use-waypoint`` label among ``objs`` (most specific first): a waypoint of
    ``namespace`` (the waypoint lives with what uses it). The value "none" opts out."""
    for obj in objs:
        labels = _labels(obj)
        value = labels.get(LABEL_USE_WAYPOINT) or labels.get(LABEL_USE_WAYPOINT_ISTIO)
        if value:
            return None if value == "none" else m.WaypointRef(namespace=namespace, name=value)
    return None


def service_account(pod_spec: Obj) -> str:
    return pod_spec.get("serviceAccountName") or pod_spec.get("serviceAccount") or "default"


def owning_workload(pod: Obj) -> tuple[str, str]:
    """(kind, name) of what runs ``pod``, as Istio names workloads: the Deployment behind a
    ReplicaSet (its name less the ``pod-template-hash`` suffix), else the controlling
    owner; a bare Pod is its own workload."""
    meta = pod.get("metadata") or {}
    refs = [r for r in meta.get("ownerReferences") or [] if isinstance(r, dict) and r.get("kind") and r.get("name")]
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if ref is None:
        return "Pod", meta.get("name", "")
    kind, name = ref["kind"], ref["name"]
    template_hash = (meta.get("labels") or {}).get("pod-template-hash")
    if kind == "ReplicaSet" and template_hash and name.endswith(f"-{template_hash}"):
        return "Deployment", name[:-len(template_hash) - 1]
    return kind, name


def _condition_true(obj: Obj | None, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in ((obj or {}).get("status") or {}).get("conditions") or [] if isinstance(c, dict))


class MeshModel:
    def __init__(self, identities: IdentityAllocator | None = None,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, generation: int = 0) -> None:
        """``generation``: where the config version counter starts (the app resumes the last
        one it saved, so versions shown by ``shoal status`` keep growing across restarts)."""
        self.identities = identities if identities is not None else IdentityAllocator(None)
        self.trust_domain = trust_domain
        # kind -> namespace -> name -> object
        self._objects: dict[str, dict[str, dict[str, Obj]]] = {
            kind: defaultdict(dict) for kind in WATCHED_KINDS}
        self.resources: dict[str, Entry] = {}
        self.generation = generation
        self.errors: dict[str, str] = {}             # "Kind ns/name" -> problem
        # Policy selection, kept incrementally.
        self._members: dict[str, set[str]] = defaultdict(set)          # policy -> workloads
        self._selected_by: dict[str, set[str]] = defaultdict(set)      # workload -> policies
        self._policy_nodes: dict[str, Counter[str]] = defaultdict(Counter)
        self._policy_selectors = LabelIndex()                          # ns -> pair -> policies
        self._namespace_policies: dict[str, set[str]] = defaultdict(set)  # empty selectors
        # CA: which identities have pods on which node.
        self._node_identities: dict[str, Counter[str]] = defaultdict(Counter)
        self._scheduled: dict[tuple[str, str], tuple[str, str]] = {}   # pod -> (node, spiffe)
        # Label indexes (namespace -> (key, value) -> names): selectors look up candidates
        # instead of scanning every pod or service of a namespace.
        self._pod_labels = LabelIndex()
        self._service_selectors = LabelIndex()
        # Waypoints traffic may be sent to: (namespace, name) -> Gateway uid. A waypoint is
        # bound once it is ready (a Ready pod, or the Gateway Programmed), so a route never
        # points at a waypoint that does not listen yet; it stays bound while its Gateway
        # lives (a crashed waypoint fails closed rather than skipping its L7 policies).
        self._bound_waypoints: dict[tuple[str, str], str] = {}

    # -- reading -------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._objects[kind].get(namespace, {}).get(name)

    def objects(self, kind: str, namespace: str | None = None) -> Iterator[Obj]:
        spaces = self._objects[kind]
        if namespace is not None:
            yield from spaces.get(namespace, {}).values()
            return
        for objs in spaces.values():
            yield from objs.values()

    def entry(self, key: str) -> Entry | None:
        return self.resources.get(key)

    def policy_needed_on(self, key: str, node: str) -> bool:
        return self._policy_nodes.get(key, Counter())[node] > 0

    def identities_on_node(self, node: str) -> set[str]:
        """SPIFFE IDs of the service accounts with scheduled pods on ``node``."""
        return {sid for sid, count in self._node_identities.get(node, Counter()).items() if count}

    def identities_for_caller(self, node: str) -> set[str]:
        """What a caller may get certificates for: the identities on its node; a waypoint
        connecting as ``waypoint-<namespace>-<name>`` (its own name, as the waypoint's
        ConfigClient does) may also get its Gateway's identity."""
        allowed = self.identities_on_node(node)
        if node.startswith("waypoint-"):
            for key, entry in self.resources.items():
                if key.startswith(f"{m.WAYPOINT}/"):
                    waypoint = entry.resource
                    if node == f"waypoint-{waypoint.namespace}-{waypoint.name}":
                        allowed.add(waypoint.spiffe_id)
        return allowed

    def view(self, node: str, component: str) -> "NodeView":
        return NodeView(self, node, component)

    def counts(self) -> dict[str, int]:
        counts = Counter(key.partition("/")[0] for key in self.resources)
        return {kind: counts.get(kind, 0) for kind in m.RESOURCE_TYPES}

    # -- writing ---------------------------------------------------------------------------

    def replace(self, kind: str, objs: Iterable[Obj]) -> Change:
        """A relist: ``objs`` is every object of ``kind``; missing ones are deleted."""
        fresh = {_meta(o): o for o in objs}
        events = [("DELETED", obj) for obj in self.objects(kind) if _meta(obj) not in fresh]
        events += [("MODIFIED", obj) for obj in fresh.values()]
        return self.apply(events)

    def apply(self, events: Iterable[tuple[str, Obj]]) -> Change:
        """Applies watch events; returns the resource keys whose content or audience changed."""
        dirty_pods: set[tuple[str, str]] = set()
        dirty_services: set[tuple[str, str]] = set()
        dirty_policies: set[tuple[str, str]] = set()
        dirty_gateways: set[tuple[str, str]] = set()
        dirty_objects: set[tuple[str, str, str]] = set()
        for event, obj in events:
            kind = obj.get("kind")
            if kind not in self._objects:
                continue
            namespace, name = _meta(obj)
            old = self.get(kind, namespace, name)
            if event == "DELETED":
                self._objects[kind].get(namespace, {}).pop(name, None)
            else:
                self._objects[kind][namespace][name] = obj
            if kind == "Pod":
                self._pod_labels.remove(namespace, name, _labels(old))
                if event != "DELETED":
                    self._pod_labels.add(namespace, name, _labels(obj))
                dirty_pods.add((namespace, name))
                for labels in (_labels(old), _labels(obj)):
                    for svc_name in self._service_selectors.candidates_for_labels(namespace, labels):
                        svc = self.get("Service", namespace, svc_name)
                        selector = ((svc or {}).get("spec") or {}).get("selector")
                        if selector and _selector_matches(selector, labels):
                            dirty_services.add((namespace, svc_name))
                    gateway = labels.get(LABEL_GATEWAY_NAME)
                    if gateway:
                        dirty_gateways.add((namespace, gateway))
            elif kind == "Namespace":
                dirty_pods.update((name, pod) for pod in self._objects["Pod"].get(name, {}))
                dirty_services.update((name, s) for s in self._objects["Service"].get(name, {}))
            elif kind == "Service":
                self._service_selectors.remove(namespace, name,
                                               ((old or {}).get("spec") or {}).get("selector"))
                if event != "DELETED":
                    self._service_selectors.add(namespace, name,
                                                (obj.get("spec") or {}).get("selector"))
                dirty_services.add((namespace, name))
            elif kind == "EndpointSlice":
                for labels in (_labels(old), _labels(obj)):
                    if labels.get(LABEL_SERVICE_NAME):
                        dirty_services.add((namespace, labels[LABEL_SERVICE_NAME]))
            elif kind == "AuthorizationPolicy":
                dirty_policies.add((namespace, name))
            elif kind == "PeerAuthentication":
                spaces = (self._objects["Pod"].keys() if namespace == m.MESH_ROOT_NAMESPACE
                          else [namespace])
                for ns in list(spaces):
                    dirty_pods.update((ns, pod) for pod in self._objects["Pod"].get(ns, {}))
            elif kind == "Gateway":
                dirty_gateways.add((namespace, name))
            elif kind in PASS_THROUGH_KINDS:
                dirty_objects.add((kind, namespace, name))

        change = Change(generation=self.generation)
        # Policies first, so workloads are matched against current selectors; then a
        # policy's own membership is recomputed over its whole scope.
        changed_policies = [key for ns, name in sorted(dirty_policies)
                            if (key := self._rebuild_policy(ns, name, change)) is not None]
        # Waypoints before what uses them: a waypoint becoming bound (ready) or unbound
        # (Gateway gone) re-publishes the workloads and services of its namespace.
        for ns, name in sorted(dirty_gateways):
            self._rebuild(f"{m.WAYPOINT}/{ns}/{name}", functools.partial(self._build_waypoint, ns, name),
                          _describe("Gateway", ns, name), change)
            if self._rebind_waypoint(ns, name):
                dirty_pods.update((ns, pod) for pod in self._objects["Pod"].get(ns, {}))
                dirty_services.update((ns, svc) for svc in self._objects["Service"].get(ns, {}))
        for ns, name in sorted(dirty_pods):
            self._rebuild_workload(ns, name, change)
        for key in changed_policies:
            self._reselect_policy(key, change)
        for ns, name in sorted(dirty_services):
            self._rebuild(f"{m.SERVICE}/{ns}/{name}", functools.partial(self._build_service, ns, name),
                          _describe("Service", ns, name), change)
        for kind, ns, name in sorted(dirty_objects):
            self._rebuild(f"{m.OBJECT}/{kind}/{ns}/{name}",
                          functools.partial(self._build_object, kind, ns, name),
                          _describe(kind, ns, name), change)
        self.identities.commit()
        if change.keys:
            self.generation += 1
            change.generation = self.generation
        return change

    def recheck_withheld(self) -> Change:
        """Rebuilds the pods whose identity a following allocator withheld and now knows
        (restored from the leader's table, or allocated since this replica leads)."""
        known = {key for key in self.identities.withheld
                 if self.identities.lookup(*key) is not None or not self.identities.following}
        if not known:
            return Change(generation=self.generation)
        self.identities.withheld -= known
        pods = [pod for namespace in {ns for ns, _ in known}
                for pod in self.objects("Pod", namespace)
                if (namespace, service_account(pod.get("spec") or {})) in known]
        return self.apply(("MODIFIED", pod) for pod in pods)

    # -- rebuilding ----------------------------------------------------------------------------

    def _rebuild(self, key: str, build, description: str, change: Change) -> Entry | None:
        """Builds one resource; records the change. An object the model cannot use is
        reported in ``errors`` and its last good version stays in force."""
        try:
            resource = build()
        except ObjectError as err:
            self.errors[description] = f"{description}: {err}"
            log.warning("rejected %s: %s", description, err)
            return self.resources.get(key)
        self.errors.pop(description, None)
        old = self.resources.get(key)
        if resource is None:
            if old is not None:
                del self.resources[key]
                change.keys.add(key)
            return None
        entry = encode_entry(resource)
        if old is None or old.version != entry.version:
            self.resources[key] = entry
            change.keys.add(key)
            return entry
        return old

    def _rebuild_workload(self, namespace: str, name: str, change: Change) -> None:
        key = f"{m.WORKLOAD}/{namespace}/{name}"
        old = self.resources.get(key)
        entry = self._rebuild(key, lambda: self._build_workload(namespace, name),
                              _describe("Pod", namespace, name), change)
        self._track_scheduled(namespace, name)
        if entry is not old:
            self._select_workload(key, entry.resource if entry else None,
                                  old.resource.node if old else None, change)

    def _track_scheduled(self, namespace: str, name: str) -> None:
        """The CA's view: which identity each scheduled pod has on which node (even before
        the pod has an IP, so its node proxy can fetch the certificate early)."""
        pod = self.get("Pod", namespace, name)
        placed = None
        if pod is not None:
            spec, status = pod.get("spec") or {}, pod.get("status") or {}
            if spec.get("nodeName") and status.get("phase") not in TERMINAL_PHASES:
                placed = (spec["nodeName"], spiffe_id(namespace, service_account(spec), self.trust_domain))
        before = self._scheduled.pop((namespace, name), None)
        if before == placed:
            if placed is not None:
                self._scheduled[(namespace, name)] = placed
            return
        if before is not None:
            self._node_identities[before[0]][before[1]] -= 1
        if placed is not None:
            self._scheduled[(namespace, name)] = placed
            self._node_identities[placed[0]][placed[1]] += 1

    def _select_workload(self, key: str, workload: m.Workload | None, old_node: str | None,
                         change: Change) -> None:
        """Updates which policies select a (re)built workload and where they are needed."""
        for policy in self._selected_by.pop(key, set()):
            self._members[policy].discard(key)
            self._count(policy, old_node, -1, change)
        if workload is None:
            return
        selected = set()
        for ns in {workload.namespace, m.MESH_ROOT_NAMESPACE}:
            candidates = self._namespace_policies.get(ns, set()) | \
                self._policy_selectors.candidates_for_labels(ns, workload.labels)
            for policy in candidates:
                entry = self.resources.get(policy)
                if entry is not None and entry.resource.selects(workload):
                    selected.add(policy)
                    self._members[policy].add(key)
                    self._count(policy, workload.node, +1, change)
        if selected:
            self._selected_by[key] = selected

    def _count(self, policy: str, node: str | None, delta: int, change: Change) -> None:
        if node is None:
            return
        counter = self._policy_nodes[policy]
        before = counter[node] > 0
        counter[node] += delta
        if counter[node] <= 0:
            del counter[node]
        if before != (counter[node] > 0):
            change.keys.add(policy)   # the policy's audience changed on this node

    def _rebuild_policy(self, namespace: str, name: str, change: Change) -> str | None:
        key = f"{m.AUTHORIZATION}/{namespace}/{name}"
        old = self.resources.get(key)
        entry = self._rebuild(key, lambda: self._build_policy(namespace, name),
                              _describe("AuthorizationPolicy", namespace, name), change)
        if entry is old:
            return None
        if old is not None:
            self._policy_selectors.remove(namespace, key, old.resource.selector)
            self._namespace_policies[namespace].discard(key)
        if entry is not None:
            if entry.resource.selector:
                self._policy_selectors.add(namespace, key, entry.resource.selector)
            else:
                self._namespace_policies[namespace].add(key)
        return key

    def _reselect_policy(self, key: str, change: Change) -> None:
        """Recomputes which workloads a changed policy selects."""
        for workload_key in self._members.pop(key, set()):
            self._selected_by[workload_key].discard(key)
        before = set(self._policy_nodes.pop(key, Counter()))
        entry = self.resources.get(key)
        counter: Counter[str] = Counter()
        if entry is not None:
            policy: m.Authorization = entry.resource
            spaces = (list(self._objects["Pod"]) if policy.namespace == m.MESH_ROOT_NAMESPACE
                      else [policy.namespace])
            candidates = [(ns, name) for ns in spaces
                          for name in self._pods_selected(ns, policy.selector)]
            for pod_ns, pod_name in candidates:
                workload_key = f"{m.WORKLOAD}/{pod_ns}/{pod_name}"
                workload = self.resources.get(workload_key)
                if workload is not None and policy.selects(workload.resource):
                    self._members[key].add(workload_key)
                    self._selected_by[workload_key].add(key)
                    counter[workload.resource.node] += 1
            self._policy_nodes[key] = counter
        if before != set(counter):
            change.keys.add(key)

    def _pods_selected(self, namespace: str, selector: Mapping[str, str]) -> list[str]:
        """Names of the pods of ``namespace`` whose labels match ``selector`` (empty: all)."""
        pods = self._objects["Pod"].get(namespace, {})
        if not selector:
            return list(pods)
        candidates = self._pod_labels.candidates_for_selector(namespace, selector)
        return [name for name in candidates
                if name in pods and _selector_matches(selector, _labels(pods[name]))]

    # -- builders: Kubernetes object -> model ----------------------------------------------------

    def _build_workload(self, namespace: str, name: str) -> m.Workload | None:
        pod = self.get("Pod", namespace, name)
        if pod is None:
            return None
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        node = spec.get("nodeName")
        if not node or status.get("phase") in TERMINAL_PHASES:
            return None
        if spec.get("hostNetwork"):
            return None   # it has the node's IP, shared with every other host-network pod
        labels = _labels(pod)
        owner_kind, owner_name = owning_workload(pod)
        ns_obj = self.get("Namespace", "", namespace)
        meshed = pod_meshed(pod, ns_obj)
        sa = service_account(spec)
        ip, ips = pod_addresses(status)
        if not ip:
            return None   # not routable yet: it appears once the CNI has given it an address
        try:
            identity = self.identities.get(namespace, sa)
        except IdentityPending:
            return None   # a standby: published once the leader's number arrives
        return m.Workload(
            uid=f"{namespace}/{name}", name=name, namespace=namespace, service_account=sa,
            node=node, ip=ip, ips=ips, identity=identity,
            spiffe_id=spiffe_id(namespace, sa, self.trust_domain), meshed=meshed,
            waypoint=self._bound_waypoint(_waypoint_label(namespace, pod, ns_obj)) if meshed else None,
            protocol="HBONE" if meshed else "TCP", labels=m.Labels(labels),
            canonical_service=(labels.get("service.istio.io/canonical-name")
                               or labels.get("app.kubernetes.io/name") or labels.get("app")
                               or owner_name),
            workload_name=owner_name, workload_kind=owner_kind,
            mtls_mode=self._mtls_mode(namespace, labels))

    def _mtls_mode(self, namespace: str, labels: Mapping[str, str]) -> str:
        levels = []
        for peer in self.objects("PeerAuthentication", namespace):
            selector = ((peer.get("spec") or {}).get("selector") or {}).get("matchLabels")
            if selector and _selector_matches(selector, labels):
                levels.insert(0, peer)
            elif not selector:
                levels.append(peer)
        levels += [p for p in self.objects("PeerAuthentication", m.MESH_ROOT_NAMESPACE)
                   if not ((p.get("spec") or {}).get("selector") or {}).get("matchLabels")]
        for peer in levels:
            mode = ((peer.get("spec") or {}).get("mtls") or {}).get("mode", "UNSET")
            if mode in ("STRICT", "PERMISSIVE"):
                return mode
        return "PERMISSIVE"

    def _build_service(self, namespace: str, name: str) -> m.Service | None:
        svc = self.get("Service", namespace, name)
        if svc is None:
            return None
        spec = svc.get("spec") or {}
        vip, vips, families, family_policy = service_addresses(spec)
        selector = spec.get("selector")
        if selector:
            endpoints = sorted(
                f"{namespace}/{pod_name}"
                for pod_name in self._pods_selected(namespace, selector)
                if f"{m.WORKLOAD}/{namespace}/{pod_name}" in self.resources)
        else:
            endpoints = sorted(self._slice_endpoints(namespace, name))
        ports = []
        for i, port in enumerate(spec.get("ports") or []):
            number = port.get("port")
            if not isinstance(number, int) or not 1 <= number <= 65535:
                raise ObjectError(f"spec.ports[{i}].port: expected 1-65535, got {number!r}")
            target = port.get("targetPort", number)
            if isinstance(target, str):
                target = self._named_port(namespace, endpoints, target)
            protocol = port.get("protocol", "TCP")
            if protocol not in convert.PORT_PROTOCOLS:
                raise ObjectError(f"spec.ports[{i}].protocol: unsupported {protocol!r}")
            app_protocol = port.get("appProtocol", "")
            if not isinstance(app_protocol, str):
                raise ObjectError(f"spec.ports[{i}].appProtocol: expected a string, got {app_protocol!r}")
            ports.append(m.ServicePort(name=port.get("name", ""), port=number,
                                       target_port=target, protocol=protocol, app_protocol=app_protocol))
        ns_obj = self.get("Namespace", "", namespace)
        return m.Service(name=name, namespace=namespace, vip=vip, ports=tuple(ports),
                         endpoints=tuple(endpoints),
                         waypoint=self._bound_waypoint(_waypoint_label(namespace, svc, ns_obj)),
                         vips=vips, ip_families=families, ip_family_policy=family_policy)

    def _slice_endpoints(self, namespace: str, service: str) -> set[str]:
        uids = set()
        for eps in self.objects("EndpointSlice", namespace):
            if _labels(eps).get(LABEL_SERVICE_NAME) != service:
                continue
            for endpoint in eps.get("endpoints") or []:
                ref = endpoint.get("targetRef") or {}
                if ref.get("kind") == "Pod" and ref.get("name"):
                    uids.add(f"{ref.get('namespace') or namespace}/{ref['name']}")
        return uids

    def _named_port(self, namespace: str, endpoints: list[str], port_name: str) -> int:
        """Resolves a named targetPort from the first endpoint that declares it (0: unknown)."""
        for uid in endpoints:
            pod = self.get("Pod", namespace, uid.split("/", 1)[1])
            for container in ((pod or {}).get("spec") or {}).get("containers") or []:
                for port in container.get("ports") or []:
                    if port.get("name") == port_name:
                        return int(port.get("containerPort", 0))
        return 0

    def _build_policy(self, namespace: str, name: str) -> m.Authorization | None:
        obj = self.get("AuthorizationPolicy", namespace, name)
        if obj is None:
            return None
        return authorization_from_object(obj)

    def _bound_waypoint(self, ref: m.WaypointRef | None) -> m.WaypointRef | None:
        """``ref`` if traffic may go to that waypoint now; else None (traffic stays on L4,
        as before the waypoint was asked for)."""
        return ref if ref is not None and (ref.namespace, ref.name) in self._bound_waypoints else None

    def _waypoint_pods(self, namespace: str, name: str) -> list[Obj]:
        return [pod for pod in self.objects("Pod", namespace) if _labels(pod).get(LABEL_GATEWAY_NAME) == name]

    def _rebind_waypoint(self, namespace: str, name: str) -> bool:
        """Updates whether waypoint ``namespace/name`` is bound; True if that changed."""
        key = (namespace, name)
        entry = self.resources.get(f"{m.WAYPOINT}/{namespace}/{name}")
        gateway = self.get("Gateway", namespace, name)
        uid = ((gateway or {}).get("metadata") or {}).get("uid", "")
        was = self._bound_waypoints.get(key)
        if entry is None:
            bound = False
        elif was is not None and was == uid:
            bound = True   # sticky while this Gateway lives
        else:
            bound = _condition_true(gateway, "Programmed") or any(
                _condition_true(pod, "Ready") for pod in self._waypoint_pods(namespace, name))
        if bound:
            self._bound_waypoints[key] = uid
        else:
            self._bound_waypoints.pop(key, None)
        if bound != (was is not None):
            log.info("waypoint %s/%s %s", namespace, name, "ready: traffic moves to it" if bound
                     else "gone: traffic moves away")
            return True
        return False

    def waypoint_bound(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._bound_waypoints

    def _build_waypoint(self, namespace: str, name: str) -> m.Waypoint | None:
        gateway = self.get("Gateway", namespace, name)
        if gateway is None or (gateway.get("spec") or {}).get("gatewayClassName") \
                != WAYPOINT_GATEWAY_CLASS:
            return None
        meta = gateway.get("metadata") or {}
        ips = tuple(address.get("value") for address in
                    (gateway.get("status") or {}).get("addresses") or [] if address.get("value"))
        ip = ips[0] if ips else ""
        if not ip:
            # A Ready pod first: an address that listens (replacement pods start unready).
            pods = sorted(self._waypoint_pods(namespace, name), key=lambda pod: not _condition_true(pod, "Ready"))
            for pod in pods:
                ip, ips = pod_addresses(pod.get("status") or {})
                if ip:
                    break
        try:
            ips = convert.check_addresses("status.addresses", ip, ips, "address")
        except ValueError as err:
            raise ObjectError(str(err)) from None
        sa = (meta.get("annotations") or {}).get("shoal.io/service-account") or name
        return m.Waypoint(name=name, namespace=namespace, ip=ip, ips=ips, service_account=sa,
                          spiffe_id=spiffe_id(namespace, sa, self.trust_domain),
                          uid=meta.get("uid", ""))

    def _build_object(self, kind: str, namespace: str, name: str) -> m.KubeObject | None:
        obj = self.get(kind, namespace, name)
        if obj is None:
            return None
        body = {k: v for k, v in obj.items() if k != "status"}
        body["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items()
                            if k not in ("managedFields", "resourceVersion")}
        return m.KubeObject(kind=kind, namespace=namespace, name=name,
                            json=json.dumps(body, sort_keys=True, separators=(",", ":")))


def pod_addresses(status: Obj) -> tuple[str, tuple[str, ...]]:
    """A pod's primary address and every address: ``status.podIP`` and ``status.podIPs``
    (a dual-stack pod has one of each family; ``podIPs[0]`` is ``podIP``)."""
    ip = status.get("podIP") or ""
    listed = tuple(entry.get("ip") or "" for entry in status.get("podIPs") or []
                   if isinstance(entry, dict))
    try:
        convert.check_ip("status.podIP", ip, allow_empty=True)
        ips = convert.check_addresses("status.podIPs", ip, listed, "status.podIP")
    except ValueError as err:
        raise ObjectError(str(err)) from None
    return ip or (ips[0] if ips else ""), ips


def service_addresses(spec: Obj) -> tuple[str, tuple[str, ...], tuple[str, ...], str]:
    """A Service's ClusterIPs and families from ``spec.clusterIP``/``clusterIPs``/
    ``ipFamilies``/``ipFamilyPolicy``, checked as the API server does (the local store's
    ``shoal apply`` has already refused bad ones with the object named)."""
    vip = spec.get("clusterIP") or ""
    vip = "" if vip == "None" else vip
    listed = tuple(a for a in spec.get("clusterIPs") or () if a and a != "None")
    families = tuple(spec.get("ipFamilies") or ())
    policy = spec.get("ipFamilyPolicy") or m.SINGLE_STACK
    try:
        convert.check_ip("spec.clusterIP", vip, allow_empty=True)
        vips = convert.check_addresses("spec.clusterIPs", vip, listed, "spec.clusterIP")
        for i, family in enumerate(families):
            if family not in m.IP_FAMILIES:
                raise ValueError(f"spec.ipFamilies[{i}]: {family!r} is not one of IPv4, IPv6")
        for address in vips:
            if families and m.ip_family(address) not in families:
                raise ValueError(f"spec.clusterIPs: {address} is not of spec.ipFamilies "
                                 f"{list(families)}")
        if policy not in m.IP_FAMILY_POLICIES:
            raise ValueError(f"spec.ipFamilyPolicy: {policy!r} is not one of "
                             f"{', '.join(m.IP_FAMILY_POLICIES)}")
    except ValueError as err:
        raise ObjectError(str(err)) from None
    return vip or (vips[0] if vips else ""), vips, families, policy


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ObjectError(f"{where}: expected a list of strings")
    return tuple(value)


def _ports(value: Any, where: str) -> tuple[int, ...]:
    ports = []
    for i, port in enumerate(_strings([str(p) for p in value] if isinstance(value, list)
                                      else value, where)):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ObjectError(f"{where}[{i}]: expected a port number, got {port!r}")
        ports.append(int(port))
    return tuple(ports)


def _cidrs(value: Any, where: str) -> tuple[str, ...]:
    blocks = _strings(value, where)
    for i, block in enumerate(blocks):
        try:
            convert.check_cidr(f"{where}[{i}]", block)
        except ValueError as err:
            raise ObjectError(str(err)) from None
    return blocks


def authorization_from_object(obj: Obj) -> m.Authorization:
    """An AuthorizationPolicy (Istio's spec shape) -> Authorization; ObjectError names the field."""
    namespace, name = _meta(obj)
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise ObjectError("spec: expected a mapping")
    action = spec.get("action", "ALLOW")
    if action not in convert.ACTIONS:
        raise ObjectError(f"spec.action: {action!r} is not supported (ALLOW or DENY)")
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not isinstance(selector, dict):
        raise ObjectError("spec.selector.matchLabels: expected a map of strings")
    rules = []
    raw_rules = spec.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ObjectError("spec.rules: expected a list")
    for i, rule in enumerate(raw_rules):
        where = f"spec.rules[{i}]"
        if not isinstance(rule, dict):
            raise ObjectError(f"{where}: expected a mapping")
        sources = []
        for j, item in enumerate(rule.get("from") or []):
            src = (item or {}).get("source") or {}
            here = f"{where}.from[{j}].source"
            sources.append(m.Source(
                principals=_strings(src.get("principals"), f"{here}.principals"),
                not_principals=_strings(src.get("notPrincipals"), f"{here}.notPrincipals"),
                namespaces=_strings(src.get("namespaces"), f"{here}.namespaces"),
                not_namespaces=_strings(src.get("notNamespaces"), f"{here}.notNamespaces"),
                ip_blocks=_cidrs(src.get("ipBlocks"), f"{here}.ipBlocks"),
                not_ip_blocks=_cidrs(src.get("notIpBlocks"), f"{here}.notIpBlocks")))
        operations = []
        for j, item in enumerate(rule.get("to") or []):
            op = (item or {}).get("operation") or {}
            here = f"{where}.to[{j}].operation"
            operations.append(m.Operation(
                ports=_ports(op.get("ports"), f"{here}.ports"),
                not_ports=_ports(op.get("notPorts"), f"{here}.notPorts"),
                methods=_strings(op.get("methods"), f"{here}.methods"),
                not_methods=_strings(op.get("notMethods"), f"{here}.notMethods"),
                paths=_strings(op.get("paths"), f"{here}.paths"),
                not_paths=_strings(op.get("notPaths"), f"{here}.notPaths"),
                hosts=_strings(op.get("hosts"), f"{here}.hosts"),
                not_hosts=_strings(op.get("notHosts"), f"{here}.notHosts")))
        conditions = []
        for j, cond in enumerate(rule.get("when") or []):
            here = f"{where}.when[{j}]"
            if not isinstance(cond, dict) or not isinstance(cond.get("key"), str):
                raise ObjectError(f"{here}.key: required string")
            conditions.append(m.Condition(key=cond["key"],
                                          values=_strings(cond.get("values"), f"{here}.values"),
                                          not_values=_strings(cond.get("notValues"),
                                                              f"{here}.notValues")))
        rules.append(m.Rule(sources=tuple(sources), operations=tuple(operations),
                            conditions=tuple(conditions)))
    return m.Authorization(name=name, namespace=namespace, action=action,
                           selector=m.Labels({str(k): str(v) for k, v in selector.items()}),
                           rules=tuple(rules), target_refs=_target_refs(spec))


def _target_refs(spec: Obj) -> tuple[m.TargetRef, ...]:
    """``spec.targetRefs`` (or the older single ``spec.targetRef``): Gateways and Services."""
    raw = spec.get("targetRefs")
    field = "spec.targetRefs"
    if raw is None and spec.get("targetRef") is not None:
        raw, field = [spec["targetRef"]], "spec.targetRef"
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ObjectError(f"{field}: expected a list")
    if raw and spec.get("selector"):
        raise ObjectError(f"{field}: cannot be combined with spec.selector")
    refs = []
    for i, ref in enumerate(raw):
        here = f"{field}[{i}]" if field.endswith("s") else field
        if not isinstance(ref, dict):
            raise ObjectError(f"{here}: expected a mapping")
        if ref.get("kind") not in m.TARGET_KINDS:
            raise ObjectError(f"{here}.kind: {ref.get('kind')!r} is not supported (Gateway or Service)")
        if not isinstance(ref.get("name"), str) or not ref["name"]:
            raise ObjectError(f"{here}.name: required string")
        refs.append(m.TargetRef(kind=ref["kind"], name=ref["name"], group=str(ref.get("group", ""))))
    return tuple(refs)


class LabelIndex:
    """namespace -> (label key, value) -> names, for selector lookups."""

    def __init__(self) -> None:
        self._index: dict[str, dict[tuple[str, str], set[str]]] = defaultdict(
            lambda: defaultdict(set))

    def add(self, namespace: str, name: str, labels: Mapping[str, str] | None) -> None:
        for pair in (labels or {}).items():
            self._index[namespace][pair].add(name)

    def remove(self, namespace: str, name: str, labels: Mapping[str, str] | None) -> None:
        space = self._index.get(namespace)
        if space is None:
            return
        for pair in (labels or {}).items():
            names = space.get(pair)
            if names is not None:
                names.discard(name)
                if not names:
                    del space[pair]

    def candidates_for_selector(self, namespace: str, selector: Mapping[str, str]) -> set[str]:
        """Names having at least the rarest of the selector's pairs (a superset of matches)."""
        space = self._index.get(namespace, {})
        sets = [space.get(pair, set()) for pair in selector.items()]
        return min(sets, key=len) if sets else set()

    def candidates_for_labels(self, namespace: str, labels: Mapping[str, str]) -> set[str]:
        """Names indexed under any of ``labels``' pairs (e.g. services that may select them)."""
        space = self._index.get(namespace, {})
        found: set[str] = set()
        for pair in labels.items():
            found |= space.get(pair, set())
        return found


class NodeView(Mapping[str, str]):
    """key -> version of what one node's component should hold (for ``DeltaSender.plan``).

    Everyone gets all workloads, services and waypoints; proxies get the policies
    selecting a workload on their node; agents (connect-time L4 DENY at the source) and
    waypoints get every policy; waypoints also get the
    pass-through objects (routes, traffic policies).
    """

    def __init__(self, model: MeshModel, node: str, component: str) -> None:
        self._model, self._node, self._component = model, node, component

    def _wanted(self, key: str) -> bool:
        kind = key.partition("/")[0]
        if kind == m.AUTHORIZATION:
            # Agents enforce L4 DENY at the source's connect(), so they need every policy.
            return self._component in ("waypoint", "agent") or self._model.policy_needed_on(key, self._node)
        if kind == m.OBJECT:
            return self._component == "waypoint"
        return True

    def get(self, key: str, default=None):
        entry = self._model.resources.get(key)
        if entry is None or not self._wanted(key):
            return default
        return entry.version

    def __getitem__(self, key: str) -> str:
        version = self.get(key)
        if version is None:
            raise KeyError(key)
        return version

    def __iter__(self) -> Iterator[str]:
        return (key for key in self._model.resources if self._wanted(key))

    def __len__(self) -> int:
        return sum(1 for _ in self)

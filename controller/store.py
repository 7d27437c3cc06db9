"""The embedded object store behind ``shoal apply``: Kubernetes-shaped objects in SQLite.

It plays the API server's part for the local cluster: validation, defaults (namespace,
ClusterIP, uid, resourceVersion), a Deployment controller and a scheduler, all-or-nothing
multi-document applies, and a watch feed. The controller's model consumes it exactly as it
consumes the Kubernetes list/watch source.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from shoal.controller import manifests
from shoal.controller.manifests import ManifestError, object_key
from shoal.xds import model as m

log = logging.getLogger(__name__)

Obj = dict[str, Any]


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED
    object: Obj


Watcher = Callable[[list[WatchEvent]], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# The ClusterIP ranges of the embedded store, one per IP family (kube-apiserver's
# --service-cluster-ip-range): Services get their addresses from these.
SERVICE_CIDRS = ("10.96.0.0/16", "fd00:10:96::/112")


class Store:
    """Kubernetes-shaped objects, persisted; every write is one transaction."""

    def __init__(self, path: Path | str, service_cidrs: Iterable[str] = SERVICE_CIDRS):
        """``service_cidrs``: the ClusterIP range of each IP family the cluster has."""
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._service_nets = {m.ip_family(str(net.network_address)): net
                              for net in map(ipaddress.ip_network, service_cidrs)}
        self._watchers: list[Watcher] = []
        # What this process has seen, to tell other processes' writes (``follow_others``).
        self._following = False
        self._seen_version = 0
        self._seen: dict[tuple[str, str, str], Obj] = {}

    def close(self) -> None:
        self._db.close()

    # -- reads -------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        row = self._db.execute("SELECT body FROM objects WHERE kind=? AND namespace=? AND name=?",
                               (kind, namespace or "", name)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        if namespace is None:
            rows = self._db.execute("SELECT body FROM objects WHERE kind=? ORDER BY namespace, name", (kind,))
        else:
            rows = self._db.execute("SELECT body FROM objects WHERE kind=? AND namespace=? ORDER BY name",
                                    (kind, namespace))
        return [json.loads(body) for (body,) in rows]

    @property
    def resource_version(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='resourceVersion'").fetchone()
        return int(row[0]) if row else 0

    def watch(self, watcher: Watcher) -> None:
        """Calls ``watcher`` with the events of every committed write, in order."""
        self._watchers.append(watcher)

    def follow_others(self) -> None:
        """Starts telling this process's watchers of other processes' writes (``poll``): the
        local cluster's kubelet and its controller run apart when the controller is a container."""
        self._db.execute("BEGIN")
        try:
            self._seen_version = self.resource_version
            self._seen = {object_key(obj): obj for obj in self._all()}
        finally:
            self._db.execute("COMMIT")
        self._following = True

    def poll(self) -> list[WatchEvent]:
        """Publishes, and returns, the writes other processes committed since the last look
        (one cheap read when there are none). Only after ``follow_others``."""
        if not self._following or self.resource_version == self._seen_version:
            return []
        self._db.execute("BEGIN")     # one snapshot: the version and the rows agree
        try:
            version = self.resource_version
            current = {object_key(obj): obj for obj in self._all()}
        finally:
            self._db.execute("COMMIT")
        events = [WatchEvent("DELETED", obj) for key, obj in self._seen.items() if key not in current]
        for key, obj in current.items():
            before = self._seen.get(key)
            if before is None:
                events.append(WatchEvent("ADDED", obj))
            elif before["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                events.append(WatchEvent("MODIFIED", obj))
        self._seen, self._seen_version = current, version
        if events:
            self._publish(events)
        return events

    def _all(self) -> list[Obj]:
        return [json.loads(body) for (body,) in self._db.execute("SELECT body FROM objects")]

    def _publish(self, events: list[WatchEvent]) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(events)
            except Exception:  # a broken watcher must not undo a committed write
                log.exception("store watcher failed")

    def _committed(self, started_at: int, version: int, events: list[WatchEvent]) -> None:
        """After this process's own commit: publish it, and remember it as seen. Writes of
        others that came before it and were not polled yet stay for ``poll`` to find."""
        if self._following:
            for event in events:
                if event.type == "DELETED":
                    self._seen.pop(object_key(event.object), None)
                else:
                    self._seen[object_key(event.object)] = event.object
            if started_at == self._seen_version:
                self._seen_version = version
        self._publish(events)

    # -- writes ------------------------------------------------------------------------

    def apply(self, docs: Iterable[Any]) -> list[WatchEvent]:
        """Creates or updates every object, or none of them (raises ManifestError)."""
        objs = [manifests.normalize(copy.deepcopy(o)) for o in manifests.validate_all(docs)]
        with _Transaction(self) as tx:
            for obj in objs:
                self._check_references(tx, obj)
            for obj in objs:
                if obj["kind"] == "Deployment":
                    tx.put(obj)
                    self._reconcile_deployment(tx, obj)
                elif obj["kind"] == "Pod":
                    self._schedule(tx, obj)
                    tx.put(obj)
                elif obj["kind"] == "Service":
                    self._assign_cluster_ip(tx, obj)
                    tx.put(obj)
                else:
                    tx.put(obj)
        return tx.events

    def delete(self, docs: Iterable[Any]) -> list[WatchEvent]:
        """Deletes objects named by (kind, namespace, name), cascading like the API server."""
        with _Transaction(self) as tx:
            keys = []
            for doc in docs:
                if not isinstance(doc, dict):
                    raise ManifestError([f"expected an object to delete, got {type(doc).__name__}"])
                keys.append(object_key(manifests.normalize(copy.deepcopy(doc))))
            missing = [f"{kind} {namespace + '/' if namespace else ''}{name}: not found"
                       for kind, namespace, name in keys if tx.get(kind, namespace, name) is None]
            if missing:
                raise ManifestError(missing)
            for kind, namespace, name in keys:
                # A Namespace named earlier in the same file took its objects with it.
                if tx.get(kind, namespace, name) is not None:
                    self._delete_cascading(tx, kind, namespace, name)
        return tx.events

    def update_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merges ``status`` into an object's status (the kubelet's writes)."""
        with _Transaction(self) as tx:
            obj = tx.get(kind, namespace, name)
            if obj is None:
                return
            merged = {**obj.get("status", {}), **status}
            if merged != obj.get("status"):
                obj["status"] = merged
                tx.put(obj, keep_status=False)

    # -- the API server's defaulting and controllers ------------------------------------

    def _check_references(self, tx: "_Transaction", obj: Obj) -> None:
        node = (obj.get("spec") or {}).get("nodeName")
        if obj["kind"] == "Pod" and node and tx.get("Node", "", node) is None:
            raise ManifestError([f"{manifests.describe(obj)}: spec.nodeName: no node named {node!r}"])

    def _schedule(self, tx: "_Transaction", pod: Obj) -> None:
        spec = pod.setdefault("spec", {})
        if spec.get("nodeName"):
            return
        existing = tx.get("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])
        if existing and existing["spec"].get("nodeName"):
            spec["nodeName"] = existing["spec"]["nodeName"]
            return
        nodes = [n["metadata"]["name"] for n in tx.list("Node")]
        if not nodes:
            raise ManifestError([f"{manifests.describe(pod)}: spec.nodeName: the cluster has no nodes"])
        load = {n: 0 for n in nodes}
        for other in tx.list("Pod"):
            if other["spec"].get("nodeName") in load:
                load[other["spec"]["nodeName"]] += 1
        spec["nodeName"] = min(nodes, key=lambda n: (load[n], n))

    def _reconcile_deployment(self, tx: "_Transaction", deployment: Obj) -> None:
        """Pods ``<name>-0 .. <name>-(replicas-1)``, spread over the nodes in order."""
        meta, spec = deployment["metadata"], deployment["spec"]
        namespace, name = meta["namespace"], meta["name"]
        template = spec["template"]
        nodes = sorted(n["metadata"]["name"] for n in tx.list("Node"))
        replicas = spec.get("replicas", 1)
        if replicas and not nodes and not template["spec"].get("nodeName"):
            raise ManifestError([f"{manifests.describe(deployment)}: spec.template.spec.nodeName: "
                                 "the cluster has no nodes"])
        wanted = set()
        for i in range(replicas):
            pod_name = f"{name}-{i}"
            wanted.add(pod_name)
            pod_spec = copy.deepcopy(template["spec"])
            pod_spec.setdefault("nodeName", nodes[i % len(nodes)] if nodes else None)
            existing = tx.get("Pod", namespace, pod_name)
            if existing and existing["spec"].get("nodeName"):
                pod_spec["nodeName"] = existing["spec"]["nodeName"]
            tx.put({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": pod_name, "namespace": namespace,
                    "labels": dict((template.get("metadata") or {}).get("labels", {})),
                    "annotations": dict((template.get("metadata") or {}).get("annotations", {})),
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name}],
                },
                "spec": pod_spec,
            })
        for pod in tx.list("Pod", namespace):
            owners = pod["metadata"].get("ownerReferences", [])
            if any(o.get("kind") == "Deployment" and o.get("name") == name for o in owners) \
                    and pod["metadata"]["name"] not in wanted:
                tx.remove("Pod", namespace, pod["metadata"]["name"])

    def _assign_cluster_ip(self, tx: "_Transaction", service: Obj) -> None:
        """Fills ``spec.clusterIP(s)``, ``ipFamilies`` and ``ipFamilyPolicy`` as the API server
        of a dual-stack cluster does: one ClusterIP per requested family, IPv4 primary unless
        the Service says otherwise. SingleStack (Kubernetes' default) gets the primary family
        only; PreferDualStack and RequireDualStack get both. ClusterIPs are immutable, except
        that a Service may gain or lose its secondary family (Kubernetes' upgrade rule)."""
        spec = service["spec"]
        what = manifests.describe(service)
        existing = tx.get("Service", service["metadata"]["namespace"], service["metadata"]["name"])
        old = existing["spec"] if existing else {}
        if "None" in (spec.get("clusterIP"), old.get("clusterIP") if not spec.get("clusterIP") else None):
            spec["clusterIP"] = "None"      # headless: no ClusterIP, no family to allocate
            return
        given = [a for a in spec.get("clusterIPs") or [spec.get("clusterIP")] if a]
        kept = [a for a in old.get("clusterIPs") or [old.get("clusterIP")] if a]
        if given and kept and given[0] != kept[0]:
            raise ManifestError([f"{what}: spec.clusterIP: field is immutable ({kept[0]})"])
        addresses = {m.ip_family(a): a for a in (given or kept)}
        policy = spec.get("ipFamilyPolicy") or m.SINGLE_STACK
        families = list(spec.get("ipFamilies") or [m.ip_family(a) for a in given or kept[:1]]
                        or [m.IPV4])
        if policy != m.SINGLE_STACK and len(families) == 1:
            families += [f for f in self._service_nets if f not in families]
        if policy == m.REQUIRE_DUAL_STACK and len(families) < 2:
            raise ManifestError([f"{what}: spec.ipFamilyPolicy: RequireDualStack, but the cluster "
                                 f"has only {', '.join(self._service_nets)}"])
        used = {a for s in tx.list("Service") if object_key(s) != object_key(service)
                for a in s["spec"].get("clusterIPs") or [s["spec"].get("clusterIP")] if a}
        chosen = []
        for i, family in enumerate(families[:len(self._service_nets)]):
            net = self._service_nets.get(family)
            if net is None:
                raise ManifestError([f"{what}: spec.ipFamilies[{i}]: this cluster has no {family} "
                                     f"service range"])
            address = addresses.get(family) or self._free_cluster_ip(net, used, what)
            if ipaddress.ip_address(address) not in net:
                raise ManifestError([f"{what}: spec.clusterIPs: {address} is outside the {family} "
                                     f"service range {net}"])
            if address in used:
                raise ManifestError([f"{what}: spec.clusterIP: {address} is already allocated"])
            chosen.append(address)
        spec.update(clusterIP=chosen[0], clusterIPs=chosen, ipFamilies=families[:len(chosen)],
                    ipFamilyPolicy=policy)

    @staticmethod
    def _free_cluster_ip(net: ipaddress.IPv4Network | ipaddress.IPv6Network, used: set[str],
                         what: str) -> str:
        # The first ten addresses stay free, like the API server's "kubernetes" service's .1.
        for offset in range(10, net.num_addresses - 1):
            address = str(net.network_address + offset)
            if address not in used:
                return address
        raise ManifestError([f"{what}: spec.clusterIP: service range {net} exhausted"])

    def _delete_cascading(self, tx: "_Transaction", kind: str, namespace: str, name: str) -> None:
        if kind == "Namespace":
            for (k, ns, n) in tx.keys_in_namespace(name):
                tx.remove(k, ns, n)
        elif kind == "Deployment":
            for pod in tx.list("Pod", namespace):
                if any(o.get("kind") == "Deployment" and o.get("name") == name
                       for o in pod["metadata"].get("ownerReferences", [])):
                    tx.remove("Pod", namespace, pod["metadata"]["name"])
        tx.remove(kind, namespace, name)


class _Transaction:
    """One SQLite transaction; collects the watch events to publish after commit."""

    def __init__(self, store: Store):
        self._store = store
        self._db = store._db
        self.events: list[WatchEvent] = []

    def __enter__(self) -> "_Transaction":
        self._db.execute("BEGIN IMMEDIATE")
        self._rv = self._started_at = self._store.resource_version
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            self.events = []
            return
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('resourceVersion', ?)", (str(self._rv),))
        self._db.execute("COMMIT")
        self._store._committed(self._started_at, self._rv, self.events)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._store.get(kind, namespace, name)

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        return self._store.list(kind, namespace)

    def keys_in_namespace(self, namespace: str) -> list[tuple[str, str, str]]:
        return list(self._db.execute("SELECT kind, namespace, name FROM objects WHERE namespace=?", (namespace,)))

    def put(self, obj: Obj, keep_status: bool = True) -> None:
        kind, namespace, name = object_key(obj)
        existing = self.get(kind, namespace, name)
        meta = obj["metadata"]
        if existing:
            if keep_status and "status" in existing:
                obj["status"] = existing["status"]
            meta["uid"] = existing["metadata"]["uid"]
            meta["creationTimestamp"] = existing["metadata"]["creationTimestamp"]
            unchanged = {k: v for k, v in existing.items() if k != "metadata"} == \
                {k: v for k, v in obj.items() if k != "metadata"} and \
                {k: v for k, v in existing["metadata"].items() if k != "resourceVersion"} == \
                {k: v for k, v in meta.items() if k != "resourceVersion"}
            if unchanged:
                return
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._db.execute("INSERT OR REPLACE INTO objects (kind, namespace, name, body) VALUES (?, ?, ?, ?)",
                         (kind, namespace, name, json.dumps(obj, sort_keys=True)))
        self.events.append(WatchEvent("MODIFIED" if existing else "ADDED", obj))

    def remove(self, kind: str, namespace: str, name: str) -> None:
        existing = self.get(kind, namespace, name)
        if existing is None:
            return
        self._db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?", (kind, namespace, name))
        self._rv += 1
        existing["metadata"]["resourceVersion"] = str(self._rv)
        self.events.append(WatchEvent("DELETED", existing))


async def poll_forever(store: Store, interval: float = 0.2) -> None:
    """Follows the other processes that write ``store`` (``Store.follow_others``)."""
    import asyncio
    store.follow_others()
    while True:
        store.poll()
        await asyncio.sleep(interval)

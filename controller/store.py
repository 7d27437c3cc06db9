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


class Store:
    """Kubernetes-shaped objects, persisted; every write is one transaction."""

    def __init__(self, path: Path | str, service_cidr: str = "10.96.0.0/16"):
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._service_net = ipaddress.ip_network(service_cidr)
        self._watchers: list[Watcher] = []

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
            for doc in docs:
                if not isinstance(doc, dict):
                    raise ManifestError([f"expected an object to delete, got {type(doc).__name__}"])
                kind, namespace, name = object_key(manifests.normalize(copy.deepcopy(doc)))
                if tx.get(kind, namespace, name) is None:
                    raise ManifestError([f"{kind} {namespace + '/' if namespace else ''}{name}: not found"])
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
        spec = service["spec"]
        existing = tx.get("Service", service["metadata"]["namespace"], service["metadata"]["name"])
        if spec.get("clusterIP") in (None, ""):
            if existing and existing["spec"].get("clusterIP"):
                spec["clusterIP"] = existing["spec"]["clusterIP"]
                return
            used = {s["spec"].get("clusterIP") for s in tx.list("Service")}
            # .0 is the network, .1 is kept free like the API server's "kubernetes" service.
            for host in self._service_net.hosts():
                if int(host) - int(self._service_net.network_address) < 10:
                    continue
                if str(host) not in used:
                    spec["clusterIP"] = str(host)
                    return
            raise ManifestError([f"{manifests.describe(service)}: spec.clusterIP: service range exhausted"])
        elif existing and existing["spec"].get("clusterIP") not in (None, spec["clusterIP"]):
            raise ManifestError([f"{manifests.describe(service)}: spec.clusterIP: field is immutable"])
        elif not existing and any(s["spec"].get("clusterIP") == spec["clusterIP"] for s in tx.list("Service")):
            raise ManifestError([f"{manifests.describe(service)}: spec.clusterIP: "
                                 f"{spec['clusterIP']} is already allocated"])

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
        self._rv = self._store.resource_version
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            self.events = []
            return
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('resourceVersion', ?)", (str(self._rv),))
        self._db.execute("COMMIT")
        for watcher in list(self._store._watchers):
            try:
                watcher(self.events)
            except Exception:  # a broken watcher must not undo a committed write
                log.exception("store watcher failed")

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

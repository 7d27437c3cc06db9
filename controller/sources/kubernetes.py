"""Kubernetes as a model source: list+watch with kubernetes_asyncio, like an informer.

Per kind: a paginated list (``limit``/``continue``) gives the objects and a
resourceVersion; a watch from there (``allowWatchBookmarks``, server-side timeout) streams
ADDED/MODIFIED/DELETED and BOOKMARK events; when the stream ends the watch resumes from the
last resourceVersion seen (bookmarks included). A ``410 Gone`` (an ERROR event or an HTTP
status: the version was compacted away) triggers a relist, which replaces that kind in the
model so deletions missed meanwhile are not lost. Other failures back off and retry.

Objects stay plain dicts (no generated model classes): the watch is given functions without
a return type, and lists are read with ``_preload_content=False``.

Everything funnels through one queue, applied in order and in batches, so a relist never
races with older watch events of the same kind.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from shoal.controller.controlplane import ControlPlane
from shoal.controller.model import WATCHED_KINDS

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
PAGE_SIZE = 500
WATCH_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class KindClient:
    """How to list/watch one kind: a coroutine function taking list/watch keyword arguments."""

    kind: str
    list_fn: Callable[..., Awaitable[Any]]


def _plain(method, *args) -> Callable[..., Awaitable[Any]]:
    # No docstring on purpose: kubernetes_asyncio's Watch then keeps objects as dicts.
    async def call(**kwargs):
        return await method(*args, **kwargs)
    return call


def kind_clients(api_client: client.ApiClient) -> list[KindClient]:
    core = client.CoreV1Api(api_client)
    discovery = client.DiscoveryV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)

    def crd(group: str, version: str, plural: str):
        return _plain(custom.list_cluster_custom_object, group, version, plural)

    clients = [
        KindClient("Namespace", _plain(core.list_namespace)),
        KindClient("Pod", _plain(core.list_pod_for_all_namespaces)),
        KindClient("Service", _plain(core.list_service_for_all_namespaces)),
        KindClient("ServiceAccount", _plain(core.list_service_account_for_all_namespaces)),
        KindClient("EndpointSlice", _plain(discovery.list_endpoint_slice_for_all_namespaces)),
        KindClient("AuthorizationPolicy", crd("security.shoal.io", "v1", "authorizationpolicies")),
        KindClient("PeerAuthentication", crd("security.shoal.io", "v1", "peerauthentications")),
        KindClient("Gateway", crd("gateway.networking.k8s.io", "v1", "gateways")),
        KindClient("HTTPRoute", crd("gateway.networking.k8s.io", "v1", "httproutes")),
        KindClient("GRPCRoute", crd("gateway.networking.k8s.io", "v1", "grpcroutes")),
        KindClient("TrafficPolicy", crd("networking.shoal.io", "v1", "trafficpolicies")),
    ]
    assert {c.kind for c in clients} == set(WATCHED_KINDS)
    return clients


class KubernetesSource:
    def __init__(self, api_client: client.ApiClient, control_plane: ControlPlane,
                 clients: list[KindClient] | None = None, min_backoff: float = 0.5,
                 max_backoff: float = 30.0, watch_timeout: int = WATCH_TIMEOUT_SECONDS) -> None:
        self.control_plane = control_plane
        self.clients = clients if clients is not None else kind_clients(api_client)
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.watch_timeout = watch_timeout
        self.resource_versions: dict[str, str] = {}
        self.relists: dict[str, int] = {c.kind: 0 for c in self.clients}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._unsynced = {c.kind for c in self.clients}
        control_plane.expect_source(SOURCE)

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(self._reflect(c)) for c in self.clients]
        tasks.append(asyncio.ensure_future(self._apply_loop()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- applying, in order ------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            events: list = []
            for item in items:
                if item[0] == "RELIST":
                    if events:
                        await self.control_plane.apply_async(events)
                        events = []
                    _, kind, objs = item
                    await self.control_plane.replace_async(kind, objs)
                    self._unsynced.discard(kind)
                    if not self._unsynced:
                        self.control_plane.source_synced(SOURCE)
                else:
                    events.append(item)
            if events:
                await self.control_plane.apply_async(events)

    # -- list + watch, per kind ------------------------------------------------------------------

    async def _reflect(self, kind_client: KindClient) -> None:
        kind = kind_client.kind
        backoff = self.min_backoff
        while True:
            try:
                version = await self._list(kind_client)
                backoff = self.min_backoff
                while True:
                    version = await self._watch(kind_client, version)
            except ApiException as err:
                self.control_plane.metrics.source_errors.labels(SOURCE, kind).inc()
                if err.status == 410:
                    self.relists[kind] += 1
                    log.info("%s: resourceVersion expired (410 Gone), relisting", kind)
                    continue
                if err.status == 404:
                    log.warning("%s: not served by the API server (CRD missing?); retrying", kind)
                else:
                    log.warning("%s: list/watch failed: %s %s", kind, err.status, err.reason)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
                self.control_plane.metrics.source_errors.labels(SOURCE, kind).inc()
                log.warning("%s: list/watch failed: %s", kind, err)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.max_backoff)

    async def _list(self, kind_client: KindClient) -> str:
        """A paginated list; queues a RELIST and returns the list's resourceVersion."""
        kind = kind_client.kind
        items: list[dict] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE_SIZE, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            response = await kind_client.list_fn(**kwargs)
            try:
                data = await response.read()
            finally:
                response.release()
            if response.status >= 400:
                raise ApiException(status=response.status, reason=data[:200].decode(errors="replace"))
            body = json.loads(data)
            for item in body.get("items") or []:
                item.setdefault("kind", kind)   # list items omit their kind
                items.append(item)
            metadata = body.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                version = metadata.get("resourceVersion", "")
                break
        self.control_plane.metrics.source_events.labels(SOURCE, kind).inc(len(items))
        self._queue.put_nowait(("RELIST", kind, items))
        self.resource_versions[kind] = version
        log.debug("%s: listed %d at resourceVersion %s", kind, len(items), version)
        return version

    async def _watch(self, kind_client: KindClient, version: str) -> str:
        """Watches from ``version`` until the server ends the stream; returns the last version."""
        kind = kind_client.kind
        watcher = watch.Watch()
        try:
            async for event in watcher.stream(kind_client.list_fn, resource_version=version,
                                              allow_watch_bookmarks=True,
                                              timeout_seconds=self.watch_timeout):
                kind_type = event.get("type")
                obj = event.get("raw_object")
                if not isinstance(obj, dict):
                    raise ValueError(f"malformed watch event for {kind}: {event!r:.200}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                self.resource_versions[kind] = version
                if kind_type == "BOOKMARK":
                    continue
                if kind_type not in ("ADDED", "MODIFIED", "DELETED"):
                    raise ValueError(f"unknown watch event type {kind_type!r} for {kind}")
                obj.setdefault("kind", kind)
                self.control_plane.metrics.source_events.labels(SOURCE, kind).inc()
                self._queue.put_nowait((kind_type, obj))
        finally:
            await watcher.close()
        return version

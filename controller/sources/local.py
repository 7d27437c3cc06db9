"""The embedded store as a model source.

The store calls its watchers synchronously inside a write, possibly from another thread;
events are handed to the event loop and applied in batches (everything queued since the
last batch goes into one model update, hence one push per node).
"""
from __future__ import annotations

import asyncio
import logging

from shoal.controller.controlplane import ControlPlane
from shoal.controller.model import WATCHED_KINDS

log = logging.getLogger(__name__)

SOURCE = "local"


class LocalSource:
    def __init__(self, store, control_plane: ControlPlane) -> None:
        self.store = store
        self.control_plane = control_plane
        self._queue: asyncio.Queue[list] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        control_plane.expect_source(SOURCE)

    def _on_events(self, events) -> None:
        batch = [(event.type, event.object) for event in events]
        if not batch:
            return
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, batch)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        # Watch first, then list: an event racing the list is applied again, harmlessly.
        self.store.watch(self._on_events)
        listed = self.store.resource_version
        for kind in WATCHED_KINDS:
            objs = self.store.list(kind)
            self.control_plane.metrics.source_events.labels(SOURCE, kind).inc(len(objs))
            self.control_plane.replace(kind, objs)
        self.control_plane.applied_revision = max(self.control_plane.applied_revision, listed)
        self.control_plane.source_synced(SOURCE)
        log.info("local store synced: %s", self.control_plane.model.counts())
        while True:
            batch = await self._queue.get()
            while not self._queue.empty():
                batch.extend(self._queue.get_nowait())
            for _, obj in batch:
                self.control_plane.metrics.source_events.labels(SOURCE, obj.get("kind", "")).inc()
            self.control_plane.apply(batch)
            # What ``shoal waypoint delete`` waits for: a write the model took without any
            # config change moves no version, so the version alone cannot say it was taken.
            self.control_plane.applied_revision = max(
                [self.control_plane.applied_revision,
                 *(int(obj["metadata"].get("resourceVersion") or 0) for _, obj in batch)])

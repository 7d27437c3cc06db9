"""Bounded writes on a streaming gRPC response, shared by the agent's Observer API and the relay.

A client that stops reading must cost only its own buffers: a write stuck longer than the
timeout cuts that client's stream (``ClientTooSlow``), never the server.
"""
from __future__ import annotations

import asyncio
import time


class ClientTooSlow(Exception):
    """The client fell behind (stopped reading, or lost its place in the ring): its stream is cut."""


class GuardedWriter:
    """Writes responses; a write stuck longer than ``timeout`` (client not reading) cuts
    the stream, so one slow client only ever costs its own bounded buffers."""

    def __init__(self, context, timeout: float) -> None:
        self._context = context
        self._timeout = timeout
        task = asyncio.current_task()
        if task is None:   # the stream's own task is what a stuck write cancels
            raise RuntimeError("GuardedWriter must be created inside the task that writes the stream")
        self._task: asyncio.Task = task
        self._since: float | None = None
        self._timed_out = False
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def write(self, response) -> None:
        self._since = time.monotonic()
        try:
            await self._context.write(response)
        except asyncio.CancelledError:
            if self._timed_out:
                raise ClientTooSlow(f"client did not read for {self._timeout:.1f}s; stream cut") from None
            raise
        finally:
            self._since = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._timeout / 4)
            since = self._since
            if since is not None and time.monotonic() - since > self._timeout:
                self._timed_out = True
                self._task.cancel()
                return

    def close(self) -> None:
        self._watchdog.cancel()

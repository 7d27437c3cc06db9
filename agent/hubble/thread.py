"""The flow server's own thread and event loop, apart from the loop that applies policy.

A flows query is untrusted work of unbounded size (a full ring, many clients, costly
filters). On the agent's loop, one slow query delayed a DENY reaching the kernel by 20 s;
on its own loop, queries only ever share the GIL (switched every few ms) with the policy
path, never its event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def run(self, coroutine: Coroutine) -> Any:
        """Runs ``coroutine`` on this thread's loop; awaitable from any other loop."""
        return await asyncio.wrap_future(self.submit(coroutine))

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            self._thread = None

"""The UI's aiohttp app on a free loopback port in a background thread: what the browser
tests and the UI benchmark drive (``shoal ui`` itself runs it in the foreground)."""
from __future__ import annotations

import asyncio
import threading

import grpc
from aiohttp import web

from shoal.cli.ui.feed import FlowFeed
from shoal.cli.ui.server import build_app


class UiServer:
    def __init__(self, relay_address: str) -> None:
        self.feed = FlowFeed(lambda: grpc.aio.insecure_channel(relay_address))
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(build_app(self.feed, {"127.0.0.1", "localhost"}))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def call(self, func, *args):
        """Runs ``func(*args)`` on the server's loop (the feed is not thread-safe) and waits."""
        async def run():
            return func(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __enter__(self) -> "UiServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("UI server did not start")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

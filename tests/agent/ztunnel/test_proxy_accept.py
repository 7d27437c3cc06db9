"""A bug on one connection's path (issue 18: bad input never crashes a shared proxy,
every failure counted and explained): the in-pod listener resets that connection, counts
it, logs it once with its traceback, and serves on. Real sockets on loopback."""
from __future__ import annotations

import asyncio
import functools
import logging
import socket
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from shoal.agent.ztunnel.admission import Admission
from shoal.agent.ztunnel.proxy import Acceptor, PodRegistry
from shoal.agent.ztunnel.telemetry import ProxyMetrics
from shoal.hbone.gatekeeper import ACCEPTS_PER_WAKEUP
from shoal.ratelog import LogLimiter

pytestmark = pytest.mark.timeout(30)

BROKEN = 5


async def test_a_bug_in_a_handler_resets_its_connection_is_counted_logged_once_and_the_listener_serves_on(caplog):
    loop = asyncio.get_running_loop()
    ctx = SimpleNamespace(metrics=ProxyMetrics(CollectorRegistry()), hbone_log_limiter=LogLimiter(clock=lambda: 0.0))
    registry = PodRegistry(ctx)   # type: ignore[arg-type]  # only its failure report is used
    served: list[str] = []

    async def handler(conn: socket.socket) -> None:
        if len(served) < BROKEN:
            served.append("bug")
            raise RuntimeError("a bug of ours on this connection's path")
        served.append("ok")
        await loop.sock_sendall(conn, b"served")
        conn.close()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    acceptor = Acceptor(listener, handler, "outbound", on_error=functools.partial(registry._handler_failed, "outbound"),
                        admission=Admission(8192, 100_000, live=lambda: 0), on_shed=lambda kind, reason: None)
    try:
        with caplog.at_level(logging.INFO, logger="shoal.agent.ztunnel.proxy"):
            for _ in range(BROKEN):
                client = socket.socket()
                client.setblocking(False)
                await loop.sock_connect(client, listener.getsockname())
                with pytest.raises(ConnectionResetError):   # told at once, not left hanging
                    await asyncio.wait_for(loop.sock_recv(client, 16), 5)
                client.close()
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, listener.getsockname())
            assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"served"
            client.close()
    finally:
        acceptor.close()
    assert served == ["bug"] * BROKEN + ["ok"]
    assert ctx.metrics.registry.get_sample_value(
        "shoal_proxy_rejected_total", {"listener": "outbound", "reason": "internal_error"}) == BROKEN
    [line] = [r for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert line.levelno == logging.ERROR and line.exc_info is not None
    assert "a bug of ours" in caplog.text and "Traceback" in caplog.text


async def test_a_full_accept_queue_is_taken_a_batch_per_wake_up_so_other_callbacks_run_between():
    """A reconnect-loop flood keeps the queue full: draining it in one callback held every
    established connection's reads back meanwhile."""
    loop = asyncio.get_running_loop()
    queued = 3 * ACCEPTS_PER_WAKEUP
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(queued + 16)
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(queued)]   # all in the queue
    seen: list[str] = []
    shed: list[str] = []

    def screen(address: tuple) -> str:
        if not seen:
            loop.call_soon(seen.append, "another callback")
        seen.append("accepted")
        return "refused"

    acceptor = Acceptor(listener, lambda conn: asyncio.sleep(0), "hbone", on_error=lambda exc: None,
                        admission=Admission(8192, 100_000, live=lambda: 0),
                        on_shed=lambda kind, reason: shed.append(reason), screen=screen)
    try:
        for _ in range(100):
            if len(shed) == queued:
                break
            await asyncio.sleep(0.02)
    finally:
        acceptor.close()
        for client in clients:
            client.close()
    assert shed == ["refused"] * queued   # every one taken in the end
    assert seen.index("another callback") <= ACCEPTS_PER_WAKEUP

"""Listeners that feed downstream connections to the HTTP servers.

``start_plaintext`` is for tests and benchmarks (the proxy without mTLS, on an address
the caller picks, loopback by default; the config refuses another address unless
``--plaintext-beyond-loopback``). In the mesh the waypoint accepts only HBONE: see
``shoal.waypoint.hbone``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .config import is_loopback
from .downstream import serve_connection
from .fastpath import fast_lanes
from .http import Limits, PeerInfo, TcpStream
from .proxy import WaypointProxy

log = logging.getLogger(__name__)


def connection_callbacks(proxy: WaypointProxy, limits: Limits) -> tuple[Callable[[str, int], None], Callable[[str], None]]:
    metrics = proxy.telemetry.metrics

    def reject(reason: str, status: int) -> None:
        metrics.rejected.labels(reason=reason, status=str(status)).inc()

    def on_protocol(protocol: str) -> None:
        metrics.downstream_connections.labels(protocol=protocol).inc()

    return reject, on_protocol


class PlainListener:
    """An asyncio server and its connection tasks: ``drain`` stops accepting, ``active``
    says how many connections are still being served (same interface as the HBONE one)."""

    def __init__(self, server: asyncio.AbstractServer, connections: set[asyncio.Task]) -> None:
        self.server = server
        self.sockets = server.sockets
        self.connections = connections

    @property
    def active(self) -> int:
        return len(self.connections)

    def drain(self) -> None:
        self.server.close()

    def close(self) -> None:
        self.server.close()


async def start_plaintext(proxy: WaypointProxy, limits: Limits, host: str = "127.0.0.1", port: int = 0,
                          destination: tuple[str, int] | None = None) -> PlainListener:
    """Plain HTTP on ``host:port``; ``destination`` (ip, port) plays the role of the HBONE target."""
    if not is_loopback(host):
        log.warning(
            "plain HTTP on %s:%s, reachable beyond this host: no mTLS, no identities (benchmarks only)", host, port)
    reject, on_protocol = connection_callbacks(proxy, limits)
    lanes = fast_lanes(proxy)
    loop = asyncio.get_running_loop()
    connections: set[asyncio.Task] = set()  # strong references to the per-connection tasks

    def serve(stream: TcpStream) -> None:
        assert stream.transport is not None   # called from connection_made
        ip, src_port = stream.transport.get_extra_info("peername")[:2]
        dst_ip, dst_port = destination or ("", 0)
        peer = PeerInfo(ip, src_port, destination_ip=dst_ip, destination_port=dst_port)
        task = loop.create_task(serve_connection(stream, peer, proxy.handle, limits, reject, on_protocol, lanes))
        connections.add(task)
        task.add_done_callback(connections.discard)

    def accepted() -> TcpStream:
        return TcpStream(on_connected=serve)

    return PlainListener(await loop.create_server(accepted, host, port, backlog=1024), connections)

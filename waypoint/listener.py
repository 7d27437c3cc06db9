"""Listeners that feed downstream connections to the HTTP servers.

``start_plaintext`` is for tests and benchmarks (the proxy without mTLS, on an address
the caller picks, loopback by default). In the mesh the waypoint accepts only HBONE:
see ``shoal.waypoint.hbone``.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Callable

from .downstream import serve_connection
from .http import Limits, PeerInfo, StreamPair
from .proxy import WaypointProxy

READ_LIMIT = 1 << 20


def connection_callbacks(proxy: WaypointProxy, limits: Limits) -> tuple[Callable[[str, int], None], Callable[[str], None]]:
    metrics = proxy.telemetry.metrics

    def reject(reason: str, status: int) -> None:
        metrics.rejected.labels(reason=reason, status=str(status)).inc()

    def on_protocol(protocol: str) -> None:
        metrics.downstream_connections.labels(protocol=protocol).inc()

    return reject, on_protocol


async def start_plaintext(proxy: WaypointProxy, limits: Limits, host: str = "127.0.0.1", port: int = 0,
                          destination: tuple[str, int] | None = None) -> asyncio.Server:
    """Plain HTTP on ``host:port``; ``destination`` (ip, port) plays the role of the HBONE target."""
    reject, on_protocol = connection_callbacks(proxy, limits)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ip, src_port = writer.get_extra_info("peername")[:2]
        dst_ip, dst_port = destination or ("", 0)
        peer = PeerInfo(ip, src_port, destination_ip=dst_ip, destination_port=dst_port)
        await serve_connection(StreamPair(reader, writer), peer, proxy.handle, limits, reject, on_protocol)

    return await asyncio.start_server(on_connection, host, port, limit=READ_LIMIT, backlog=1024)

"""Bytes between two plain sockets, and the way a refused connection ends: shared by the
inbound (15006, 15008) and outbound (15001) listeners and the pod registry."""
from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from typing import Protocol

from shoal.agent.ztunnel.telemetry import ConnectionRecord
from shoal.hbone.gatekeeper import reset_socket
from shoal.hbone.session import PipeEnd


class ConnectionReports(Protocol):
    """Where a relay reports its connection: ConnectionTelemetry, or a wrapper of it."""

    def opened(self, rec: ConnectionRecord) -> None: ...

    def closed(self, rec: ConnectionRecord) -> None: ...


# What the network and the peers do to a connection, or the node running short of
# descriptors or buffers: counted and logged, no traceback. Anything else on a
# connection's path is a bug of ours (an EEXIST from the event loop, an EBADF, a
# RuntimeError), logged with its traceback.
NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
                            errno.EADDRNOTAVAIL, errno.ENOTCONN})
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_network_failure(exc: BaseException) -> bool:
    """Whether ``exc`` on a connection's path is the network's or the peer's doing (or the
    node short of resources), not a bug of the proxy."""
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, ssl.SSLError)):
        return True
    return isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS | RESOURCE_ERRNOS


# Close with RST (SO_LINGER 0): the app sees a refused/reset connection at once.
reset_connection = reset_socket


async def join_plain(client: socket.socket, upstream: socket.socket, rec: ConnectionRecord,
                     telemetry: ConnectionReports) -> tuple[PipeEnd, PipeEnd]:
    """Relay two connected sockets back to back; the two ends (client's, upstream's)."""
    loop = asyncio.get_running_loop()
    client_end = PipeEnd(rec, True, telemetry.closed)
    server_end = PipeEnd(rec, False, telemetry.closed)
    PipeEnd.join(client_end, server_end)
    await loop.connect_accepted_socket(lambda: server_end, upstream)
    await loop.connect_accepted_socket(lambda: client_end, client)
    telemetry.opened(rec)
    return client_end, server_end

"""Handing a connected socket to the event loop without a double close.

``loop.create_connection(sock=sock, ssl=...)`` in uvloop (0.23 at least) can leave the
Python ``sock`` believing it owns a file descriptor libuv has already closed: when the
peer resets the connection before our ClientHello is written, the write fails inside
``connection_made``, the transport's close is queued ahead of the coroutine's wake-up,
libuv closes the fd, and only then does ``create_connection`` attach ``sock`` to the dead
transport, which never detaches it. Freed later, ``sock`` closes whatever socket has
that number by then: another connection's, behind libuv's back. Seen in a 10,000
connection burst (a peer proxy resetting the HBONE connections it had queued too long):
``FileExistsError: [Errno 17] File exists`` (libuv's ``uv_tcp_open``/``uv_poll_init``
on a number it still watches), ``File descriptor N is used by transport``, EBADF on a
fresh socket, live connections cut, and libuv's epoll update of the stale watcher failing,
which is an ``abort()``: a proxy dead without a log line.

:func:`create_connection_on` wraps the call: whatever happens, ``sock`` ends up either
owning its original socket or owning nothing.
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Callable


def _identity(fd: int) -> tuple[int, int]:
    """What the open file at ``fd`` is (a new socket at the same number is another one)."""
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _owns(sock: socket.socket, identity: tuple[int, int]) -> bool:
    fd = sock.fileno()
    if fd == -1:
        return False
    try:
        return _identity(fd) == identity
    except OSError:   # EBADF: closed by the loop, not reused yet
        return False


async def create_connection_on(loop: asyncio.AbstractEventLoop, protocol_factory: Callable[[], Any],
                               sock: socket.socket, **kwargs: Any) -> tuple[asyncio.Transport, Any]:
    """``loop.create_connection(protocol_factory, sock=sock, **kwargs)``, after which
    ``sock`` never closes a file descriptor that is no longer its socket."""
    identity = _identity(sock.fileno())
    try:
        connected = await loop.create_connection(protocol_factory, sock=sock, **kwargs)
    except BaseException:
        if _owns(sock, identity):
            sock.close()   # never taken by the loop (or held by a transport: it closes then)
        elif sock.fileno() != -1:
            sock.detach()  # the loop closed it: the number may be someone else's now
        raise
    if not _owns(sock, identity) and sock.fileno() != -1:
        sock.detach()      # a transport closed before it was attached (no TLS to fail on)
    return connected

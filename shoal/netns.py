"""Network-namespace primitives shared by the agent and the node proxy.

``setns(2)`` moves only the calling thread, so each caller decides which thread enters
(the agent: a short-lived helper thread; the node proxy: its own thread, never awaiting
inside). ``os.setns`` only exists from Python 3.12, hence libc.
"""
from __future__ import annotations

import ctypes
import os
import socket

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Moves the calling thread into the network namespace open at ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_netns_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for the socket's namespace, as bpf_get_netns_cookie() returns it."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")

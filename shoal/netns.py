"""Network-namespace primitives shared by the agent, the node proxy and the local kubelet.

``setns(2)`` moves only the calling thread, so each caller decides which thread enters
(the agent and the kubelet: a short-lived helper thread, ``in_netns``; the node proxy: its own
thread, never awaiting inside). ``os.setns`` only exists from Python 3.12, hence libc. The
kubelet waits for the agent to confirm capture of the namespace it made, identified by its
cookie: unlike a path or an nsfs inode number, a netns cookie is never reused.
"""
from __future__ import annotations

import ctypes
import os
import socket
import threading
from pathlib import Path
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Moves the calling thread into the network namespace open at ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_netns_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for the socket's namespace, as bpf_get_netns_cookie() returns it."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


class NetnsError(RuntimeError):
    """A pod's network namespace is missing or could not be configured."""


def in_netns(netns_path: Path | str, fn: Callable[[], T]) -> T:
    """Run fn() on a thread inside the namespace at netns_path; return its result."""
    value: list[T] = []
    error: list[BaseException] = []

    def runner() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
            finally:
                os.close(fd)
            value.append(fn())
        except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread, not swallowed
            error.append(err)

    thread = threading.Thread(target=runner, name="shoal-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return value[0]


def netns_cookie(netns_path: Path | str) -> int:
    """The kernel's cookie for a namespace, as bpf_get_netns_cookie() returns it."""
    def probe() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return socket_netns_cookie(sock)
    try:
        return in_netns(netns_path, probe)
    except FileNotFoundError as err:
        raise NetnsError(f"network namespace {netns_path} does not exist") from err

"""Sockets inside a pod's network namespace, created from the proxy's own thread.

The calling thread enters the pod's namespace (``setns(2)``), creates the socket, and
returns to the node's namespace at once; the socket stays bound to the pod's namespace.
Only the calling thread moves, and it never awaits while inside, so the event loop is
never observed in the wrong namespace. Every socket carries the proxy mark so the
agent's capture programs skip it.
"""
from __future__ import annotations

import errno
import os
import socket
from contextlib import contextmanager
from typing import Iterator

from shoal.config import PROXY_MARK
from shoal.netns import setns

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

class NetnsHandle:
    """An open network namespace (owns the fd) plus a way back to the proxy's own."""

    def __init__(self, fd: int, home_fd: int):
        self.fd = fd
        self._home_fd = home_fd
        self.inode = os.fstat(fd).st_ino

    @classmethod
    def current(cls) -> "NetnsHandle":
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return cls(fd, fd)

    @classmethod
    def from_path(cls, path: str, home: "NetnsHandle") -> "NetnsHandle":
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), home.fd)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run a short, synchronous block inside this namespace (no awaits inside)."""
        if self.fd == self._home_fd:
            yield
            return
        setns(self.fd)
        try:
            yield
        finally:
            setns(self._home_fd)

    def socket(self, family: int = socket.AF_INET, transparent: bool = False,
               mark: int = PROXY_MARK) -> socket.socket:
        """A non-blocking TCP socket living in this namespace, with ``mark`` (0: none).
        The proxy mark only names the proxy's sockets in packet captures and rules: the
        agent's capture recognises the proxy by its cgroup, not by a mark."""
        with self.entered():
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transparent:
                set_transparent(sock, family)
        except OSError:
            sock.close()
            raise
        return sock

    def listener(self, host: str, port: int, transparent: bool = False, backlog: int = 1024) -> socket.socket:
        """A listening socket with SO_REUSEPORT, so a successor proxy can bind beside us.

        Unmarked: accepted connections take their client's mark (tcp_fwmark_accept), so
        replies to clients never match the delivery route (transparent.py)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.socket(family, transparent=transparent, mark=0)
        try:
            if family == socket.AF_INET6:
                # One family per socket: the IPv4 twin listens on its own (see proxy.py).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock

    def write_sysctl(self, name: str, value: str) -> None:
        """Set a per-namespace sysctl (``net/ipv4/...``) of this namespace. One already set
        is not written: a container's /proc/sys is read-only (transparent.DELIVERY_SYSCTLS)."""
        with self.entered():
            # /proc/sys/net resolves against the opening thread's namespace.
            with open(f"/proc/sys/{name}") as current:
                if current.read().strip() == value:
                    return
            with open(f"/proc/sys/{name}", "w") as f:
                f.write(value)

    def close(self) -> None:
        if self.fd != self._home_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def set_transparent(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def is_permission_error(exc: OSError) -> bool:
    return exc.errno in (errno.EPERM, errno.EACCES)

"""The same-node kernel bypass, from the node proxy's side: join two of its own connected
TCP sockets in the kernel (bpf/sk_skb_bypass.c), read their byte counts, know when the
bytes redirected into one of them have all been queued on it.

    bypass = KernelBypass(pin_dir)            # BypassUnavailable: no agent maps/program
    pair = bypass.join(client_side, server_side)
    ...
    pair.drained(client_side_is_source=True)  # before forwarding a FIN
    counts = bypass.release(pair)             # (client->server bytes, server->client bytes)

**Joining without losing or reordering a byte.** Both sockets may already hold received
bytes (the client app wrote its request before the proxy decided; a server app may greet
first). Those bytes must go through the verdict program too, in order, ahead of later ones
(a userspace copy racing the kernel's redirect could reorder them). So:

1. ``SO_RCVLOWAT`` is raised on both sockets: arrivals no longer wake the socket
   (``tcp_data_ready`` only calls ``sk_data_ready`` past the low-water mark), so the
   verdict does not run for bytes that arrive while the pair is half made;
2. the pair entries (each cookie -> its peer's) are written, then both sockets enter the
   SOCKHASH (the verdict program is attached to the map);
3. ``SO_RCVLOWAT`` back to 1: ``tcp_set_rcvlowat`` calls ``tcp_data_ready``, which now runs
   the verdict over everything queued, oldest first.

Under memory pressure the kernel wakes a socket regardless of the mark; if that happened
between the two inserts the verdict could not redirect (its peer was not in the map yet)
and passed the skb to the socket itself: ``unredirected`` says so, and the pair is
refused (the caller resets both connections: nothing was sent anywhere else).

**Half-close.** The kernel does not forward a FIN through the redirect: the proxy sees EOF
on one socket (a read returns 0) and shuts the other's write side. The redirect completes
on a workqueue, so before that shutdown the proxy waits until the peer socket has queued
every byte the verdict redirected to it (``drained``: TCP_INFO's bytes acked plus
SIOCOUTQ), or the FIN would overtake them and the rest would fail with EPIPE.

**Backpressure: bytes handed back.** The verdict keeps what it redirected toward a peer
and the peer's socket has not taken yet below ``BYPASS_HIGH_WATER``; past it the bytes,
and every later one of that direction, are passed to the receiving socket instead, where
they are charged to its receive buffer (TCP closes the sender's window). The proxy reads
them there and, once the bytes redirected before them are all on the peer's socket
(``drained``), writes them to the peer itself and reports them (``relayed``); when it has
reported all of them, the verdict redirects again. A byte read on a joined socket that
was not handed back (``unredirected``) still ends the pair.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import termios
from dataclasses import dataclass
from pathlib import Path

from shoal.datapath import bpfsys
from shoal.datapath.structs import U64, BypassPair

SO_COOKIE = 57
TCP_INFO_BYTES_ACKED = 120      # offset of tcpi_bytes_acked (u64) in struct tcp_info
TCP_INFO_SIZE = 232
GATE_LOWAT = 1 << 30            # capped by the kernel at half the receive buffer: never reached


class BypassUnavailable(RuntimeError):
    """The bypass cannot take this pair (no maps, map full, socket state): relay it instead."""


class BypassBroken(RuntimeError):
    """Bytes could not be redirected while the pair was made: reset both connections."""


def socket_cookie(sock: socket.socket) -> int:
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def queued_bytes(sock: socket.socket) -> int:
    """Bytes ever queued for sending on ``sock``: acknowledged ones plus those still in its
    write queue (the FIN and SYN excluded)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    acked = struct.unpack_from("Q", info, TCP_INFO_BYTES_ACKED)[0]
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return acked + outq


@dataclass
class JoinedPair:
    """Two sockets joined in the kernel: ``client`` (accepted from the client app) and
    ``server`` (connected to the server app)."""
    client: socket.socket
    server: socket.socket
    client_cookie: int
    server_cookie: int
    # what each socket had queued for sending before the join (the proxy wrote nothing,
    # but a fallback path might have): the baseline of ``drained``
    client_queued_before: int = 0
    server_queued_before: int = 0
    # handed-back bytes the proxy wrote to each side itself (they are on its socket too)
    relayed_to_server: int = 0
    relayed_to_client: int = 0


@dataclass(frozen=True)
class PairCounts:
    client_to_server: int       # every byte of the direction: redirected or handed back
    server_to_client: int
    unredirected: int
    handed_back_to_server: int = 0   # of which handed back to the proxy (the peer was past the mark)
    handed_back_to_client: int = 0
    handbacks: int = 0               # times a direction crossed the mark

    @property
    def redirected_to_server(self) -> int:
        return self.client_to_server - self.handed_back_to_server

    @property
    def redirected_to_client(self) -> int:
        return self.server_to_client - self.handed_back_to_client


class KernelBypass:
    """The pinned ``bypass_socks`` / ``bypass_pairs`` maps the agent created, with the
    verdict program it attached to the first. Needs no bcc: plain bpf(2)."""

    def __init__(self, pin_dir: Path | str):
        pin_dir = Path(pin_dir)
        try:
            self._socks = bpfsys.obj_get(pin_dir / "bypass_socks")
        except OSError as exc:
            raise BypassUnavailable(f"no bypass maps under {pin_dir}: {exc}") from exc
        try:
            self._pairs = bpfsys.obj_get(pin_dir / "bypass_pairs")
            self._relayed = bpfsys.obj_get(pin_dir / "bypass_relayed")
        except OSError as exc:
            self._pairs = self._relayed = -1
            self.close()
            raise BypassUnavailable(f"no bypass maps under {pin_dir}: {exc}") from exc

    def close(self) -> None:
        for fd in (self._socks, self._pairs, self._relayed):
            if fd >= 0:
                os.close(fd)
        self._socks = self._pairs = self._relayed = -1

    def join(self, client: socket.socket, server: socket.socket) -> JoinedPair:
        """Joins two connected TCP sockets (see the module docstring for the order).
        BypassUnavailable: nothing changed, relay them as usual. BypassBroken: reset both."""
        pair = JoinedPair(client, server, socket_cookie(client), socket_cookie(server),
                          queued_bytes(client), queued_bytes(server))
        sides = ((client, pair.client_cookie, pair.server_cookie), (server, pair.server_cookie, pair.client_cookie))
        for sock, _cookie, _peer in sides:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, GATE_LOWAT)
        try:
            for _sock, cookie, peer in sides:
                bpfsys.map_update(self._relayed, U64(cookie), U64(0))
                bpfsys.map_update(self._pairs, U64(cookie), BypassPair(peer=peer))
            for sock, cookie, _peer in sides:
                bpfsys.map_update(self._socks, U64(cookie), U64(sock.fileno()))
        except OSError as exc:
            broken = self.release(pair).unredirected
            for sock, _cookie, _peer in sides:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            reason = "map full" if getattr(exc, "errno", None) in (errno.E2BIG, errno.ENOSPC) else str(exc)
            if broken:
                raise BypassBroken(f"bytes received while the join failed ({reason})") from exc
            raise BypassUnavailable(reason) from exc
        for sock, _cookie, _peer in sides:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)   # runs the verdict on what waits
        if self.counts(pair).unredirected:
            self.release(pair)
            raise BypassBroken("bytes arrived between the two inserts and could not be redirected")
        return pair

    def counts(self, pair: JoinedPair) -> PairCounts:
        """The verdict's counters for the pair (zero for an entry already released)."""
        values = []
        for cookie in (pair.client_cookie, pair.server_cookie):
            value = BypassPair()
            bpfsys.map_lookup(self._pairs, U64(cookie), value)
            values.append(value)
        up, down = values
        return PairCounts(up.bytes + up.handed_back, down.bytes + down.handed_back,
                          up.unredirected + down.unredirected, up.handed_back, down.handed_back,
                          up.handbacks + down.handbacks)

    def drained(self, pair: JoinedPair, toward_server: bool) -> bool:
        """Whether every byte redirected toward one side, and every handed-back byte the
        proxy relayed to it, is queued on its socket (so a FIN, or more relayed bytes,
        written now go after them)."""
        counts = self.counts(pair)
        if toward_server:
            return queued_bytes(pair.server) - pair.server_queued_before >= \
                counts.redirected_to_server + pair.relayed_to_server
        return queued_bytes(pair.client) - pair.client_queued_before >= \
            counts.redirected_to_client + pair.relayed_to_client

    def handed_back(self, pair: JoinedPair, toward_server: bool) -> int | None:
        """Bytes the verdict handed back to the proxy on one direction's receiving socket;
        None when its entry is gone (evicted: the verdict passes everything unchecked) or
        it could not redirect some: bytes read there then prove nothing, the pair ends."""
        value = BypassPair()
        cookie = pair.client_cookie if toward_server else pair.server_cookie
        if not bpfsys.map_lookup(self._pairs, U64(cookie), value) or value.unredirected:
            return None
        return value.handed_back

    def relayed(self, pair: JoinedPair, toward_server: bool, size: int) -> None:
        """The proxy wrote ``size`` more handed-back bytes to one side, and they are all on
        its socket (not in a userspace buffer): once it has reported every byte handed
        back, the verdict redirects that direction again."""
        if toward_server:
            pair.relayed_to_server += size
            total, source = pair.relayed_to_server, pair.client_cookie
        else:
            pair.relayed_to_client += size
            total, source = pair.relayed_to_client, pair.server_cookie
        bpfsys.map_update(self._relayed, U64(source), U64(total))

    def release(self, pair: JoinedPair) -> PairCounts:
        """The final counts; the pair's entries removed (a closed socket leaves the SOCKHASH
        by itself, an open one is taken out here so nothing redirects into it any more)."""
        counts = self.counts(pair)
        self._forget(pair)
        return counts

    def _forget(self, pair: JoinedPair) -> None:
        for cookie in (pair.client_cookie, pair.server_cookie):
            bpfsys.map_delete(self._pairs, U64(cookie))
            bpfsys.map_delete(self._relayed, U64(cookie))
            bpfsys.map_delete(self._socks, U64(cookie))


def pair_entries(pin_dir: Path | str) -> int:
    """How many sockets the pair map names (tests, debug)."""
    fd = bpfsys.obj_get(Path(pin_dir) / "bypass_pairs")
    try:
        return len(bpfsys.map_keys(fd, ctypes.c_uint64))
    finally:
        os.close(fd)

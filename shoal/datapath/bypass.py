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

**The apps' own sockets (``app_join``, bpf/sk_msg_join.c).** Sockops put the two apps'
sockets of a same-node connection into ``app_socks`` (the client's when its original
destination is a local meshed pod, the server's when the proxy announced the connection
with ``expect_server_app`` before dialling). Once the pair is joined, ``link_apps`` links
each app socket to the proxy socket toward the other app; each direction then switches,
once, to the app's sends being written straight into that socket, at the first send that
finds nothing of the direction anywhere else: every byte the app queued on its own socket
met the verdict, every handed-back byte was relayed, and every byte the verdict redirected
is on the target (``publish_landed``: the proxy tells the program so once ``drained``).
After the switch the direction's bytes are still all queued on the proxy's socket toward
the other app (synchronously, in the app's send), so ``drained`` and the byte counts
(``landed_*``: that socket's queue since the join) stay exact; the verdict hands the proxy
any byte it still sees of a switched direction. ``unlink_apps`` (before a reset, and on
release) sends the apps' next bytes the proxy's way, where a revoked pair is reset.
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
from shoal.datapath.structs import (
    CONFIG_APP_JOIN,
    U32,
    U64,
    Addr,
    AppDirect,
    AppExpectKey,
    AppKey,
    AppLink,
    BypassPair,
)
from shoal.netns import socket_netns_cookie

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
    # the apps' sockets, when linked (app_join): the client app's and the server app's keys
    client_app: AppKey | None = None
    server_app: AppKey | None = None
    # every byte of a direction queued on its target socket since the join (read while the
    # socket is open; frozen when the proxy half-closes it, so its FIN is not counted)
    landed_to_server: int = 0
    landed_to_client: int = 0
    server_frozen: bool = False
    client_frozen: bool = False
    linked: bool = False   # the apps' links are in place (never written again once unlinked)


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

    APP_MAPS = ("app_expected", "app_links", "app_direct", "app_origin", "config")

    def __init__(self, pin_dir: Path | str, app_join: bool = False):
        pin_dir = Path(pin_dir)
        self._apps: dict[str, int] = {}
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
        if not app_join:
            self._set_app_join_config(pin_dir, 0)   # the last proxy started decides (a crashed one left 1)
        else:
            try:
                for name in self.APP_MAPS:
                    self._apps[name] = bpfsys.obj_get(pin_dir / name)
            except OSError as exc:   # an older agent: the apps' sockets are left alone
                self.app_join_error = f"no app join maps under {pin_dir}: {exc}"
                self._close_apps()
            else:
                bpfsys.map_update(self._apps["config"], U32(CONFIG_APP_JOIN), U64(1))

    app_join_error = ""

    @staticmethod
    def _set_app_join_config(pin_dir: Path, value: int) -> None:
        try:
            fd = bpfsys.obj_get(pin_dir / "config")
        except OSError:
            return   # an agent without the slot, or none yet
        try:
            bpfsys.map_update(fd, U32(CONFIG_APP_JOIN), U64(value))
        except OSError:
            pass   # an older agent's config map has no such slot: nothing inserts app sockets
        finally:
            os.close(fd)

    @property
    def app_join(self) -> bool:
        """Whether the apps' own sockets are linked to joined pairs (bpf/sk_msg_join.c)."""
        return bool(self._apps)

    def _close_apps(self) -> None:
        for fd in self._apps.values():
            os.close(fd)
        self._apps = {}

    def close(self) -> None:
        for fd in (self._socks, self._pairs, self._relayed):
            if fd >= 0:
                os.close(fd)
        self._socks = self._pairs = self._relayed = -1
        self._close_apps()

    def disable_app_join(self) -> None:
        """Sockops stops putting app sockets into app_socks (linked pairs go on)."""
        if self._apps:
            bpfsys.map_update(self._apps["config"], U32(CONFIG_APP_JOIN), U64(0))

    # -- the apps' own sockets (bpf/sk_msg_join.c) ------------------------------------

    def expect_server_app(self, server_ip: str, server_port: int, dial_from_ip: str) -> AppExpectKey | None:
        """Announce the proxy's coming connection to the server app (before connect(); the
        port it dials from is chosen then), so sockops puts the app's accepted socket into
        app_socks. ``forget_expected`` once connected."""
        if not self._apps:
            return None
        key = AppExpectKey(local=Addr.of(server_ip), remote=Addr.of(dial_from_ip), local_port=server_port)
        try:
            bpfsys.map_update(self._apps["app_expected"], key, U64(1))
        except OSError:
            return None   # full: this pair's server app is not joined (its client still can be)
        return key

    def forget_expected(self, key: AppExpectKey | None) -> None:
        if key is not None and self._apps:
            bpfsys.map_delete(self._apps["app_expected"], key)

    def link_apps(self, pair: JoinedPair) -> None:
        """Link both apps' sockets to the joined pair: from now on each direction switches
        to direct sends at its first send that finds the proxy's path empty. Sockets that
        sockops did not put into app_socks are linked too and simply never send here."""
        if not self._apps:
            return
        pair.client_app = _app_key_of_peer(pair.client)
        pair.server_app = _app_key_of_peer(pair.server)
        pair.linked = True
        for source in (pair.client_cookie, pair.server_cookie):
            bpfsys.map_update(self._apps["app_direct"], U64(source), AppDirect())
        self._write_links(pair, landed_to_server=0, landed_to_client=0)
        self.publish_landed(pair)

    def _write_links(self, pair: JoinedPair, landed_to_server: int, landed_to_client: int) -> None:
        links = self._apps["app_links"]
        bpfsys.map_update(links, pair.client_app, AppLink(pair.client_cookie, pair.server_cookie, landed_to_server))
        bpfsys.map_update(links, pair.server_app, AppLink(pair.server_cookie, pair.client_cookie, landed_to_client))

    def publish_landed(self, pair: JoinedPair) -> None:
        """Tell the apps' program how many of the bytes the verdict redirected are queued on
        each target (all of them, for a direction that is ``drained``; else what was
        published before): the last condition of a direction's switch."""
        client_app, server_app = pair.client_app, pair.server_app
        if not self._apps or not pair.linked or client_app is None or server_app is None:
            return
        previous = [AppLink(), AppLink()]
        bpfsys.map_lookup(self._apps["app_links"], client_app, previous[0])
        bpfsys.map_lookup(self._apps["app_links"], server_app, previous[1])
        landed = []
        for index, toward_server in enumerate((True, False)):
            redirected = self._redirected_if_drained(pair, toward_server)
            landed.append(previous[index].landed if redirected is None else redirected)
        if landed != [previous[0].landed, previous[1].landed]:
            self._write_links(pair, *landed)

    def _redirected_if_drained(self, pair: JoinedPair, toward_server: bool) -> int | None:
        counts = self.counts(pair)
        redirected, relayed = ((counts.redirected_to_server, pair.relayed_to_server) if toward_server
                               else (counts.redirected_to_client, pair.relayed_to_client))
        return redirected if _landed(pair, toward_server) >= redirected + relayed else None

    def direct(self, pair: JoinedPair) -> tuple[AppDirect, AppDirect]:
        """Each direction's switch (client->server, server->client), as the program left it."""
        values = (AppDirect(), AppDirect())
        if self._apps:
            bpfsys.map_lookup(self._apps["app_direct"], U64(pair.client_cookie), values[0])
            bpfsys.map_lookup(self._apps["app_direct"], U64(pair.server_cookie), values[1])
        return values

    def unlink_apps(self, pair: JoinedPair) -> None:
        """The apps' next sends take the proxy's path (a revoked or ending pair: the proxy
        then resets both, as today)."""
        pair.linked = False
        if not self._apps or pair.client_app is None:
            return
        for key in (pair.client_app, pair.server_app):
            bpfsys.map_delete(self._apps["app_links"], key)

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

    def carried(self, pair: JoinedPair) -> tuple[int, int]:
        """Bytes of each direction (client->server, server->client) carried so far: the
        verdict's counts, or what is queued on the target socket since the join when that is
        more (the apps' direct sends are counted only there; at the end both agree). A
        socket is read while open; once the proxy half-closed it, its count is frozen."""
        counts = self.counts(pair)
        for toward_server in (True, False):
            frozen = pair.server_frozen if toward_server else pair.client_frozen
            if frozen or not self._apps:
                continue
            try:
                landed = _landed(pair, toward_server)
            except OSError:
                continue   # closed: the last reading stands
            if toward_server:
                pair.landed_to_server = max(pair.landed_to_server, landed)
            else:
                pair.landed_to_client = max(pair.landed_to_client, landed)
        return (max(counts.client_to_server, pair.landed_to_server),
                max(counts.server_to_client, pair.landed_to_client))

    def freeze(self, pair: JoinedPair, toward_server: bool) -> None:
        """The proxy is about to half-close one target: its byte count is final (read it now)."""
        self.carried(pair)
        if toward_server:
            pair.server_frozen = True
        else:
            pair.client_frozen = True

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
        self.publish_landed(pair)   # everything redirected before them was on the target too

    def release(self, pair: JoinedPair) -> PairCounts:
        """The final counts; the pair's entries removed (a closed socket leaves the SOCKHASH
        by itself, an open one is taken out here so nothing redirects into it any more)."""
        counts = self.counts(pair)
        self._forget(pair)
        return counts

    def _forget(self, pair: JoinedPair) -> None:
        self.unlink_apps(pair)
        if self._apps and pair.client_app is not None:
            for key in (pair.client_app, pair.server_app):
                bpfsys.map_delete(self._apps["app_origin"], key)
        for cookie in (pair.client_cookie, pair.server_cookie):
            if self._apps:
                bpfsys.map_delete(self._apps["app_direct"], U64(cookie))
            bpfsys.map_delete(self._pairs, U64(cookie))
            bpfsys.map_delete(self._relayed, U64(cookie))
            bpfsys.map_delete(self._socks, U64(cookie))


def _landed(pair: JoinedPair, toward_server: bool) -> int:
    """Bytes queued on the direction's target socket (the proxy's toward that app) since the join."""
    if toward_server:
        return queued_bytes(pair.server) - pair.server_queued_before
    return queued_bytes(pair.client) - pair.client_queued_before


def _app_key_of_peer(sock: socket.socket) -> AppKey:
    """The app socket at the other end of one of the proxy's sockets (same netns, loopback
    or pod addresses): its own address is the proxy socket's peer."""
    local_ip, local_port = sock.getpeername()[:2]
    remote_ip, remote_port = sock.getsockname()[:2]
    return AppKey(netns=socket_netns_cookie(sock), local=Addr.of(local_ip), remote=Addr.of(remote_ip),
                  local_port=local_port, remote_port=remote_port)


def pair_entries(pin_dir: Path | str) -> int:
    """How many sockets the pair map names (tests, debug)."""
    fd = bpfsys.obj_get(Path(pin_dir) / "bypass_pairs")
    try:
        return len(bpfsys.map_keys(fd, ctypes.c_uint64))
    finally:
        os.close(fd)

"""HBONE for the waypoint, on the HBONE layer it shares with the node proxy (``shoal.hbone``).

The node proxy joins each HBONE stream to a TCP socket (``StreamPeer``); the waypoint
instead parses HTTP inside the stream, through ``shoal.hbone.stream.HboneStream`` (an
async byte stream: ``read``, ``write``, ``drain``, ``close``) handed to the HTTP servers
and the upstream client. Sessions, pooling (``HbonePool``), TLS contexts and SPIFFE
checks are ``shoal.hbone``'s, the same code as the node proxy's.

- ``start_hbone_listener``: the waypoint's only listener in the mesh: mTLS HBONE on
  15008 with the waypoint's SVID. Each CONNECT ``:authority`` (the Service VIP and port
  the client dialled) becomes one downstream HTTP connection.
- ``HboneConnector``: upstream streams to endpoints' node proxies (HBONE, pooled per
  destination identity and address) or plain TCP for endpoints outside the mesh.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from typing import Awaitable, Callable

from shoal.config import PORT_HBONE, PROXY_MARK
from shoal.h2guard import ENHANCE_YOUR_CALM, FloodGuard
from shoal.hbone import framing as hbone
from shoal.hbone.identity import IdentityError, IdentityManager, check_session
from shoal.hbone.pool import HbonePool, PoolKey
from shoal.hbone.session import HboneSession
from shoal.hbone.stream import HboneStream

from .downstream import serve_connection
from .http import Limits, PeerInfo
from .listener import connection_callbacks
from .proxy import WaypointProxy
from .upstream import Endpoint, TcpConnector

log = logging.getLogger(__name__)


class GuardedSession(HboneSession):
    """A server-side HBONE session whose peer's frames go through a ``FloodGuard`` first:
    a rapid-reset or CONTINUATION flood ends the whole session with GOAWAY
    (ENHANCE_YOUR_CALM) before the HTTP/2 library buffers or dispatches any of it."""

    def __init__(self, guard: FloodGuard, **kwargs) -> None:
        super().__init__(**kwargs)
        self.guard = guard

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        flood = self.guard.feed(data)
        if flood is None:
            super().data_received(data)
            return
        log.warning("hbone: %s from %s: GOAWAY", flood, self.peer_identity)
        self._on_rejected("h2_flood")
        self.h2.close(ENHANCE_YOUR_CALM)   # the GOAWAY close() flushes, with this code
        self.close()


def _forwarded_source(forwarded_for: str | None, peer_ip: str) -> str:
    if forwarded_for:
        try:
            return str(ipaddress.ip_address(forwarded_for))
        except ValueError:
            pass
    return peer_ip


class HboneListener:
    """The HBONE server socket: accepted connections go to TLS before anything reads them.

    Accepting on a raw socket (not ``create_server`` then ``start_tls``) matters: a
    protocol that owns the socket before TLS does would receive, and lose, a ClientHello
    that arrives early (uvloop reads right after ``connection_made``); the handshake
    then stalls until the client gives up. Here the kernel keeps the bytes until
    ``connect_accepted_socket(ssl=...)`` starts TLS on the socket. The context is the
    SVID current at accept time: rotation never touches live sessions.

    ``drain`` stops accepting and asks every session to finish (GOAWAY): streams in
    flight complete, new ones go elsewhere.
    """

    def __init__(self, sock: socket.socket, accept: Callable[[socket.socket], Awaitable[None]],
                 sessions: set[HboneSession], tunnels: set[asyncio.Task]) -> None:
        self.sockets = [sock]
        self._accept = accept
        self.sessions = sessions
        self.tunnels = tunnels
        self.serving = True
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        sock = self.sockets[0]
        while self.serving:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: keep the listener
                log.warning("hbone: accept failed: %s", err)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._accept(conn))
            self.tunnels.add(task)
            task.add_done_callback(self.tunnels.discard)

    def stop_accepting(self) -> None:
        if self.serving:
            self.serving = False
            self._loop.remove_reader(self.sockets[0].fileno())
            self.sockets[0].close()

    def drain(self) -> None:
        self.stop_accepting()
        for session in list(self.sessions):
            session.drain()

    @property
    def active(self) -> int:
        """Tunnels (downstream HTTP connections) and handshakes still running."""
        return len(self.tunnels)

    def close(self) -> None:
        self.stop_accepting()
        for session in list(self.sessions):
            session.close()


def _listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_hbone_listener(proxy: WaypointProxy, limits: Limits, identities: IdentityManager, spiffe_id: str,
                               host: str = "0.0.0.0", port: int = PORT_HBONE, handshake_timeout: float = 10.0,
                               idle_timeout: float = 300.0) -> HboneListener:
    """mTLS HBONE with the waypoint's SVID; every tunnel carries one downstream HTTP connection."""
    reject, on_protocol = connection_callbacks(proxy, limits)
    loop = asyncio.get_running_loop()
    sessions: set[HboneSession] = set()
    tunnels: set[asyncio.Task] = set()  # strong references: a task nobody holds may be collected

    def on_request(session: HboneSession, event: hbone.TunnelRequested, peer_ip: str) -> None:
        stream = HboneStream()
        session.accept_stream(stream, event.stream_id)
        peer = PeerInfo(source_ip=_forwarded_source(event.forwarded_for, peer_ip), source_port=0,
                        source_principal=session.peer_identity or "", destination_ip=event.host,
                        destination_port=event.port, mtls=True)
        task = loop.create_task(serve_connection(stream, peer, proxy.handle, limits, reject, on_protocol))
        tunnels.add(task)
        task.add_done_callback(tunnels.discard)

    async def accept(conn: socket.socket) -> None:
        peer = conn.getpeername()
        svid = identities.current(spiffe_id)
        if svid is None:
            reject("no_certificate", 503)
            conn.close()
            return
        session = GuardedSession(FloodGuard(max_header_block=2 * limits.max_header_bytes,
                                            max_resets=limits.max_h2_resets, expect_preface=True),
                                 client_side=False, idle_timeout=idle_timeout,
                                 on_request=lambda s, ev: on_request(s, ev, peer[0]),
                                 on_rejected=lambda reason: reject(f"hbone_{reason}", 400),
                                 on_closed=sessions.discard,
                                 verify=lambda ssl_object: check_session(ssl_object, None))
        try:
            await loop.connect_accepted_socket(lambda: session, conn, ssl=svid.server_context,
                                               ssl_handshake_timeout=handshake_timeout)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as err:
            reject("tls_handshake", 400)
            log.info("hbone: handshake with %s failed: %s", peer[0], err or type(err).__name__)
            conn.close()
            return
        if session.verify_error is not None:
            reject("peer_identity", 401)
            log.warning("hbone: %s refused: %s", peer[0], session.verify_error)
            return
        session.local_identity = spiffe_id
        sessions.add(session)

    return HboneListener(_listening_socket(host, port), accept, sessions, tunnels)


class HboneConnector:
    """Upstream transport: HBONE to meshed endpoints (pooled sessions), TCP to the others."""

    def __init__(self, identities: IdentityManager, spiffe_id: str, source_ip: str, pool: HbonePool | None = None,
                 connect_timeout: float = 5.0, hbone_port: int = PORT_HBONE, mark: int | None = PROXY_MARK,
                 idle_timeout: float = 300.0) -> None:
        self.identities = identities
        self.spiffe_id = spiffe_id
        self.source_ip = source_ip
        self.pool = pool or HbonePool()
        self.connect_timeout = connect_timeout
        self.hbone_port = hbone_port
        self.mark = mark
        self.idle_timeout = idle_timeout
        self._tcp = TcpConnector(connect_timeout)

    async def open(self, endpoint: Endpoint):
        if endpoint.protocol != "HBONE":
            return await self._tcp.open(endpoint)
        key = PoolKey(self.spiffe_id, endpoint.spiffe_id, endpoint.ip, self.hbone_port)
        try:
            session = await self.pool.session(key, self._dial)
        except IdentityError as err:
            raise ConnectionRefusedError(f"HBONE to {endpoint.ip}: {err}") from None
        stream = HboneStream()
        stream.response = asyncio.get_running_loop().create_future()
        session.open_stream(stream, endpoint.ip, endpoint.port, self.source_ip, hbone.new_traceparent())
        try:
            status = await asyncio.wait_for(stream.response, self.connect_timeout)
        except BaseException:
            stream.close()
            raise
        if status != hbone.STATUS_OK:
            stream.close()
            raise ConnectionRefusedError(f"HBONE CONNECT {endpoint.address} answered {status}")
        return stream

    def _socket(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.mark is not None:
            try:
                # Marked sockets are skipped by Shoal's capture, like the node proxy's own.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            except PermissionError:
                log.debug("SO_MARK needs CAP_NET_ADMIN; socket left unmarked")
        return sock

    async def _dial(self, key: PoolKey) -> HboneSession:
        loop = asyncio.get_running_loop()
        svid = await self.identities.get(self.spiffe_id)
        sock = self._socket(socket.AF_INET6 if ":" in key.dst_ip else socket.AF_INET)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (key.dst_ip, key.dst_port)), self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        session = HboneSession(client_side=True, idle_timeout=self.idle_timeout, on_closed=self.pool.discard)
        transport, _ = await loop.create_connection(lambda: session, sock=sock, ssl=svid.client_context,
                                                    server_hostname="", ssl_handshake_timeout=self.connect_timeout)
        try:
            session.peer_identity = check_session(transport.get_extra_info("ssl_object"), key.dst_identity or None)
        except IdentityError:
            transport.abort()
            raise
        session.local_identity = self.spiffe_id
        return session

    def close(self) -> None:
        self.pool.close_all()


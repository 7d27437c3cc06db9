"""HBONE for the waypoint, on the HBONE layer it shares with the node proxy (``shoal.hbone``).

The node proxy joins each HBONE stream to a TCP socket (``StreamPeer``); the waypoint
instead parses HTTP inside the stream, through ``shoal.hbone.stream.HboneStream`` (an
async byte stream: ``read``, ``write``, ``drain``, ``close``) handed to the HTTP servers
and the upstream client. Sessions, pooling (``HbonePool``), TLS contexts and SPIFFE
checks are ``shoal.hbone``'s, the same code as the node proxy's.

- ``start_hbone_listener``: the waypoint's only listener in the mesh: mTLS HBONE on
  15008 with the waypoint's SVID. Each CONNECT ``:authority`` (the Service VIP and port
  the client dialled) becomes one downstream HTTP connection. Its door is the node
  proxy's (``shoal.hbone.gatekeeper``): a source in the penalty box is refused at
  accept, TLS handshakes in progress are capped per source and in all, a source failing
  handshakes or cut off for HTTP/2 abuse is boxed; every refusal counted by reason.
- ``HboneConnector``: upstream streams to endpoints' node proxies (HBONE, pooled per
  destination identity and address) or plain TCP for endpoints outside the mesh.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from typing import Awaitable, Callable

from shoal.config import PORT_HBONE, PROXY_MARK
from shoal.hbone import framing as hbone
from shoal.hbone.gatekeeper import ACCEPTS_PER_WAKEUP, Gatekeeper, reset_socket
from shoal.hbone.handoff import create_connection_on
from shoal.hbone.handshakes import HandshakeLimits
from shoal.hbone.identity import IdentityError, check_session
from shoal.hbone.issuer import IdentityManager
from shoal.hbone.pool import HbonePool, PoolKey
from shoal.hbone.session import HboneSession
from shoal.hbone.stream import HboneStream
from shoal.ratelog import LogLimiter

from .downstream import serve_connection
from .fastpath import fast_lanes
from .http import Limits, PeerInfo
from .listener import connection_callbacks
from .proxy import WaypointProxy
from .upstream import Endpoint, TcpConnector

log = logging.getLogger(__name__)


def trusted_source(forwarded_for: str | None, peer_ip: str, peer_identity: str | None,
                   identity_at: Callable[[str], str | None]) -> str:
    """The downstream client's address for an HBONE tunnel.

    A node proxy dials the waypoint with the identity of the workload it speaks for
    (as ztunnel does) and names that workload's address in ``forwarded``. Any other HBONE
    peer (another waypoint, a stolen or foreign SVID) could name any address there and
    borrow another workload's source IP, namespace and labels in L7 policy. So the header
    is believed only when the workload at that address has the peer's identity, that is
    when the peer is the node proxy of that workload; otherwise the source is the peer's
    own address (its identity is the principal either way).
    """
    peer_ip = _unmapped(peer_ip)
    if not forwarded_for or not peer_identity:
        return peer_ip
    try:
        claimed = _unmapped(str(ipaddress.ip_address(forwarded_for)))
    except ValueError:
        return peer_ip
    return claimed if identity_at(claimed) == peer_identity else peer_ip


def _unmapped(ip: str) -> str:
    """'::ffff:10.0.0.1' (an IPv4 peer of a dual-stack socket) -> '10.0.0.1'."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(address)


class HboneListener:
    """The HBONE server socket: accepted connections go to TLS before anything reads them.

    Accepting on a raw socket (not ``create_server`` then ``start_tls``) matters: a
    protocol that owns the socket before TLS does would receive, and lose, a ClientHello
    that arrives early (uvloop reads right after ``connection_made``); the handshake
    then stalls until the client gives up. Here the kernel keeps the bytes until
    ``connect_accepted_socket(ssl=...)`` starts TLS on the socket. The context is the
    SVID current at accept time: rotation never touches live sessions.

    ``drain`` stops accepting and asks every session to finish (GOAWAY): streams in
    flight complete, new ones go elsewhere. The ``gatekeeper`` refuses a source in its
    penalty box for the cost of the accept alone (reset, counted through ``on_refused``):
    a boxed source reconnecting in a loop costs no TLS.
    """

    def __init__(self, sock: socket.socket, accept: Callable[[socket.socket], Awaitable[None]],
                 sessions: set[HboneSession], tunnels: set[asyncio.Task], gatekeeper: Gatekeeper,
                 on_refused: Callable[[str], None]) -> None:
        self.sockets = [sock]
        self._accept = accept
        self.gatekeeper = gatekeeper
        self._on_refused = on_refused
        self.sessions = sessions
        self.tunnels = tunnels
        self.serving = True
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        sock = self.sockets[0]
        for _ in range(ACCEPTS_PER_WAKEUP):
            if not self.serving:
                return
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: keep the listener
                log.warning("hbone: accept failed: %s", err)
                return
            refusal = self.gatekeeper.refused_at_accept(_unmapped(address[0]))
            if refusal is not None:
                reset_socket(conn)
                self._on_refused(refusal)
                continue
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


DUAL_STACK = "::"


def _listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """``::`` listens on both families (one IPv6 socket, V6ONLY off: IPv4 peers show as
    ``::ffff:a.b.c.d``); it falls back to IPv4 only where the pod has no IPv6 at all."""
    if host == DUAL_STACK:
        try:
            return _bind(socket.AF_INET6, host, port, backlog, dual_stack=True)
        except OSError as err:
            if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            log.warning("hbone: no IPv6 here (%s): listening on IPv4 only", err)
            host = "0.0.0.0"
    return _bind(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port, backlog)


def _bind(family: int, host: str, port: int, backlog: int, dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# The status label of each refusal at the door (the metric's other label): not the
# peer's certificate, too slow, over a cap or boxed; anything else a bad handshake (400).
DOOR_STATUS = {"peer_identity": 401, "untrusted_certificate": 401, "handshake_timeout": 408,
               "handshake_source_cap": 429, "handshake_capacity": 429, "handshake_failures": 429,
               "handshake_reconnect_loop": 429, "abuser_penalty": 429}


async def start_hbone_listener(proxy: WaypointProxy, limits: Limits, identities: IdentityManager, spiffe_id: str,
                               host: str = DUAL_STACK, port: int = PORT_HBONE,
                               idle_timeout: float = 300.0,
                               handshake_limits: HandshakeLimits = HandshakeLimits()) -> HboneListener:
    """mTLS HBONE with the waypoint's SVID; every tunnel carries one downstream HTTP connection."""
    reject, on_protocol = connection_callbacks(proxy, limits)

    def refused(reason: str) -> None:
        reject(reason, DOOR_STATUS.get(reason, 400))

    log_limiter = LogLimiter()   # a line a second per reason about misbehaving peers
    gatekeeper = Gatekeeper(handshake_limits, refused, log_limiter)
    lanes = fast_lanes(proxy)
    loop = asyncio.get_running_loop()
    sessions: set[HboneSession] = set()
    tunnels: set[asyncio.Task] = set()  # strong references: a task nobody holds may be collected

    def identity_at(ip: str) -> str | None:
        workload = proxy.resolver.workload_by_ip(ip)
        return workload.principal if workload is not None else None

    def on_request(session: HboneSession, event: hbone.TunnelRequested, peer_ip: str) -> None:
        stream = HboneStream()
        session.accept_stream(stream, event.stream_id)
        source = trusted_source(event.forwarded_for, peer_ip, session.peer_identity, identity_at)
        peer = PeerInfo(source_ip=source, source_port=0,
                        source_principal=session.peer_identity or "", destination_ip=event.host,
                        destination_port=event.port, mtls=True)
        task = loop.create_task(serve_connection(stream, peer, proxy.handle, limits, reject, on_protocol, lanes))
        tunnels.add(task)
        task.add_done_callback(tunnels.discard)

    def session_refused(source: str, reason: str) -> None:
        reject(f"hbone_{reason}", 400)
        gatekeeper.abused(source, reason)

    async def accept(conn: socket.socket) -> None:
        address = conn.getpeername()
        peer = (_unmapped(address[0]), address[1])
        svid = identities.current(spiffe_id)
        if svid is None:
            reject("no_certificate", 503)
            conn.close()
            return
        # Flood limits (rapid reset, CONTINUATION, control-frame floods) are the shared
        # HBONE layer's (shoal.hbone.framing), as for the node proxy: a flood ends the
        # session with GOAWAY ENHANCE_YOUR_CALM, counted as hbone_<reason>, and its source
        # waits in the penalty box.
        session = HboneSession(client_side=False, idle_timeout=idle_timeout,
                               on_request=lambda s, ev: on_request(s, ev, peer[0]),
                               on_rejected=lambda reason: session_refused(peer[0], reason),
                               on_closed=sessions.discard,
                               verify=lambda ssl_object: check_session(ssl_object, None), log_limiter=log_limiter)
        if await gatekeeper.handshake(conn, peer, session, svid.server_context):
            session.local_identity = spiffe_id
            sessions.add(session)

    return HboneListener(_listening_socket(host, port), accept, sessions, tunnels, gatekeeper, refused)


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
        # Not loop.create_connection(sock=...): a peer resetting before our ClientHello left
        # ``sock`` naming a number libuv had closed (shoal/hbone/handoff.py).
        transport, _ = await create_connection_on(loop, lambda: session, sock, ssl=svid.client_context,
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


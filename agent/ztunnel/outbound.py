"""15001: connections leaving an enrolled pod.

The agent's connect4 program rewrote the app's ``connect()`` to ``127.0.0.1:15001`` in
the pod's namespace and recorded the original destination; we recover it from the
accepted socket, decide (pure :func:`plan_route`) and either tunnel it (HBONE to the
destination pod, or to its waypoint) or pass it through in plaintext (unmeshed peers).
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Callable

from shoal.agent.ztunnel.bypass import local_destination, serve_same_node
from shoal.agent.ztunnel.context import ProxyContext, ServedPod
from shoal.agent.ztunnel.relay import is_network_failure, join_plain, reset_connection
from shoal.agent.ztunnel.telemetry import (
    FLAG_DENIED,
    FLAG_NO_ROUTE,
    FLAG_UPSTREAM_FAILURE,
    ConnectionRecord,
)
from shoal.config import PORT_HBONE
from shoal.hbone import framing as hbone
from shoal.hbone.handoff import create_connection_on
from shoal.hbone.identity import IdentityError, check_session
from shoal.hbone.pool import PoolKey
from shoal.hbone.session import HboneSession, StreamPeer, StreamRefused
from shoal.ratelog import held_note, log_limited
from shoal.telemetry_labels import service_fqdn
from shoal.xds.model import Workload, address_of_family, canonical_ip, ip_family
from shoal.xds.state import ConfigState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    kind: str                          # "hbone" | "waypoint" | "passthrough" | "none"
    target_ip: str = ""                # where the TCP/TLS connection goes
    target_port: int = 0
    authority_ip: str = ""             # HBONE :authority (the tunnel's destination)
    authority_port: int = 0
    identity: str = ""                 # expected SPIFFE ID of the HBONE server
    workload: Workload | None = None
    service: str = "unknown"
    reason: str = ""


def same_family_address(target: Workload, dst_ip: str) -> str:
    """``target``'s address in the family the app dialled (an IPv6 ClusterIP leads to the
    endpoint's IPv6 address), or its primary address when it has none in that family."""
    return target.address(ip_family(dst_ip)) or target.ip


def plan_route(state: ConfigState, dst_ip: str, dst_port: int,
               choose: Callable[[list], object] = random.choice) -> Route:
    """Where a connection to ``dst_ip:dst_port`` goes (no I/O). Both families: the tunnel
    runs in the family the app used, pod IP to pod IP."""
    dst_ip = canonical_ip(dst_ip)
    service = state.service_by_vip(dst_ip)
    waypoint_ref = None
    service_name = "unknown"
    if service is not None:
        service_name = service_fqdn(service.name, service.namespace)
        ports = [p for p in service.ports if p.port == dst_port]
        if not ports:
            return Route("none", service=service_name, reason=f"service {service.key} has no port {dst_port}")
        target_port = ports[0].target_port or dst_port
        waypoint_ref = service.waypoint
        endpoints = state.endpoints(service)
        if waypoint_ref is None:
            if not endpoints:
                return Route("none", service=service_name, reason=f"service {service.key} has no endpoints")
            workload = choose(endpoints)
        else:
            workload = None
    else:
        workload = state.workload_by_ip(dst_ip)
        target_port = dst_port
        if workload is not None:
            waypoint_ref = workload.waypoint
    if waypoint_ref is not None:
        waypoint = state.waypoint(waypoint_ref.namespace, waypoint_ref.name)
        if waypoint is None:
            return Route("none", service=service_name,
                         reason=f"waypoint {waypoint_ref.namespace}/{waypoint_ref.name} unknown")
        # The waypoint gets the original destination (VIP or pod) as :authority. It listens
        # on both families: the tunnel runs in the family the app used (its primary address
        # when it has none in that family).
        address = address_of_family(waypoint.ips, ip_family(dst_ip)) or waypoint.ip
        return Route("waypoint", address, PORT_HBONE, dst_ip, dst_port,
                     waypoint.spiffe_id, workload, service_name)
    if workload is not None and workload.meshed and workload.protocol == "HBONE":
        address = same_family_address(workload, dst_ip)
        return Route("hbone", address, PORT_HBONE, address, target_port, workload.spiffe_id,
                     workload, service_name)
    target_ip = same_family_address(workload, dst_ip) if workload is not None else dst_ip
    return Route("passthrough", target_ip, target_port, target_ip, target_port, "", workload, service_name)


async def handle_outbound(ctx: ProxyContext, pod: ServedPod, conn: socket.socket) -> None:
    """One accepted connection on 15001 (unread: the kernel holds its bytes meanwhile)."""
    peer = conn.getpeername()
    try:
        original = ctx.origdst.lookup(conn) if ctx.origdst is not None else None
    except (LookupError, OSError) as exc:
        log.debug("origdst lookup: %s", exc)
        original = None
    if original is None:
        ctx.metrics.reject("outbound", "no_original_destination")
        log_limited(log, ctx.hbone_log_limiter, "outbound:no_original_destination", logging.WARNING,
                    "outbound from %s: no original destination for %s", pod.info.name, peer)
        reset_connection(conn)
        return
    dst_ip, dst_port = canonical_ip(original[0]), original[1]
    if not ctx.config_synced.is_set():
        try:
            await asyncio.wait_for(ctx.config_synced.wait(), ctx.config.connect_timeout)
        except asyncio.TimeoutError:
            ctx.metrics.reject("outbound", "config_not_synced")
            log_limited(log, ctx.hbone_log_limiter, "outbound:config_not_synced", logging.WARNING,
                        "outbound from %s to %s:%d refused: no config yet", pod.info.name, dst_ip, dst_port)
            reset_connection(conn)
            return
    route = plan_route(ctx.state, dst_ip, dst_port)
    source_ip = address_of_family(pod.info.ips, ip_family(route.target_ip or dst_ip)) or pod.info.ip
    rec = ConnectionRecord("source", source_ip, peer[1], dst_ip, dst_port,
                           src_workload=ctx.state.workload(pod.info.uid) or pod.workload_stub(),
                           dst_workload=route.workload, service=route.service, route=route.kind)
    try:
        if route.kind == "none":
            rec.response_flags, rec.error = FLAG_NO_ROUTE, route.reason
            ctx.metrics.reject("outbound", "no_route")
            reset_connection(conn)
            ctx.telemetry.closed(rec)
        elif route.kind == "passthrough":
            await _passthrough(ctx, pod, conn, route, rec)
        elif route.kind == "hbone" and (local := local_destination(ctx, route.workload)) is not None \
                and await serve_same_node(ctx, pod, conn, route.authority_ip, route.authority_port, local, rec):
            pass   # both pods are ours: joined in the kernel (bypass.py), no tunnel to ourselves
        else:
            await _tunnel(ctx, pod, conn, route, rec)
    except (OSError, asyncio.TimeoutError, IdentityError) as exc:
        if rec.response_flags == "-":
            rec.response_flags = FLAG_UPSTREAM_FAILURE
        rec.error = rec.error or f"{type(exc).__name__}: {exc}"
        # A failure of the network or the peer is counted and logged a line a second per
        # kind (a burst fails thousands at once); anything else is a bug of ours, logged
        # with its traceback (the FileExistsError of the 10,000 burst came without one).
        unexpected = not isinstance(exc, IdentityError) and not is_network_failure(exc)
        if not isinstance(exc, IdentityError):
            ctx.metrics.reject("outbound", "internal_error" if unexpected else "upstream_connect")
        log_limited(log, ctx.hbone_log_limiter, ("outbound:failed", type(exc).__name__),
                    logging.ERROR if unexpected else logging.INFO, "outbound %s -> %s:%d failed: %s",
                    pod.info.name, dst_ip, dst_port, rec.error, exc_info=exc if unexpected else None)
        reset_connection(conn)
        ctx.telemetry.closed(rec)


async def _passthrough(ctx, pod, conn: socket.socket, route: Route, rec: ConnectionRecord) -> None:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in route.target_ip else socket.AF_INET
    upstream = pod.netns.socket(family)
    try:
        with ctx.admission.waiting_on_peer():
            await asyncio.wait_for(loop.sock_connect(upstream, (route.target_ip, route.target_port)),
                                   ctx.config.connect_timeout)
    except BaseException:
        upstream.close()
        raise
    await join_plain(conn, upstream, rec, ctx.telemetry)


async def dial(ctx: ProxyContext, pod: ServedPod, key: PoolKey) -> HboneSession:
    """A new mTLS HBONE connection from inside ``pod`` to ``key``'s address."""
    loop = asyncio.get_running_loop()
    svid = await ctx.identities.get(key.src_identity)
    family = socket.AF_INET6 if ":" in key.dst_ip else socket.AF_INET
    sock = pod.netns.socket(family)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (key.dst_ip, key.dst_port)), ctx.config.connect_timeout)
    except BaseException:
        sock.close()
        raise
    session = HboneSession(client_side=True, idle_timeout=ctx.config.pool_idle_timeout,
                           on_closed=ctx.pool.discard,
                           verify=lambda ssl_object: check_session(ssl_object, key.dst_identity),
                           tcp_reads=ctx.tcp_reads)
    # Not loop.create_connection(sock=...): a peer resetting before our ClientHello left
    # ``sock`` owning a number libuv had closed, and freeing it closed another connection's
    # socket behind libuv's back (shoal/hbone/handoff.py).
    await create_connection_on(loop, lambda: session, sock, ssl=svid.client_context, server_hostname="",
                               ssl_handshake_timeout=ctx.config.handshake_limits.timeout)
    if session.verify_error is not None:
        ctx.metrics.reject("outbound", "peer_identity")
        log.warning("outbound HBONE to %s:%d: %s", key.dst_ip, key.dst_port, session.verify_error)
        raise session.verify_error
    session.local_identity = key.src_identity
    return session


def answer_deadline(opened: float, last_progress: float, quiet: float, limit: float,
                    probed: float = 0.0) -> float:
    """When to stop waiting for a stream's answer (pure): once the connection has shown no
    progress (an answer to any stream, or the ACK of a liveness PING) for ``quiet`` seconds
    since ours was opened (a stuck or dead peer, a black-holed path), or ``limit`` after
    opening at the latest. A peer answering others is busy, not stuck: a 10,000-connection
    burst queues at its dial limit for longer than a connect timeout, and a fixed 5 s here
    failed 2,163 of them (each reset, then counted by the peer as a Rapid Reset, which cost
    whole connections). A peer tearing down 10,000 tunnels answers nothing for seconds, but
    acknowledges PINGs: 4,965 failed after a burst before the PINGs counted. The peer always
    gets half the quiet time after our latest PING (``probed``): a sender whose own loop
    stalled past the deadline must not give up before the peer could acknowledge."""
    return min(max(max(opened, last_progress) + quiet, probed + quiet / 2), opened + limit)


async def await_answer(session: HboneSession, response: asyncio.Future, quiet: float, limit: float) -> int:
    """The HBONE status of a stream just opened on ``session``; TimeoutError past
    :func:`answer_deadline`. Half way through a quiet spell the session probes the peer
    (a PING): its ACK is progress, so a busy peer is waited for, a silent one is not."""
    opened = time.monotonic()
    probed = 0.0
    while True:
        now = time.monotonic()
        progress = max(opened, session.last_progress)
        probe_at = progress + quiet / 2
        if probe_at <= now and probed <= progress:   # no PING since the last progress
            session.probe()
            probed = now
        deadline = answer_deadline(opened, session.last_progress, quiet, limit, probed)
        if deadline <= now:
            raise asyncio.TimeoutError
        wake = deadline if probed > progress else min(deadline, probe_at)
        try:
            return await asyncio.wait_for(asyncio.shield(response), wake - now)
        except asyncio.TimeoutError:
            continue  # the peer may have shown progress meanwhile: the deadline moved


async def _tunnel(ctx, pod, conn: socket.socket, route: Route, rec: ConnectionRecord) -> None:
    key = PoolKey(pod.spiffe_id, route.identity, route.target_ip, route.target_port)
    rec.src_identity, rec.dst_identity, rec.mtls = pod.spiffe_id, route.identity, True
    for attempt in (1, 2):
        try:
            with ctx.admission.waiting_on_peer():   # the peer's handshake: not our delay (admission.Setup)
                session = await ctx.pool.session(key, lambda k: dial(ctx, pod, k))
        except (ConnectionError, asyncio.TimeoutError) as exc:
            # A dial that failed (a handshake the busy peer did not finish in time) fails
            # every stream waiting for it: each gets one more dial before giving up.
            if attempt == 2:
                raise
            ctx.metrics.outbound_retries.labels("dial_failed").inc()
            log_limited(log, ctx.hbone_log_limiter, "outbound:dial_retry", logging.INFO,
                        "outbound %s: HBONE dial to %s failed (%s: %s), retrying", pod.info.name, route.target_ip,
                        type(exc).__name__, exc)
            continue
        peer = StreamPeer(rec, ctx.telemetry.closed, tcp_is_client=True)
        peer.response = asyncio.get_running_loop().create_future()
        session.open_stream(peer, route.authority_ip, route.authority_port, rec.src_ip, hbone.new_traceparent(),
                            rec.src_port)
        try:
            with ctx.admission.waiting_on_peer():   # nor its answer: a slow peer sheds itself
                status = await await_answer(session, peer.response, ctx.config.connect_timeout,
                                            ctx.config.answer_limit)
            break
        except ConnectionError as exc:
            # The HBONE connection went away before answering (e.g. the peer proxy was
            # retiring), or the peer refused the stream unprocessed (REFUSED_STREAM: it is
            # overloaded or going away): nothing reached the app yet, so one retry.
            session.stream_done(peer.stream_id)
            if attempt == 1:
                # One line a second, not one per connection: a refusing peer refuses a
                # whole burst (~5,000 lines in 5 s once, the proxy's one thread writing them).
                ctx.metrics.outbound_retries.labels(
                    "stream_refused" if isinstance(exc, StreamRefused) else "stream_lost").inc()
                log_limited(log, ctx.hbone_log_limiter, "outbound:stream_retry", logging.INFO,
                            "outbound %s: stream lost before its answer (%s), retrying", pod.info.name, exc)
                continue
            refused = isinstance(exc, StreamRefused)
            error = f"refused by the peer proxy: {exc}" if refused else f"no HBONE answer: {exc}"
            reason = "peer_refused" if refused else "hbone_no_answer"
            if refused and (held := ctx.hbone_log_limiter.allow("peer_refused")) is not None:
                log.warning("outbound %s: the peer proxy at %s refused the stream twice, unprocessed "
                            "(overloaded or going away): connection reset%s", pod.info.name, route.target_ip,
                            held_note(held))
        except asyncio.TimeoutError:
            error, reason = "no HBONE answer in time", "hbone_no_answer"
            session.h2.reset(peer.stream_id)
            session.stream_done(peer.stream_id)
            # A connection whose peer answered nothing for the whole wait is suspect: its
            # path may be black-holed (seen on the local cluster while pod MACs changed under
            # their addresses; a peer node gone without a RST looks the same). No new tunnels
            # on it, the next ones dial afresh; it closes once its live tunnels end.
            session.drain()
            session.flush()
        rec.response_flags, rec.error = FLAG_UPSTREAM_FAILURE, error
        ctx.metrics.reject("outbound", reason)
        reset_connection(conn)
        ctx.telemetry.closed(rec)
        return
    if status == hbone.STATUS_OK:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: peer, conn)
        ctx.telemetry.opened(rec)
        peer.established()
        return
    session.stream_done(peer.stream_id)
    rec.response_flags = {hbone.STATUS_UNAUTHORIZED: FLAG_DENIED}.get(status, FLAG_UPSTREAM_FAILURE)
    rec.error = f"HBONE status {status}"
    ctx.metrics.reject("outbound", "denied" if status == hbone.STATUS_UNAUTHORIZED else f"hbone_{status}")
    reset_connection(conn)  # the app sees a reset, like a refused connection
    ctx.telemetry.closed(rec)

"""Connections arriving at an enrolled pod.

- 15008, HBONE: mTLS (client certificate required), then HTTP/2 CONNECT streams. A
  stream gets 200 only after L4 authorization passed *and* the upstream connect to the
  app succeeded; 400 malformed or not addressed to this pod, 401 denied, 503 no upstream.
  An overloaded proxy, past its cap on streams in setup (admission.py), resets NEW
  streams with REFUSED_STREAM: nothing of them was done, the peer may retry.
- 15006, plaintext (the agent's tc program steers other inbound TCP here): refused in
  STRICT mode, authorized without an identity in PERMISSIVE mode, then relayed.

The app is reached from inside the pod's namespace at ``<pod IP>:<port>``, the pod IP
of the destination's family, never at a loopback address: a listener the app bound to
127.0.0.1 or ::1 stays local to the pod. Anything asking for a loopback destination is
refused (``loopback_destination``). The app sees the client's real IP on every port, in
both families (``transparent.py``); only a hairpin from the pod itself comes from loopback.

The client's address is the peer address of the proxy's own connection: on 15008 that
is the source pod's IP (the source node proxy dials from inside that pod), with its
identity from the mTLS certificate. A ``forwarded`` header is never trusted for it: it
is client-controlled text (counted as ``forwarded_ignored`` when it disagrees).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from shoal.agent.ztunnel import transparent
from shoal.agent.ztunnel.admission import STREAM_KIND
from shoal.agent.ztunnel.authz import ConnectionInfo, authorize
from shoal.agent.ztunnel.context import ProxyContext, ServedPod
from shoal.agent.ztunnel.relay import join_plain, reset_connection
from shoal.agent.ztunnel.telemetry import (
    FLAG_DENIED,
    FLAG_NO_ROUTE,
    FLAG_UPSTREAM_FAILURE,
    ConnectionRecord,
)
from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND, PROXY_MARK
from shoal.hbone import framing as hbone
from shoal.hbone.identity import check_session
from shoal.hbone.session import HboneSession, StreamPeer, abort_with_reset
from shoal.ratelog import log_limited
from shoal.telemetry_labels import service_of_endpoint
from shoal.xds.model import canonical_ip

log = logging.getLogger(__name__)

PROXY_PORTS = frozenset({PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_HBONE})
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def delivery_refusal(pod: ServedPod, dst_ip: str, dst_port: int) -> tuple[str, str] | None:
    """(reason, detail) when ``dst_ip:dst_port`` is not something this pod's app exposes to
    the network: a loopback or unspecified address, an address that is not the pod's, or
    one of the proxy's own ports. Pure."""
    address = ipaddress.ip_address(dst_ip)
    if address.is_loopback or address.is_unspecified or \
            getattr(address, "ipv4_mapped", None) is not None and address.ipv4_mapped.is_loopback:
        return "loopback_destination", f"{dst_ip}:{dst_port} is local to {pod.info.name}, not exposed"
    if not pod.owns(dst_ip) or dst_port in PROXY_PORTS:
        return "not_local_pod", f"{dst_ip}:{dst_port} is not an app port of {pod.info.name}"
    return None


async def connect_app(ctx: ProxyContext, pod: ServedPod, dst_ip: str, port: int,
                      client_ip: str) -> socket.socket:
    """A TCP connection from the proxy to the app at its pod IP ``dst_ip``, made inside
    the pod's namespace with the socket bound to ``lo``: the agent's sk_lookup leaves
    connections arriving on ``lo`` to the app and steers every other one back into the
    proxy. From the client's own IP (IP_TRANSPARENT), on every port and both families;
    see transparent.py for the routing that makes both work."""
    dst_ip = canonical_ip(dst_ip)
    client_ip = canonical_ip(client_ip) if client_ip else ""
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    if (":" in client_ip) != (family == socket.AF_INET6):
        raise ConnectionRefusedError(f"client {client_ip} and destination {dst_ip} differ in family")
    spoof = not pod.owns(client_ip)   # a hairpin from the pod itself comes from loopback
    sock = pod.netns.socket(family, transparent=spoof, mark=transparent.DELIVERY_MARK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        # The port is chosen at connect(), for the whole 4-tuple, not by bind(0): bind
        # skips every port any socket of that address holds, TIME_WAIT ones included, and
        # scans one parity of the range first. After a 10,000-connection burst each bind
        # scanned ~14,000 ports (6 ms of kernel time in the proxy's one thread, against
        # 10 us): at 200 connections/s the loop stalled until TIME_WAIT expired.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((client_ip if spoof else LOOPBACK[family], 0))
        # asyncio.timeout, not wait_for: wait_for's own task costs the CONNECT three more
        # loop turns before its answer, each as long as all the I/O of that turn (a
        # proxy tearing down 10,000 tunnels makes turns long).
        async with asyncio.timeout(ctx.config.connect_timeout):
            await asyncio.get_running_loop().sock_connect(sock, (dst_ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


# -- 15008 ------------------------------------------------------------------------------------

def refused_at_accept(ctx: ProxyContext, address: tuple) -> str | None:
    """15008's screen at accept (``proxy.Acceptor``): a source recently cut off for abuse,
    or for failing handshakes, is refused before anything else (shoal.hbone.penalty)."""
    return ctx.gatekeeper.refused_at_accept(address[0])


async def handle_hbone(ctx: ProxyContext, pod: ServedPod, conn: socket.socket) -> None:
    """One accepted connection on 15008 (past ``refused_at_accept``): mTLS handshake (bounded
    in time, and in number per source and per worker: shoal.hbone.gatekeeper), then HTTP/2."""
    peer = conn.getpeername()
    svid = ctx.identities.current(pod.spiffe_id)
    if svid is None:
        ctx.metrics.reject("hbone", "no_certificate")
        conn.close()
        return
    session = HboneSession(client_side=False, idle_timeout=ctx.config.pool_idle_timeout,
                           on_request=lambda s, ev: _on_request(ctx, pod, s, ev, peer[0]),
                           on_rejected=lambda reason: _session_refused(ctx, peer[0], reason),
                           on_closed=lambda s: (ctx.inbound_sessions.discard(s), pod.sessions.discard(s)),
                           verify=lambda ssl_object: check_session(ssl_object, None),
                           tcp_reads=ctx.tcp_reads, log_limiter=ctx.hbone_log_limiter)
    # The context is the SVID current at accept time: rotation never touches live sessions.
    if not await ctx.gatekeeper.handshake(conn, peer, session, svid.server_context):
        return
    session.local_identity = pod.spiffe_id
    ctx.inbound_sessions.add(session)
    pod.sessions.add(session)


def _session_refused(ctx: ProxyContext, source: str, reason: str) -> None:
    """A stream or the whole session refused for ``reason`` (counted); an abuser's address
    goes in the penalty box."""
    ctx.metrics.reject("hbone", reason)
    ctx.gatekeeper.abused(source, reason)


def _on_request(ctx, pod, session: HboneSession, ev: hbone.TunnelRequested, peer_ip: str) -> asyncio.Task | None:
    """The serving task, held by the session: a reset of the stream cancels it. Past the
    cap on streams in setup the stream is refused at once, unprocessed (REFUSED_STREAM:
    the peer may retry it); established streams are not touched."""
    refusal = ctx.admission.admit_stream()
    if refusal is not None:
        ctx.metrics.reject("hbone", refusal)
        session.refuse_stream(ev.stream_id, None)
        return None
    task = asyncio.ensure_future(_serve_stream(ctx, pod, session, ev, peer_ip))
    setup = ctx.admission.setup_started(STREAM_KIND, task=task)
    task.add_done_callback(lambda done: ctx.admission.setup_done(STREAM_KIND, setup, done))
    return task


async def _serve_stream(ctx: ProxyContext, pod: ServedPod, session: HboneSession,
                        ev: hbone.TunnelRequested, peer_ip: str) -> None:
    # The client is who connected to us, as the TLS session authenticated it; a
    # ``forwarded`` header is text its sender chose (trust rule: README, "Client address").
    src_ip = canonical_ip(peer_ip)
    if ev.forwarded_for is not None and canonical_ip(ev.forwarded_for) != src_ip:
        ctx.metrics.reject("hbone", "forwarded_ignored")
        log_limited(log, ctx.hbone_log_limiter, "hbone:forwarded_ignored", logging.INFO,
                    "hbone: %s at %s claimed forwarded for=%s; using the peer address",
                    session.peer_identity, src_ip, ev.forwarded_for)
    src_workload = ctx.state.workload_by_ip(src_ip)
    dst_workload = ctx.state.workload(pod.info.uid) or pod.workload_stub()
    rec = ConnectionRecord("destination", src_ip, ev.forwarded_port, ev.host, ev.port, src_workload=src_workload,
                           dst_workload=dst_workload, src_identity=session.peer_identity,
                           dst_identity=pod.spiffe_id, mtls=True, route="inbound",
                           service=service_of_endpoint(ctx.state.all_services(), dst_workload, ev.port).fqdn)
    refusal = delivery_refusal(pod, ev.host, ev.port)
    if refusal is not None:
        rec.response_flags, rec.error = FLAG_NO_ROUTE, refusal[1]
        ctx.metrics.reject("hbone", refusal[0])
        # A line a second per reason: any mesh identity can ask for these thousands of times.
        log_limited(log, ctx.hbone_log_limiter, ("hbone:refused", refusal[0]), logging.WARNING,
                    "hbone: %s asked for %s:%d at %s: %s", session.peer_identity, ev.host, ev.port,
                    pod.info.name, refusal[0])
        session.refuse_stream(ev.stream_id, hbone.STATUS_BAD_REQUEST)
        ctx.telemetry.closed(rec)
        return
    decision = authorize(ctx.state.policies_for(dst_workload) if dst_workload else (),
                         ConnectionInfo(src_ip, ev.host, ev.port, session.peer_identity))
    if not decision.allowed:
        rec.response_flags, rec.error = FLAG_DENIED, f"{decision.reason} ({decision.policy or '-'})"
        rec.denied_by = decision.policy or ""
        ctx.metrics.reject("hbone", "policy_denied")
        session.refuse_stream(ev.stream_id, hbone.STATUS_UNAUTHORIZED)
        ctx.telemetry.closed(rec)
        return
    try:
        async with ctx.dial_limits.slot(session.peer_identity):
            with ctx.admission.waiting_on_peer():   # the app's accept: not our delay
                upstream = await connect_app(ctx, pod, ev.host, ev.port, src_ip)
    except (OSError, asyncio.TimeoutError) as exc:
        rec.response_flags, rec.error = FLAG_UPSTREAM_FAILURE, f"{type(exc).__name__}: {exc}"
        ctx.metrics.reject("hbone", "upstream_connect")
        session.refuse_stream(ev.stream_id, hbone.STATUS_UNAVAILABLE)
        ctx.telemetry.closed(rec)
        return
    except asyncio.CancelledError:
        # The peer reset the stream (or the connection went) while we dialled: connect_app
        # closed the half-made socket; nothing reached the app.
        ctx.metrics.reject("hbone", "reset_before_answer")
        raise
    if not session.request_pending(ev.stream_id):
        reset_connection(upstream)  # reset meanwhile: RST, not a FIN the app may never answer
        ctx.metrics.reject("hbone", "reset_before_answer")
        return
    peer = StreamPeer(rec, ctx.telemetry.closed, tcp_is_client=False)
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: peer, upstream)
    except BaseException:
        abort_with_reset(peer.transport) if peer.transport is not None else reset_connection(upstream)
        raise
    if not session.accept_stream(peer, ev.stream_id):
        abort_with_reset(peer.transport)
        ctx.metrics.reject("hbone", "reset_before_answer")
        return
    ctx.telemetry.opened(rec)
    peer.established()


# -- 15006 ------------------------------------------------------------------------------------

def plaintext_verdict(state, pod: ServedPod, workload, src_ip: str, dst_ip: str,
                      dst_port: int) -> tuple[str | None, str]:
    """(refusal reason or None, detail) for plaintext arriving at ``workload``. Pure."""
    if dst_port in PROXY_PORTS:
        return "proxy_port", f"plaintext to the proxy's own port {dst_port}"
    refusal = delivery_refusal(pod, dst_ip, dst_port)
    if refusal is not None:
        return refusal
    if workload.mtls_mode == "STRICT":
        return "strict_mtls", "STRICT mTLS: plaintext from outside the mesh refused"
    decision = authorize(state.policies_for(workload), ConnectionInfo(src_ip, dst_ip, dst_port, None))
    if not decision.allowed:
        return "policy_denied", f"{decision.reason} ({decision.policy or '-'})"
    return None, ""


async def handle_plaintext(ctx: ProxyContext, pod: ServedPod, conn: socket.socket) -> None:
    """One accepted connection on 15006 (steered here by the agent's tc program)."""
    src_ip, src_port = conn.getpeername()[:2]
    dst_ip, dst_port = conn.getsockname()[:2]  # bpf_sk_assign keeps the original destination
    src_ip, dst_ip = canonical_ip(src_ip), canonical_ip(dst_ip)
    if conn.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) in {PROXY_MARK, transparent.DELIVERY_MARK}:
        # Our own upstream connect came back (tcp_fwmark_accept gives accepted sockets
        # the SYN's mark): a capture loop would eat every fd; refuse and say so loudly.
        ctx.metrics.reject("plaintext", "proxy_loop")
        log_limited(log, ctx.hbone_log_limiter, "plaintext:proxy_loop", logging.ERROR,
                    "plaintext: the proxy's own connection %s:%s -> %s:%s was steered back to it",
                    src_ip, src_port, dst_ip, dst_port)
        reset_connection(conn)
        return
    dst_workload = ctx.state.workload(pod.info.uid) or pod.workload_stub()
    rec = ConnectionRecord("destination", src_ip, src_port, dst_ip, dst_port,
                           src_workload=ctx.state.workload_by_ip(src_ip), dst_workload=dst_workload,
                           dst_identity=pod.spiffe_id, route="inbound",
                           service=service_of_endpoint(ctx.state.all_services(), dst_workload, dst_port).fqdn)
    reason, detail = plaintext_verdict(ctx.state, pod, dst_workload, src_ip, dst_ip, dst_port)
    if reason is not None:
        rec.response_flags, rec.error = FLAG_DENIED, detail
        ctx.metrics.reject("plaintext", reason)
        log_limited(log, ctx.hbone_log_limiter, ("plaintext:refused", reason), logging.INFO,
                    "plaintext %s:%s -> %s:%s refused: %s", src_ip, src_port, dst_ip, dst_port, detail)
        reset_connection(conn)
        ctx.telemetry.closed(rec)
        return
    try:
        upstream = await connect_app(ctx, pod, dst_ip, dst_port, src_ip)
    except (OSError, asyncio.TimeoutError) as exc:
        rec.response_flags, rec.error = FLAG_UPSTREAM_FAILURE, f"{type(exc).__name__}: {exc}"
        ctx.metrics.reject("plaintext", "upstream_connect")
        reset_connection(conn)
        ctx.telemetry.closed(rec)
        return
    await join_plain(conn, upstream, rec, ctx.telemetry)

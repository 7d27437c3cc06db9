"""Same-node kernel bypass: a captured connection between two pods this proxy serves is
joined in the kernel (``shoal.datapath.bypass``, ``bpf/sk_skb_bypass.c``) instead of
crossing an HBONE tunnel to ourselves.

What the proxy does for such a connection is exactly what its two halves do for a
tunnelled one, minus the TLS: the outbound half (15001 in the client pod) found a meshed
destination without a waypoint; the destination is a pod we serve (so on this node,
enrolled, its netns ours to enter); both pods' SVIDs are held (the identities a TLS
handshake would have shown, issued for pods this node hosts); the inbound half's
refusals (not an app port of the pod, loopback) and the destination's L4 policy
(``authorize``, with the client pod's SPIFFE ID as principal) are applied; the app is
dialled from the client's IP inside the server pod (``connect_app``). Only then are the
proxy's two sockets joined. The security argument is in the README ("Same-node bypass").

While joined the proxy holds both sockets: it learns EOF and resets from them, forwards a
half-close once the bytes ahead of it are queued, reports both sides' telemetry with the
kernel's byte counts, and re-checks the policy on every config change (a DENY now resets
both apps). The only bytes it reads are those the verdict hands back when a receiver falls
behind (``shoal.datapath.bypass``): it writes them to the other socket once the bytes the
kernel carried before them are there, so TCP flow control reaches the sender as through
any relay, and the kernel carries the direction again once the proxy has caught up.

With ``app_join`` (off by default, README "Same-node bypass"), the proxy also announces its
connection to the server app before dialling it, links both apps' sockets to the joined
pair, and tells the kernel when the bytes the verdict redirected have landed
(``publish_landed``): each direction then switches to the app's sends going straight into
the proxy's socket toward the other app (bpf/sk_msg_join.c). Byte counts then come from
that socket's queue (``KernelBypass.carried``); a reset unlinks the apps first.

Declined (the HBONE path takes the connection, as without the bypass): bypass off, no
pinned bypass maps (no agent yet), an SVID missing. Join refused by the kernel (map full,
socket state): the two sockets are relayed in userspace instead, still inside the node.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Callable

from prometheus_client import Counter

from shoal.agent.ztunnel.authz import ConnectionInfo, authorize
from shoal.agent.ztunnel.context import ProxyContext, ServedPod
from shoal.agent.ztunnel.inbound import connect_app, delivery_refusal
from shoal.agent.ztunnel.relay import join_plain, reset_connection
from shoal.agent.ztunnel.telemetry import (
    FLAG_DENIED,
    FLAG_NO_ROUTE,
    FLAG_RESET,
    FLAG_UPSTREAM_FAILURE,
    ConnectionRecord,
    ConnectionTelemetry,
)
from shoal.datapath.bypass import BypassBroken, BypassUnavailable, JoinedPair, KernelBypass
from shoal.datapath.structs import DIRECT_OFF, DIRECT_ON, DIRECT_RETIRED
from shoal.hbone.session import PipeEnd, abort_with_reset
from shoal.ratelog import LogLimiter, log_limited
from shoal.telemetry_labels import service_of_endpoint
from shoal.xds.model import Workload
from shoal.xds.state import ConfigState

log = logging.getLogger(__name__)

ROUTE = "bypass"
# How often a forwarded half-close checks that the bytes ahead of it are queued: fast at
# first (usually they already are), backing off while a slow reader holds them.
DRAIN_POLL_FIRST, DRAIN_POLL_MAX = 0.0005, 0.05
# A socket that has seen EOF is no longer read (the event loop stops at EOF, and a socket
# in a SOCKHASH reports EOF, not the error, once the FIN came), so a reset arriving
# after it is noticed by looking at its TCP state this often.
RESET_POLL = 0.2
TCP_CLOSE = 7
# How often the bytes of open same-node connections reach istio_tcp_*_bytes (the kernel
# counts them; nothing in the proxy sees them pass). /connections reads them when asked.
LIVE_BYTES_INTERVAL = 2.0
# After a join, when the proxy looks whether the bytes the verdict redirected have landed
# (then a direction can switch to direct sends at its next send); later, every
# LIVE_BYTES_INTERVAL, and after each relay of handed-back bytes.
LANDED_CHECKS = (0.001, 0.005, 0.02, 0.1, 0.5)
APP_DIRECTION_STATES = {DIRECT_ON: "direct", DIRECT_RETIRED: "retired", DIRECT_OFF: "proxy_path"}


class SameNodeBypass:
    """The proxy's bypassed connections and its handle on the agent's pinned maps
    (opened on first use: the agent may start after us)."""

    def __init__(self, pin_dir: Path, state: ConfigState, telemetry: ConnectionTelemetry, registry,
                 app_join: bool = False):
        self.pin_dir = Path(pin_dir)
        self.app_join = app_join
        self.state = state
        self.telemetry = telemetry
        self.live: set[BypassedConnection | RelayedConnection] = set()
        self._kernel: KernelBypass | None = None
        self._warned = False
        # Per-connection lines (a full pair map refuses every join of a burst; a policy
        # change revokes every live connection it denies): a line a second per kind.
        self.log_limiter = LogLimiter()
        self.outcomes = Counter("shoal_proxy_bypass_connections",
                                "Same-node connections by what the bypass did: joined in the kernel, relayed "
                                "in userspace (the kernel refused the join), declined (HBONE instead), "
                                "revoked (a policy change denied it), broken (reset: bytes not redirectable)",
                                ["outcome"], registry=registry)
        self.handed_back_bytes = Counter("shoal_proxy_bypass_handed_back_bytes",
                                         "Bytes of joined same-node connections the kernel handed back to the "
                                         "proxy (a receiver fell behind by the high-water mark) and the proxy "
                                         "relayed", registry=registry)
        self.app_directions = Counter("shoal_proxy_bypass_app_directions",
                                      "Directions of ended same-node connections by how the app join left "
                                      "them: direct (the app's sends went straight to the proxy's socket "
                                      "toward the other app), retired (switched, then back to the proxy's "
                                      "path), proxy_path (never switched)", ["state"], registry=registry)
        self.app_direct_bytes = Counter("shoal_proxy_bypass_app_direct_bytes",
                                        "Bytes the apps of same-node connections sent straight to the proxy's "
                                        "socket toward the other app (as asked by their sends)", registry=registry)
        self._unsubscribe: Callable[[], None] | None = state.subscribe(lambda _delta: self.recheck())
        self._counting: asyncio.Task | None = None
        if app_join:
            # Opened now, not at the first same-node connection: opening turns on sockops'
            # insertion of app sockets, which must precede the apps' connect()s.
            self.kernel()

    def track(self, conn: "BypassedConnection | RelayedConnection") -> None:
        """``conn`` is live: re-checked on config changes, its bytes counted while open."""
        self.live.add(conn)
        if self._counting is None or self._counting.done():
            self._counting = asyncio.ensure_future(self._count_while_live())

    async def _count_while_live(self) -> None:
        while self.live:
            await asyncio.sleep(LIVE_BYTES_INTERVAL)
            self.count_live_bytes()

    def count_live_bytes(self) -> None:
        """Brings every open same-node connection's records (and istio_tcp_*_bytes) up to
        the bytes carried so far."""
        for conn in list(self.live):
            conn.count_bytes()
            for record in (conn.source, conn.dest):
                self.telemetry.progress(record)

    def kernel(self) -> KernelBypass | None:
        if self._kernel is None:
            try:
                self._kernel = KernelBypass(self.pin_dir, app_join=self.app_join)
            except BypassUnavailable as exc:
                if not self._warned:
                    log.warning("same-node bypass unavailable (%s): same-node connections use HBONE", exc)
                    self._warned = True
                return None
            log.info("same-node bypass: kernel maps at %s", self.pin_dir)
            if self.app_join and not self._kernel.app_join:
                log.warning("same-node app join unavailable (%s): the proxy's sockets only", self._kernel.app_join_error)
        return self._kernel

    def recheck(self) -> None:
        """Re-evaluate every live same-node connection (joined or relayed) against the
        config now in force; reset the ones it would refuse (both apps see a reset, as a
        refused connection)."""
        for conn in list(self.live):
            refusal = self.refusal(conn.source.dst_ip, conn.dst_uid, conn.dst_workload, conn.info)
            if refusal is not None:
                error, policy = refusal
                self.outcomes.labels("revoked").inc()
                log_limited(log, self.log_limiter, "revoked", logging.INFO, "bypass %s -> %s:%d: now refused (%s): reset",
                            conn.info.src_identity, conn.info.dst_ip, conn.info.dst_port, error)
                conn.revoke(error, policy)

    def refusal(self, dialled_ip: str, dst_uid: str, dst_workload: Workload,
                info: ConnectionInfo) -> tuple[str, str] | None:
        """Why the config now in force would not let this connection go around a tunnel
        (error, denying policy), or None: the destination's L4 policy denies it, or the
        destination (the service dialled, or the pod) is now behind a waypoint, whose L7
        policy a same-node pair would skip."""
        service = self.state.service_by_vip(dialled_ip)
        workload = self.state.workload(dst_uid) or dst_workload
        waypoint = service.waypoint if service is not None else workload.waypoint
        if waypoint is not None:
            return f"destination now behind waypoint {waypoint.namespace}/{waypoint.name}", ""
        decision = authorize(self.state.policies_for(workload), info)
        if not decision.allowed:
            return f"{decision.reason} ({decision.policy or '-'})", decision.policy or ""
        return None

    def release_pod(self, uid: str) -> None:
        """A pod leaves this proxy: its bypassed connections (either end) are reset, as its
        tunnels are closed (their sockets would keep its namespace alive)."""
        for conn in list(self.live):
            if uid in (conn.src_uid, conn.dst_uid):
                conn.reset("pod released")

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for conn in list(self.live):
            conn.reset("proxy stopped")
        if self._counting is not None:
            self._counting.cancel()
            self._counting = None
        if self._kernel is not None:
            self._kernel.disable_app_join()
            self._kernel.close()
            self._kernel = None


def local_destination(ctx: ProxyContext, workload: Workload | None) -> ServedPod | None:
    """The pod we serve that ``workload`` is, if any (then it is on this node)."""
    return ctx.served_pods.get(workload.uid) if workload is not None else None


async def serve_same_node(ctx: ProxyContext, pod: ServedPod, conn: socket.socket, dst_ip: str, dst_port: int,
                          dst_pod: ServedPod, rec: ConnectionRecord) -> bool:
    """Serves an outbound connection whose destination pod ``dst_pod`` we serve too;
    False when the bypass declines it (the caller tunnels it as usual)."""
    bypass: SameNodeBypass | None = ctx.bypass
    if bypass is None:
        return False
    kernel = bypass.kernel()
    if kernel is None or ctx.identities.current(pod.spiffe_id) is None \
            or ctx.identities.current(dst_pod.spiffe_id) is None:
        bypass.outcomes.labels("declined").inc()
        return False
    src_ip = rec.src_ip
    dst_workload = ctx.state.workload(dst_pod.info.uid) or dst_pod.workload_stub()
    rec.src_identity, rec.dst_identity, rec.mtls, rec.route = pod.spiffe_id, dst_pod.spiffe_id, True, ROUTE
    dest = ConnectionRecord("destination", src_ip, rec.src_port, dst_ip, dst_port, src_workload=rec.src_workload,
                            dst_workload=dst_workload, src_identity=pod.spiffe_id, dst_identity=dst_pod.spiffe_id,
                            mtls=True, route=ROUTE,
                            service=service_of_endpoint(ctx.state.all_services(), dst_workload, dst_port).fqdn)
    refusal = delivery_refusal(dst_pod, dst_ip, dst_port)
    info = ConnectionInfo(src_ip, dst_ip, dst_port, pod.spiffe_id)
    decision = authorize(ctx.state.policies_for(dst_workload), info) if refusal is None else None
    if refusal is not None or decision is not None and not decision.allowed:
        if refusal is not None:
            flags, error, policy, reason = FLAG_NO_ROUTE, refusal[1], "", refusal[0]
        else:
            assert decision is not None
            flags, error, policy = FLAG_DENIED, f"{decision.reason} ({decision.policy or '-'})", decision.policy or ""
            reason = "policy_denied"
        ctx.metrics.reject(ROUTE, reason)
        _refuse(ctx, conn, (rec, dest), flags, error, policy)
        return True
    # The server app's socket enters app_socks at its accept (sockops) only if announced:
    # from the address connect_app dials from (the client's, or loopback for a hairpin).
    dial_from = src_ip if not dst_pod.owns(src_ip) else ("::1" if ":" in dst_ip else "127.0.0.1")
    expected = kernel.expect_server_app(dst_ip, dst_port, dial_from)
    try:
        async with ctx.dial_limits.slot(pod.spiffe_id):
            upstream = await connect_app(ctx, dst_pod, dst_ip, dst_port, src_ip)
    except (OSError, asyncio.TimeoutError) as exc:
        ctx.metrics.reject(ROUTE, "upstream_connect")
        _refuse(ctx, conn, (rec, dest), FLAG_UPSTREAM_FAILURE, f"{type(exc).__name__}: {exc}", "")
        return True
    finally:
        kernel.forget_expected(expected)
    # The config may have changed while the app was dialled (a DENY pushed then found no
    # live connection to reset): decided again, and nothing is awaited from here until the
    # connection is in ``bypass.live``, where every later change re-checks it.
    refusal = bypass.refusal(rec.dst_ip, dst_pod.info.uid, dst_workload, info)
    if refusal is not None:
        ctx.metrics.reject(ROUTE, "policy_denied")
        reset_connection(upstream)
        _refuse(ctx, conn, (rec, dest), FLAG_DENIED, *refusal)
        return True
    uids = (pod.info.uid, dst_pod.info.uid)
    try:
        pair = kernel.join(conn, upstream)
    except BypassUnavailable as exc:
        bypass.outcomes.labels("relayed").inc()
        log_limited(log, bypass.log_limiter, "relayed", logging.INFO,
                    "bypass %s -> %s:%d: kernel join refused (%s): relayed in userspace", pod.info.name, dst_ip,
                    dst_port, exc)
        await RelayedConnection(bypass, rec, dest, uids, dst_workload, info).relay(conn, upstream)
        return True
    except BypassBroken as exc:
        bypass.outcomes.labels("broken").inc()
        ctx.metrics.reject(ROUTE, "unredirected")
        reset_connection(upstream)
        _refuse(ctx, conn, (rec, dest), FLAG_RESET, str(exc), "")
        return True
    bypass.outcomes.labels("joined").inc()
    try:
        kernel.link_apps(pair)
    except OSError as exc:   # the apps' sends keep taking the proxy's path: still exact
        kernel.unlink_apps(pair)
        log_limited(log, bypass.log_limiter, "unlinked", logging.INFO, "bypass %s -> %s:%d: apps not linked (%s)",
                    pod.info.name, dst_ip, dst_port, exc)
    await BypassedConnection(bypass, kernel, pair, rec, dest, uids, dst_workload, info).wire()
    return True


def _refuse(ctx: ProxyContext, conn: socket.socket, records, flags: str, error: str, policy: str) -> None:
    reset_connection(conn)   # the app sees a reset, like a refused connection
    for record in records:
        record.response_flags, record.error, record.denied_by = flags, error, policy
        ctx.telemetry.closed(record)


class RelayedConnection:
    """A same-node connection the kernel would not join, relayed by the proxy in
    userspace: reported by both reporters (the relay fills the source record, the
    destination record reports the same connection) and re-checked on every config change
    like a joined pair."""

    def __init__(self, owner: SameNodeBypass, source: ConnectionRecord, dest: ConnectionRecord,
                 uids: tuple[str, str], dst_workload: Workload, info: ConnectionInfo):
        self.owner, self.source, self.dest = owner, source, dest
        self.src_uid, self.dst_uid = uids
        self.dst_workload, self.info = dst_workload, info
        self.ends: tuple[PipeEnd, PipeEnd] | None = None
        self.ended: str | None = None   # why it was reset before its ends were wired

    async def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        self.owner.track(self)
        self.ends = await join_plain(client, upstream, self.source, self)
        if self.ended is not None:
            self._abort()

    def opened(self, rec: ConnectionRecord) -> None:
        self.owner.telemetry.opened(rec)
        self.owner.telemetry.opened(self.dest)

    def count_bytes(self) -> None:
        """The relay counts into the source record as bytes pass; the destination's follows."""
        self.dest.bytes_in, self.dest.bytes_out = self.source.bytes_in, self.source.bytes_out

    def closed(self, rec: ConnectionRecord) -> None:
        self.owner.live.discard(self)
        self.dest.bytes_in, self.dest.bytes_out = rec.bytes_in, rec.bytes_out
        self.dest.response_flags, self.dest.error = rec.response_flags, rec.error
        self.dest.denied_by = rec.denied_by
        self.owner.telemetry.closed(rec)
        self.owner.telemetry.closed(self.dest)

    def revoke(self, error: str, policy: str) -> None:
        self.source.response_flags, self.source.denied_by = FLAG_DENIED, policy
        self.reset(f"policy changed: {error}")

    def reset(self, error: str) -> None:
        """Both apps get a RST at once."""
        self.source.reset(error)
        self.ended = error
        self._abort()

    def _abort(self) -> None:
        for end in self.ends or ():
            if end.transport is not None and not end.transport.is_closing():
                abort_with_reset(end.transport)


class BypassedConnection:
    """One joined pair: the proxy watches both sockets for EOF and resets and reports the
    connection once both are done."""

    def __init__(self, owner: SameNodeBypass, kernel: KernelBypass, pair: JoinedPair, source: ConnectionRecord,
                 dest: ConnectionRecord, uids: tuple[str, str], dst_workload: Workload, info: ConnectionInfo):
        self.owner, self.kernel, self.pair = owner, kernel, pair
        self.source, self.dest = source, dest
        self.src_uid, self.dst_uid = uids
        self.dst_workload, self.info = dst_workload, info
        self.client_end = _End(self, toward_server=True)
        self.server_end = _End(self, toward_server=False)
        self.finished = False
        self.wired = False

    async def wire(self) -> None:
        """Watch both sockets. An EOF may arrive on the first before the second is watched
        (a client that writes and half-closes at once): it is forwarded once both are."""
        loop = asyncio.get_running_loop()
        self.owner.track(self)
        for record in (self.source, self.dest):
            self.owner.telemetry.opened(record)
        await loop.connect_accepted_socket(lambda: self.client_end, self.pair.client)
        await loop.connect_accepted_socket(lambda: self.server_end, self.pair.server)
        self.wired = True
        for end in (self.client_end, self.server_end):
            end.start_forwarding()
        if self.kernel.app_join:
            asyncio.ensure_future(self._publish_landed_soon())

    async def _publish_landed_soon(self) -> None:
        """Right after the join the bytes the verdict redirected (a request sent before the
        server was dialled) land within microseconds: tell the apps' program soon, so a
        direction switches at its next send; later checks ride on LIVE_BYTES_INTERVAL."""
        for delay in LANDED_CHECKS:
            await asyncio.sleep(delay)
            if self.finished:
                return
            self.publish_landed()

    def publish_landed(self) -> None:
        try:
            self.kernel.publish_landed(self.pair)
        except OSError as exc:   # closing: nothing switches any more
            log.debug("bypass: landed bytes not published: %s", exc)

    def take_counts(self):
        """Both records take the bytes carried so far (the verdict program's counts, or
        what is queued on the proxy's sockets when the apps send there directly); the
        verdict's counts, or None if unreadable."""
        try:
            counts = self.kernel.counts(self.pair)
            carried = self.kernel.carried(self.pair)
        except OSError as exc:
            log.debug("bypass: pair counters unreadable: %s", exc)
            return None
        for record in (self.source, self.dest):   # never less: an evicted entry reads as zero
            record.bytes_in = max(record.bytes_in, carried[0])
            record.bytes_out = max(record.bytes_out, carried[1])
        return counts

    def count_bytes(self) -> None:
        """``take_counts``; a pair whose bytes the kernel could not carry is reset."""
        counts = self.take_counts()
        if counts is None:
            return
        if counts.unredirected and not self.finished:   # dropped past every window: nobody reads them
            self.broken(f"the kernel could not carry {counts.unredirected} skbs")
            return
        if self.kernel.app_join and not self.finished:
            self.publish_landed()

    def other(self, end: "_End") -> "_End":
        return self.server_end if end is self.client_end else self.client_end

    def broken(self, error: str) -> None:
        """The kernel could not carry the pair's bytes (some are lost): both apps are reset
        rather than left waiting for them."""
        self.owner.outcomes.labels("broken").inc()
        log_limited(log, self.owner.log_limiter, "broken", logging.WARNING, "bypass %s -> %s:%d: %s: resetting the pair",
                    self.info.src_identity, self.info.dst_ip, self.info.dst_port, error)
        self.reset(error)

    def kernel_error(self) -> bool:
        """Whether the kernel reported an error on either socket, and then ends the pair.

        Once a socket's EOF is read the event loop stops reading it, so an error set on it
        later would go unseen: the psock's EPIPE when it could not send bytes redirected to
        that socket (it drops them and every later one), or a reset from its app. Reading
        SO_ERROR clears it: it is acted on here, at once."""
        for name, sock in (("client", self.pair.client), ("server", self.pair.server)):
            try:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                continue   # closed: its own callbacks end the pair
            if error == errno.EPIPE:   # the proxy never writes to it: only the psock breaks its pipe
                self.broken(f"the kernel broke the redirect into the {name} side ({os.strerror(error)})")
                return True
            if error:
                self.reset(f"{name} side: {os.strerror(error)}")
                return True
        return False

    def revoke(self, error: str, policy: str) -> None:
        for record in (self.source, self.dest):
            record.response_flags, record.denied_by = FLAG_DENIED, policy
        self.reset(f"policy changed: {error}")

    def reset(self, error: str) -> None:
        """Both apps get a RST at once (their sockets unlinked first: a send now takes the
        proxy's path, into a socket being reset)."""
        if not self.finished:
            try:
                self.kernel.unlink_apps(self.pair)
            except OSError as exc:
                log.debug("bypass: apps not unlinked: %s", exc)
            self.take_counts()
        for record in (self.source, self.dest):
            record.reset(error)
        for end in (self.client_end, self.server_end):
            if end.transport is not None and not end.transport.is_closing():
                abort_with_reset(end.transport)
        self.finish()

    def _count_directions(self) -> None:
        try:
            directions = self.kernel.direct(self.pair)
        except OSError as exc:
            log.debug("bypass: app join state unreadable: %s", exc)
            return
        for direction in directions:
            self.owner.app_directions.labels(APP_DIRECTION_STATES.get(direction.state, "proxy_path")).inc()
            self.owner.app_direct_bytes.inc(direction.bytes)

    def maybe_close(self) -> None:
        """Both directions ended (EOF forwarded both ways): close both sockets."""
        if self.client_end.eof_forwarded and self.server_end.eof_forwarded:
            self.take_counts()   # while both sockets are open
            for end in (self.client_end, self.server_end):
                if end.transport is not None:
                    end.transport.close()
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.owner.live.discard(self)
        if self.kernel.app_join:
            self._count_directions()
        try:
            carried = self.kernel.carried(self.pair)
            self.kernel.release(self.pair)
        except OSError as exc:
            log.warning("bypass: pair counters unreadable: %s", exc)
        else:
            for record in (self.source, self.dest):
                record.bytes_in = max(record.bytes_in, carried[0])
                record.bytes_out = max(record.bytes_out, carried[1])
        for record in (self.source, self.dest):
            self.owner.telemetry.closed(record)


class _End(asyncio.Protocol):
    """One of the proxy's two joined sockets. It never carries data to us: every byte is
    redirected by the kernel; what we see is EOF, a reset, or (never expected) bytes the
    kernel could not redirect, which end the pair."""

    def __init__(self, conn: BypassedConnection, toward_server: bool):
        self.conn = conn
        self.toward_server = toward_server   # this socket's bytes go to the server app
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.eof_forwarded = False
        self._forwarding: asyncio.Task | None = None
        self.handed_back: list[bytes] = []   # read, not yet written to the other side
        self._relaying: asyncio.Task | None = None
        self._flushed = asyncio.Event()
        self._flushed.set()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=0)   # relayed bytes: know when they are all in the kernel
        if self.conn.finished:   # reset while the other end was being wired
            abort_with_reset(transport)

    def data_received(self, data: bytes) -> None:
        """Bytes on a joined socket: handed back by the verdict (the other side was past
        the high-water mark). Anything else (bytes it could not redirect, an evicted pair
        entry, more bytes than it handed back) ends the pair: relaying those could put them
        ahead of bytes still in the kernel's queue."""
        pair = self.conn.pair
        relayed = pair.relayed_to_server if self.toward_server else pair.relayed_to_client
        read = relayed + sum(map(len, self.handed_back)) + len(data)
        try:
            handed_back = self.conn.kernel.handed_back(pair, self.toward_server)
        except OSError as exc:
            self.conn.broken(f"pair counters unreadable with {len(data)} bytes read: {exc}")
            return
        if handed_back is None or read > handed_back:
            self.conn.broken(f"{len(data)} bytes were not redirected by the kernel")
            return
        self.handed_back.append(data)
        if self.transport is not None:
            self.transport.pause_reading()   # held until relayed: TCP pushes back meanwhile
        if self._relaying is None or self._relaying.done():
            self._relaying = asyncio.ensure_future(self._relay_handed_back())

    async def _relay_handed_back(self) -> None:
        """Write the handed-back bytes to the other app once every byte the kernel carried
        before them is on its socket, report them when they are all in its send queue (the
        verdict then redirects again), and read on."""
        other = self.conn.other(self)
        while not self.conn.wired and not self.conn.finished:   # bytes handed back during wire()
            await asyncio.sleep(DRAIN_POLL_FIRST)
        while self.handed_back and not self.conn.finished:
            if not await self._until_drained():
                return
            if other.transport is None or other.transport.is_closing():
                return
            data = b"".join(self.handed_back)
            self.handed_back.clear()
            other.transport.write(data)
            self.conn.owner.handed_back_bytes.inc(len(data))
            await other.flushed()
            if self.conn.finished:
                return
            try:
                self.conn.kernel.relayed(self.conn.pair, self.toward_server, len(data))
            except OSError as exc:   # the verdict keeps handing back: still exact, only slower
                log.warning("bypass: relayed bytes not recorded (%s): the proxy relays this direction", exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._flushed.clear()

    def resume_writing(self) -> None:
        self._flushed.set()

    async def flushed(self) -> None:
        """Until everything written to this socket is in its kernel send queue (the write
        buffer limits are 0: any byte left in userspace pauses writing)."""
        while not self._flushed.is_set() and not self.conn.finished:
            try:
                await asyncio.wait_for(self._flushed.wait(), RESET_POLL)
            except asyncio.TimeoutError:
                continue

    def eof_received(self) -> bool:
        self.eof = True
        self.start_forwarding()
        return True   # keep our write side: the other direction may still flow

    def start_forwarding(self) -> None:
        if self.eof and self.conn.wired and self._forwarding is None and not self.conn.finished:
            self._forwarding = asyncio.ensure_future(self._forward_eof())

    async def _until_drained(self) -> bool:
        """Until every byte carried toward the other side (redirected by the kernel, or
        relayed by us) is queued on its socket (the redirect completes on a kernel
        workqueue); False if the pair ended meanwhile."""
        delay = DRAIN_POLL_FIRST
        while not self.conn.finished:
            if self.conn.kernel_error():
                return False   # the bytes it waits for are lost: the pair was reset
            try:
                if self.conn.kernel.drained(self.conn.pair, self.toward_server):
                    return True
            except OSError:
                return False   # the other socket is gone: its own callbacks end the pair
            await asyncio.sleep(delay)
            delay = min(delay * 2, DRAIN_POLL_MAX)
        return False

    async def _relay_rest(self) -> bool:
        """Every byte handed back before the FIN relayed. EOF can be read while some still
        wait in the psock's queue (behind bytes redirected toward this socket's app, not
        read yet): the event loop no longer reads after EOF, so they are read here."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        delay = DRAIN_POLL_FIRST
        while not self.conn.finished and sock is not None:
            if self._relaying is not None:
                await asyncio.shield(self._relaying)
            pair = self.conn.pair
            try:
                handed_back = self.conn.kernel.handed_back(pair, self.toward_server)
            except OSError as exc:
                self.conn.broken(f"pair counters unreadable after EOF: {exc}")
                return False
            relayed = pair.relayed_to_server if self.toward_server else pair.relayed_to_client
            if handed_back is None:
                self.conn.broken("the kernel could not carry some bytes before the FIN")
                return False
            missing = handed_back - relayed - sum(map(len, self.handed_back))
            if missing <= 0:
                return True
            try:
                data = os.read(sock.fileno(), missing)
            except BlockingIOError:
                data = b""
            except OSError:
                return False   # closed or reset: its callbacks end the pair
            if data:
                self.handed_back.append(data)
                self._relaying = asyncio.ensure_future(self._relay_handed_back())
                delay = DRAIN_POLL_FIRST
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, DRAIN_POLL_MAX)
        return False

    async def _forward_eof(self) -> None:
        """Half-close the other app's connection once every byte ahead of the FIN is queued
        on its socket."""
        other = self.conn.other(self)
        if not await self._relay_rest():
            return
        if not await self._until_drained():
            return
        if self.conn.finished or other.transport is None or other.transport.is_closing():
            return
        try:   # every byte of the direction is on the other socket: its count is final
            self.conn.kernel.freeze(self.conn.pair, self.toward_server)
        except OSError as exc:
            log.debug("bypass: count not frozen: %s", exc)
        other.transport.write_eof()
        self.eof_forwarded = True
        self.conn.maybe_close()
        await self._watch_for_reset()

    async def _watch_for_reset(self) -> None:
        """Until the pair ends: a reset of this (half-closed) socket resets the other app,
        and so does an error the kernel sets on either socket (``kernel_error``). The pair
        may end (and close this socket) during a sleep: looked at after each."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        while sock is not None:
            await asyncio.sleep(RESET_POLL)
            if self.conn.finished or self.transport is None or self.transport.is_closing():
                return
            if self.conn.kernel_error():
                return
            try:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            except OSError:
                return
            if state == TCP_CLOSE and not self.conn.finished:
                self.conn.reset("connection reset by peer after half-close")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.finished:
            return
        if exc is not None or not self.eof_forwarded:
            # a reset (or a close before both directions ended): the other app is reset too
            self.conn.reset(str(exc) if exc else "closed")

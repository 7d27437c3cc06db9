"""Enrolled pods and their in-pod listeners; the context every handler reads.

:class:`PodRegistry` is the ZDS handler (contract B): on ``add`` it enters the pod's
namespace, opens 15001/15006/15008 there with SO_REUSEPORT (so a successor proxy can
bind beside us during a restart) and acks only then; on ``del`` it stops accepting
(live connections finish on their own).
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import struct
from typing import Awaitable, Callable

from shoal.agent.ztunnel import transparent
from shoal.agent.ztunnel.admission import Admission, Setup
from shoal.agent.ztunnel.context import ProxyContext, ServedPod
from shoal.agent.ztunnel.inbound import handle_hbone, handle_plaintext, refused_at_accept
from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.agent.ztunnel.outbound import handle_outbound
from shoal.agent.ztunnel.relay import RESOURCE_ERRNOS, is_network_failure, reset_connection
from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND
from shoal.hbone.gatekeeper import ACCEPTS_PER_WAKEUP
from shoal.hbone.identity import IdentityError
from shoal.ratelog import log_limited
from shoal.zds import PodInfo, ZdsError

log = logging.getLogger(__name__)


# accept() failures that say "no resources now" (relay.RESOURCE_ERRNOS): the listener
# stays readable, so retrying at once would spin the loop at 100 % CPU; pause this
# listener for ACCEPT_PAUSE instead.
ACCEPT_PAUSE = 0.1
# A burst of new connections queues in the kernel instead of costing SYN retransmits
# (1 s, then 3 s); the kernel caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096
# struct tcp_info (linux/tcp.h): tcpi_unacked is, on a listening socket, the length of its
# accept queue; tcpi_last_data_sent is, on a socket the proxy has not written to yet,
# the milliseconds since its handshake completed (the kernel stamps it then).
TCP_INFO_LEN = 104
TCPI_UNACKED, TCPI_LAST_DATA_SENT = struct.Struct("=24xI"), struct.Struct("=44xI")


def accept_queue_age(conn: socket.socket) -> float:
    """Seconds ``conn`` (just accepted) waited in the accept queue since its handshake."""
    try:
        info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except OSError:
        return 0.0
    return TCPI_LAST_DATA_SENT.unpack_from(info)[0] / 1000.0


def accept_queue_length(listener: socket.socket) -> int:
    """Connections waiting in ``listener``'s accept queue."""
    try:
        return TCPI_UNACKED.unpack_from(listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN))[0]
    except OSError:
        return 0


class Acceptor:
    """Accepts on one listening socket and hands each raw connection to a handler task.

    Raw sockets (not asyncio servers) so nothing is read before the handler decides
    where the bytes go: the kernel keeps them until the connection is wired up.
    Admission first: while too many connections are in setup, this listener stops
    accepting (the kernel queues the burst); past the open-file budget, or when it waited
    too long in the accept queue of an overloaded kind, a new connection is reset at once
    and counted. Each setup's own wait (accept queue + setup, less what it waited on a
    peer) feeds the delay controller.
    ``screen`` (the client's address -> a refusal reason, or None) refuses a connection
    before any of that, for the cost of the accept alone: a source in the penalty box that
    reconnects in a loop is refused thousands of times a second.
    """

    def __init__(self, listener: socket.socket, handler: Callable[[socket.socket], Awaitable[None]],
                 name: str, on_error: Callable[[BaseException], None], admission: Admission,
                 on_shed: Callable[[str, str], None], on_pause: Callable[[str], None] = lambda name: None,
                 screen: Callable[[tuple], str | None] | None = None):
        self.listener, self.handler, self.name = listener, handler, name
        self._screen = screen
        self._on_error = on_error
        self._admission = admission
        self._on_shed = on_shed
        self._on_pause = on_pause
        self._tasks: set[asyncio.Task] = set()  # handlers still setting a connection up
        self._resume: asyncio.TimerHandle | None = None
        self._reading = True
        self.serving = True
        admission.add_queue(name, self.queued)
        asyncio.get_running_loop().add_reader(listener.fileno(), self._on_readable)

    def queued(self) -> int:
        return accept_queue_length(self.listener) if self.serving else 0

    def _on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if not self.serving:
                return
            if self._admission.full(self.name):
                self._stop_reading()
                self._admission.wait_for_room(self.name, self._start_reading)
                self._on_pause(self.name)
                return
            try:
                conn, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                self._admission.queue_empty(self.name)
                return
            except OSError as exc:
                self._on_error(exc)
                if exc.errno in RESOURCE_ERRNOS:
                    self._stop_reading()
                    self._resume = asyncio.get_running_loop().call_later(ACCEPT_PAUSE, self._unpause)
                return
            refusal = self._screen(address) if self._screen is not None else None
            if refusal is not None:
                reset_connection(conn)
                self._on_shed(self.name, refusal)
                continue
            age = accept_queue_age(conn)
            refusal = self._admission.admit(self.name, age)
            if refusal is not None:
                reset_connection(conn)
                self._on_shed(self.name, refusal)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self._run(conn))
            setup = self._admission.setup_started(self.name, age, task)
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._setup_done, setup))

    def _setup_done(self, setup: Setup, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._admission.setup_done(self.name, setup, task)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self.listener.fileno())

    def _start_reading(self) -> None:
        if self.serving and not self._reading:
            self._reading = True
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._on_readable)

    def _unpause(self) -> None:
        self._resume = None
        self._start_reading()

    @property
    def in_setup(self) -> int:
        return len(self._tasks)

    async def _run(self, conn: socket.socket) -> None:
        try:
            await self.handler(conn)
        except (OSError, asyncio.TimeoutError) as exc:
            self._on_error(exc)
            conn.close()
        except Exception as exc:   # noqa: BLE001 - a bug on one connection's path: logged with its traceback
            self._on_error(exc)    # and counted (on_error), the app told at once, the listener serving on
            reset_connection(conn)

    def close(self) -> None:
        """Stop accepting. Live connections carry on; queued ones migrate to a successor's
        SO_REUSEPORT listener (tcp_migrate_req) instead of being reset."""
        if self.serving:
            self.serving = False
            if self._resume is not None:
                self._resume.cancel()
            self._stop_reading()
            self._admission.remove_queue(self.name, self.queued)
            self.listener.close()


LISTENER_KINDS = ("outbound", "plaintext", "hbone")  # the names listener_plan gives
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
ANY_ADDRESS = {4: "0.0.0.0", 6: "::"}


def listener_plan(pod_ips: tuple[str, ...]) -> list[tuple[str, int, bool, Callable, str]]:
    """The in-pod listeners: (host, port, any-address/transparent, handler, name).

    Outbound on loopback: connect4/connect6 redirect IPv4 (and IPv4-mapped) destinations
    to 127.0.0.1:15001, always, and native IPv6 ones to [::1]:15001, which exists when the
    pod has IPv6 at all. Inbound 15006/15008 once per family the pod has an address in,
    each socket of one family (IPv6 ones are V6ONLY), so the tc program's listener lookup
    for a packet of one family finds exactly the listener of that family."""
    versions = sorted({ipaddress.ip_address(a).version for a in pod_ips})
    plan = [(LOOPBACK[v], PORT_OUTBOUND, False, handle_outbound, "outbound") for v in sorted({4, *versions})]
    for v in versions:
        plan += [(ANY_ADDRESS[v], PORT_INBOUND_PLAINTEXT, True, handle_plaintext, "plaintext"),
                 (ANY_ADDRESS[v], PORT_HBONE, True, handle_hbone, "hbone")]
    return plan


class PodRegistry:
    """The pods this proxy serves (the ZDS handler).

    ``prepares_netns``: set each pod's namespace up for delivery (and undo it on release).
    Workers of a supervised proxy do not: the namespace is the pod's, not a worker's, so
    their supervisor does it once (two workers racing on the same rules would fail)."""

    def __init__(self, ctx: ProxyContext, prepares_netns: bool = True):
        self.ctx = ctx
        self.prepares_netns = prepares_netns
        self.pods: dict[str, ServedPod] = {}
        self.snapshot_done = asyncio.Event()

    async def add_pod(self, pod: PodInfo, netns_fd: int) -> None:
        current = self.pods.get(pod.uid)
        netns = NetnsHandle(netns_fd, self.ctx.home.fd)
        if current is not None:
            if current.netns.inode == netns.inode and current.info == pod:
                netns.close()  # a replay after reconnect: already serving it
                return
            await self.remove_pod(pod.uid)
        try:
            enrolled = await self._enroll(pod, netns)
        except BaseException:
            netns.close()
            raise
        self.pods[pod.uid] = enrolled
        self.ctx.metrics.pods.set(len(self.pods))
        log.info("enrolled %s/%s (%s) as %s", pod.namespace, pod.name, pod.ip, enrolled.spiffe_id)

    async def _enroll(self, pod: PodInfo, netns: NetnsHandle) -> ServedPod:
        try:
            spiffe = await self.ctx.identities.acquire(pod.namespace, pod.service_account)
        except IdentityError as exc:
            raise ZdsError(str(exc)) from exc
        enrolled = ServedPod(pod, netns, spiffe)
        problem = transparent.prepare_pod_netns(netns, pod) if self.prepares_netns else None
        if problem is not None:
            self.ctx.identities.release(pod.namespace, pod.service_account)
            raise ZdsError(problem)
        try:
            for host, port, any_address, handler, name in listener_plan(pod.ips):
                sock = netns.listener(host, port, transparent=any_address, backlog=LISTEN_BACKLOG)
                enrolled.servers.append(Acceptor(
                    sock, functools.partial(handler, self.ctx, enrolled), name,
                    on_error=functools.partial(self._handler_failed, name), admission=self.ctx.admission,
                    on_shed=self.ctx.metrics.reject,
                    on_pause=lambda listener: self.ctx.metrics.accept_paused.labels(listener).inc(),
                    screen=functools.partial(refused_at_accept, self.ctx) if name == "hbone" else None))
        except OSError:
            enrolled.stop_accepting()
            if self.prepares_netns:
                transparent.remove(netns, pod.ips)
            self.ctx.identities.release(pod.namespace, pod.service_account)
            raise
        return enrolled

    def _handler_failed(self, listener: str, exc: BaseException) -> None:
        """A connection's handler (or accept) failed: counted; a line a second per listener
        and error type, with the traceback when it is no network failure (a bug of ours,
        which the next line must let us diagnose)."""
        self.ctx.metrics.reject(listener, "internal_error")
        unexpected = not is_network_failure(exc)
        log_limited(log, self.ctx.hbone_log_limiter, ("handler_failed", listener, type(exc).__name__),
                    logging.ERROR if unexpected else logging.WARNING, "%s: %s: %s", listener, type(exc).__name__,
                    exc, exc_info=exc if unexpected else None)

    async def remove_pod(self, uid: str) -> None:
        enrolled = self.pods.pop(uid, None)
        if enrolled is None:
            raise ZdsError(f"unknown pod {uid}")
        enrolled.stop_accepting()
        # Its inbound tunnels go too: each socket keeps the pod's network namespace (and its
        # veth, with the pod's IP) alive, so a new pod given that IP would see its traffic
        # land in the dead pod's namespace.
        for session in list(enrolled.sessions):
            session.close()
        if self.ctx.bypass is not None:   # and the same-node connections it is an end of
            self.ctx.bypass.release_pod(uid)
        if self.prepares_netns:
            transparent.remove(enrolled.netns, enrolled.info.ips)
        enrolled.netns.close()
        self.ctx.identities.release(enrolled.info.namespace, enrolled.info.service_account)
        self.ctx.metrics.pods.set(len(self.pods))
        log.info("released %s/%s", enrolled.info.namespace, enrolled.info.name)

    async def snapshot_complete(self) -> None:
        self.snapshot_done.set()
        log.info("agent snapshot complete: serving %d pods", len(self.pods))

    def stop_accepting(self) -> None:
        for enrolled in self.pods.values():
            enrolled.stop_accepting()

    def connections_in_setup(self) -> int:
        """Accepted connections whose handler has not finished wiring them up yet."""
        return sum(a.in_setup for pod in self.pods.values() for a in pod.servers)

    def close(self) -> None:
        for uid in list(self.pods):
            enrolled = self.pods.pop(uid)
            enrolled.stop_accepting()
            enrolled.netns.close()

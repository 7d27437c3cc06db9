"""Wiring: builds the node proxy from its config and runs it.

Restart without refusals (``handover``): a new proxy started beside the old one takes
over the ZDS path and asks the old one to retire (SIGTERM). The old one closes its agent
link; the agent reconnects to the new proxy and replays every pod; the new proxy opens
its in-pod listeners with SO_REUSEPORT next to the old ones and, once the snapshot is
complete, writes ``<node dir>/proxy.ready``. Only then does the old proxy stop
accepting (``tcp_migrate_req`` hands its queued connections to the new listeners) and
drain its live connections for ``drain_grace`` seconds. A proxy restarted after a crash
gets every pod again the same way, because the agent replays on reconnect.

Inbound delivery goes to the app's pod IP over the pod's ``lo`` (never to its loopback
address): the app sees the client's real IP on every port, both families (IP_TRANSPARENT
plus a policy route for its replies, set up per pod by ``transparent.py``).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry

from shoal.agent.ztunnel.admin import HttpEndpoint, admin_pages, metrics_pages, ready_pages
from shoal.agent.ztunnel.admission import Admission, DialLimits, default_max_connections, raise_open_file_limit
from shoal.agent.ztunnel.bypass import SameNodeBypass
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.agent.ztunnel.context import DestinationLookup, ProxyContext
from shoal.agent.ztunnel.feed import (
    ConfigUpdate,
    FeedDecoder,
    FeedError,
    FeedMessage,
    SvidDropped,
    SvidGrant,
    SvidPending,
)
from shoal.agent.ztunnel.handover import (
    Markers,
    cancel_all,
    remove_workers_report,
    reported,
    serve_until_signalled,
    worker_entry,
    write_workers_report,
)
from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.agent.ztunnel.proxy import LISTENER_KINDS, PodRegistry
from shoal.agent.ztunnel.shedding import ShedPolicy
from shoal.agent.ztunnel.telemetry import ConnectionTelemetry, ProxyMetrics
from shoal.datapath.penaltybox import PenaltyBoxPublisher
from shoal.hbone.identity import HeldIdentities, Identities, Signer, Svid
from shoal.hbone.pool import HbonePool
from shoal.memdebug import rss_kib
from shoal.xds import model as m
from shoal.xds.state import ConfigState
from shoal.zds import ZdsServer

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
WORKERS_REPORT_INTERVAL = 1.0
FEED_READ = 1 << 20


class FeedReader:
    """A worker's end of its supervisor's feed (``feed.py``): config into ``state`` (the
    feed is its only writer in a worker, as the config stream is in the supervisor) and
    SVIDs into the worker's held identities. ``synced`` is set by the first snapshot.

    A frame it cannot trust is the end of this worker: it logs, counts and asks itself to
    stop (SIGTERM: it drains), and the supervisor starts a fresh one with a full snapshot.
    """

    def __init__(self, sock: socket.socket, state: ConfigState, identities: HeldIdentities,
                 synced: asyncio.Event, on_error: Callable[[str], None]):
        self.sock = sock
        self.state = state
        self.identities = identities
        self.synced = synced
        self._on_error = on_error
        self._decoder = FeedDecoder()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        while True:
            data = await loop.sock_recv(self.sock, FEED_READ)
            if not data:   # the supervisor is gone or retiring: PDEATHSIG/SIGTERM follow
                log.warning("feed: the supervisor closed it")
                return
            try:
                for message in self._decoder.feed(data):
                    self.apply(message)
            except (FeedError, ssl.SSLError) as exc:
                self._on_error("message")
                log.error("feed: %s; this worker stops, its supervisor starts a fresh one", exc)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except OSError as exc:
                # A message it could not take (no fd left for an SVID's key, say): going on
                # would serve with a config or certificates behind the node's, unseen.
                self._on_error("apply")
                log.error("feed: a message could not be applied (%s: %s); this worker stops, its supervisor "
                          "starts a fresh one", type(exc).__name__, exc, exc_info=exc)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def apply(self, message: FeedMessage) -> None:
        if isinstance(message, ConfigUpdate):
            delta = message.delta
            if message.snapshot:   # the whole state: what we hold beyond it goes
                keep = {m.resource_key(r) for r in delta.upserted}
                gone = tuple(key for key in map(m.resource_key, self.state.resources()) if key not in keep)
                delta = m.ConfigDelta(version=delta.version, upserted=delta.upserted, removed=gone)
            self.state.apply(delta)
            if message.snapshot:
                self.synced.set()
        elif isinstance(message, SvidGrant):
            self.identities.grant(Svid.from_parts(message.spiffe_id, message.chain_pem, message.key_pem,
                                                  message.roots_pem, message.not_before, message.not_after))
        elif isinstance(message, SvidPending):
            self.identities.pending(message.spiffe_id)
        elif isinstance(message, SvidDropped):
            self.identities.drop(message.spiffe_id)


class ProxyApp:
    def __init__(self, config: ProxyConfig, *, state: ConfigState | None = None, signer: Signer | None = None,
                 origdst: DestinationLookup | None = None, flows: bool = False, config_client=None,
                 serve_http: bool = True, kernel_box: Callable[[str, float], object] | None = None):
        self.config = config
        self.registry = CollectorRegistry()
        self.state = state if state is not None else ConfigState()
        self.metrics = ProxyMetrics(self.registry)
        identities: Identities
        self.link = None
        if config.is_worker:   # its supervisor streams config and fetches certificates
            identities = HeldIdentities(config.trust_domain)
        else:
            from shoal.agent.ztunnel.nodelink import NodeLink

            self.link = NodeLink(config, self.state, signer=signer, config_client=config_client,
                                 on_error=lambda reason: self.metrics.reject("identity", "svid"))
            identities = self.link.identities
        pool = HbonePool(on_change=self.metrics.hbone_connections.set)
        emitter = None
        if flows:  # L4 flow events to the agent (contract C); drops and counts when it is away
            from shoal.flows.emitter import FlowEmitter

            emitter = FlowEmitter(config.flows_path, registry=self.registry, component="proxy")
        telemetry = ConnectionTelemetry(self.metrics, emitter, config.node)
        admission = Admission(config.max_connections_in_setup, config.max_connections or default_max_connections(),
                              live=lambda: len(telemetry.live),
                              shed_policy=ShedPolicy(config.overload_target, config.overload_interval),
                              observe_wait=self.metrics.observe_setup_wait,
                              max_streams_in_setup=config.max_streams_in_setup)
        self.metrics.in_setup.set_function(lambda: admission.in_setup)
        for kind in LISTENER_KINDS:
            self.metrics.overloaded.labels(kind).set_function(functools.partial(admission.overloaded, kind))
        self.ctx = ProxyContext(config=config, state=self.state, identities=identities, metrics=self.metrics,
                                telemetry=telemetry, pool=pool, origdst=origdst, home=NetnsHandle.current(),
                                admission=admission, dial_limits=DialLimits(config.upstream_dials_per_identity),
                                kernel_box=kernel_box)
        self.pods = PodRegistry(self.ctx, prepares_netns=not config.is_worker)
        self.ctx.served_pods = self.pods.pods
        if config.same_node_bypass:
            self.ctx.bypass = SameNodeBypass(config.layout.bpf_pin_dir(config.node), self.state, telemetry,
                                             self.registry, app_join=config.same_node_app_join)
        self.zds = ZdsServer(config.zds_path, self.pods, on_error=lambda r: self.metrics.reject("zds", "message"))
        self._serve_http = serve_http
        self._endpoints: list[HttpEndpoint] = []
        self._tasks: list[asyncio.Task] = []
        self.retiring = asyncio.Event()
        self.markers = Markers(config.node_dir)

    @property
    def ready(self) -> bool:
        return self.pods.snapshot_done.is_set() and self.ctx.config_synced.is_set() and not self.retiring.is_set()

    # -- lifecycle
    async def start(self) -> None:
        Path(self.config.node_dir).mkdir(parents=True, exist_ok=True)
        if self.config.is_worker:
            await self._start_worker()
            return
        predecessor = self.markers.read("proxy.pid")
        await self.zds.start()  # from here on the agent's (re)connects reach us
        self.markers.write("proxy.pid")
        assert self.link is not None
        self._tasks += [reported(task, "node link") for task in
                        self.link.start(self.ctx.config_synced, self.metrics.certs_rotated.inc)]
        self._tasks.append(reported(asyncio.ensure_future(self._announce_ready()), "readiness"))
        self._tasks.append(reported(asyncio.ensure_future(self._report_alone()), "workers report"))
        if self._serve_http:
            await self._start_http()
        self.markers.retire_predecessor(predecessor)

    async def _report_alone(self) -> None:
        """A single-process proxy is its own one worker in ``shoal status``."""
        started = time.monotonic()
        while True:
            if not self.retiring.is_set():
                status = self.worker_status()
                entry = worker_entry(0, os.getpid(), "ready" if status["ready"] else "not ready", status,
                                     time.monotonic() - started)
                write_workers_report(self.config.workers_status_path, {
                    "proxy": os.getpid(), "time": time.time(), "workers_wanted": 1, "restarts": 0,
                    "lost_connections": 0, "rss_kib": entry["rss_kib"], "workers": [entry]})
            await asyncio.sleep(WORKERS_REPORT_INTERVAL)

    async def _start_worker(self) -> None:
        """A worker of a supervised node proxy: pods come over the inherited channel, the
        pages go to the supervisor over a Unix socket; markers, ports and the handover
        belong to the supervisor."""
        channel = socket.socket(fileno=self.config.worker_channel_fd)
        channel.set_inheritable(False)
        self.zds.serve_connection(channel)
        feed = socket.socket(fileno=self.config.worker_feed_fd)
        feed.set_inheritable(False)
        assert isinstance(self.ctx.identities, HeldIdentities)
        reader = FeedReader(feed, self.state, self.ctx.identities, self.ctx.config_synced,
                            on_error=lambda reason: self.metrics.reject("feed", reason))
        self._tasks.append(reported(asyncio.ensure_future(reader.run()), "feed reader"))
        pages = {**admin_pages(self.ctx, lambda: self.pods.pods.values()), **metrics_pages(self.registry),
                 **ready_pages(lambda: self.ready), "/worker": self._worker_page}
        endpoint = HttpEndpoint(pages, on_bad_request=lambda: self.metrics.reject("http", "bad_request"))
        await endpoint.start_unix(self.config.worker_admin_path(os.getpid()))
        self._endpoints.append(endpoint)

    def worker_status(self) -> dict:
        """What this process carries (the supervisor polls it as ``/worker``)."""
        telemetry = self.ctx.telemetry
        return {"index": self.config.worker_index, "pid": os.getpid(), "ready": self.ready,
                "retiring": self.retiring.is_set(), "connections": len(telemetry.live), "handled": telemetry.handled,
                "in_setup": self.pods.connections_in_setup(),
                "pods": sorted(f"{p.info.namespace}/{p.info.name}" for p in self.pods.pods.values()),
                "hbone_connections": len(self.ctx.pool.describe()), "rss_kib": rss_kib()}

    async def _worker_page(self) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(self.worker_status()).encode()

    async def _start_http(self) -> None:
        home = self.config.http_address
        for pages, host, port in (
                (admin_pages(self.ctx, lambda: self.pods.pods.values()), self.config.admin_address, self.config.admin_port),
                (metrics_pages(self.registry), home, self.config.metrics_port),
                (ready_pages(lambda: self.ready), home, self.config.ready_port)):
            endpoint = HttpEndpoint(pages, on_bad_request=lambda: self.metrics.reject("http", "bad_request"))
            await endpoint.start(host, port)
            self._endpoints.append(endpoint)

    async def _announce_ready(self) -> None:
        # A predecessor stops accepting only when we can route: pods open AND config in.
        await self.pods.snapshot_done.wait()
        await self.ctx.config_synced.wait()
        self.markers.write("proxy.ready")

    async def retire(self) -> None:
        """Handover/shutdown: let a successor take over, stop accepting, drain, stop."""
        if self.retiring.is_set():
            return
        self.retiring.set()
        if self.config.is_worker:  # the supervisor waited for the successor before asking us
            await self._stop_accepting_and_drain()
            return
        successor = not self.zds.owns_path()
        await self.zds.close()  # the agent reconnects to the successor and replays
        if successor:
            await self.markers.wait_for_successor(self.config.handover_wait)
        await self._stop_accepting_and_drain()

    async def _stop_accepting_and_drain(self) -> None:
        self.pods.stop_accepting()
        for session in list(self.ctx.inbound_sessions):
            session.drain()  # peers' pools stop opening tunnels to us, live ones go on
        await self._drain()
        await self.stop()

    async def _drain(self) -> None:
        """Serve the live connections until they end or ``drain_grace`` passes, then say
        how many were carried to their end and how many the deadline cut (log + metric)."""
        live = self.ctx.telemetry.live
        started, at_start = time.monotonic(), set(live)
        log.info("drain: %d live connections, up to %.0fs grace", len(at_start), self.config.drain_grace)
        deadline = started + self.config.drain_grace
        # Drained: no live connection, none being set up, and every inbound HBONE
        # connection closed by its peer's ACK of the drain (so no tunnel is in flight).
        while (live or self.pods.connections_in_setup() or self.ctx.inbound_sessions) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        cut = len(live)
        completed = len(at_start - set(live))
        self.metrics.drained.labels("completed").inc(completed)
        self.metrics.drained.labels("cut").inc(cut)
        who = f"worker {self.config.worker_index}: " if self.config.is_worker else ""
        log.info(who + "drain: carried %d of %d connections to their end in %.1fs; %d cut at the %.0fs grace deadline",
                 completed, len(at_start), time.monotonic() - started, cut, self.config.drain_grace)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        await self.zds.close()
        self.ctx.pool.close_all()
        for session in list(self.ctx.inbound_sessions):
            session.close()
        self.pods.close()
        if self.ctx.bypass is not None:
            self.ctx.bypass.close()
        for endpoint in self._endpoints:
            await endpoint.close()
        self._endpoints.clear()
        if self.link is not None:
            await self.link.close()
        self.ctx.telemetry.report()       # the closes and flows still batched: none is lost
        self.ctx.telemetry.send_flows()
        if self.config.is_worker:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.worker_admin_path(os.getpid()))
            return
        self.markers.remove_own()
        remove_workers_report(self.config.workers_status_path)

def _default_origdst(config: ProxyConfig) -> DestinationLookup | None:
    try:
        from shoal.datapath.origdst import OriginalDestinations as Lookup

        return Lookup(config.layout.bpf_pin_dir(config.node))
    except (ImportError, OSError) as exc:
        log.warning("original-destination map unavailable (%s): outbound capture cannot be served", exc)
        return None


class _LazyOrigdst:
    """Opens the agent's pinned map on first use (the agent may start after us)."""

    def __init__(self, config: ProxyConfig):
        self._config = config
        self._lookup: DestinationLookup | None = None

    def lookup(self, sock):
        if self._lookup is None:
            self._lookup = _default_origdst(self._config)
            if self._lookup is None:
                raise LookupError("the agent's origdst map is not pinned yet")
        return self._lookup.lookup(sock)


async def main(config: ProxyConfig, install_signals: bool = True) -> None:
    """Run the single-process node proxy, or one worker of a supervised one."""
    if config.is_worker:
        exit_with_parent()
    log.info("open-file limit %d", raise_open_file_limit())
    kernel_box = PenaltyBoxPublisher(config.layout.bpf_pin_dir(config.node))
    app = ProxyApp(config, origdst=_LazyOrigdst(config), flows=True, kernel_box=kernel_box.box)
    role = f"worker {config.worker_index} of the " if config.is_worker else ""
    log.info("%snode proxy for %s starting (pid %d)", role, config.node, os.getpid())
    await serve_until_signalled(app, install_signals)


def exit_with_parent() -> None:
    """A worker whose supervisor died gets SIGTERM (and drains) instead of serving on
    unsupervised, unseen by the agent and by the metrics (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    if os.getppid() == 1:   # the supervisor died before we asked
        os.kill(os.getpid(), signal.SIGTERM)

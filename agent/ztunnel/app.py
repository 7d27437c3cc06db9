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
import errno
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from shoal.agent.ztunnel.admin import HttpEndpoint, admin_pages, metrics_pages, ready_pages
from shoal.agent.ztunnel.admission import Admission, DialLimits, default_max_connections, raise_open_file_limit
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.agent.ztunnel.context import DestinationLookup, ProxyContext
from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.agent.ztunnel.proxy import PodRegistry
from shoal.agent.ztunnel.telemetry import ConnectionTelemetry, ProxyMetrics
from shoal.hbone.identity import IdentityError, IdentityManager, Signer, SignerUnavailable
from shoal.hbone.pool import HbonePool
from shoal.xds.state import ConfigState
from shoal.zds import ZdsServer

log = logging.getLogger(__name__)


# The controller's CA answering these is down, restarting or busy: retried with backoff.
TRANSIENT_RPC_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                                 grpc.StatusCode.CANCELLED})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError as exc:
        return exc.errno == errno.EPERM


def _marker_pid(marker: str) -> int:
    head = marker.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


class ProxyApp:
    def __init__(self, config: ProxyConfig, *, state: ConfigState | None = None, signer: Signer | None = None,
                 origdst: DestinationLookup | None = None, flows: bool = False, config_client=None,
                 serve_http: bool = True):
        self.config = config
        self.registry = CollectorRegistry()
        self.state = state if state is not None else ConfigState()
        self.metrics = ProxyMetrics(self.registry)
        self._config_client = config_client
        if signer is None:
            signer = self._controller_signer()
        identities = IdentityManager(signer, config.trust_domain,
                                     on_error=lambda reason: self.metrics.reject("identity", "svid"))
        pool = HbonePool(on_change=self.metrics.hbone_connections.set)
        emitter = None
        if flows:  # L4 flow events to the agent (contract C); drops and counts when it is away
            from shoal.flows.emitter import FlowEmitter

            emitter = FlowEmitter(config.flows_path, registry=self.registry, component="proxy")
        telemetry = ConnectionTelemetry(self.metrics, emitter, config.node)
        admission = Admission(config.max_connections_in_setup, config.max_connections or default_max_connections(),
                              live=lambda: len(telemetry.live))
        self.metrics.in_setup.set_function(lambda: admission.in_setup)
        self.ctx = ProxyContext(config=config, state=self.state, identities=identities, metrics=self.metrics,
                                telemetry=telemetry, pool=pool, origdst=origdst, home=NetnsHandle.current(),
                                admission=admission, dial_limits=DialLimits(config.upstream_dials_per_identity))
        self.pods = PodRegistry(self.ctx)
        self.zds = ZdsServer(config.zds_path, self.pods, on_error=lambda r: self.metrics.reject("zds", "message"))
        self._serve_http = serve_http
        self._endpoints: list[HttpEndpoint] = []
        self._tasks: list[asyncio.Task] = []
        self.retiring = asyncio.Event()
        # Markers name this instance, not just the pid (two instances may share a pid in tests).
        self.instance = f"{os.getpid()}-{os.urandom(4).hex()}"

    @property
    def ready(self) -> bool:
        return self.pods.snapshot_done.is_set() and self.ctx.config_synced.is_set() and not self.retiring.is_set()

    def _controller_signer(self) -> Signer:
        async def sign(csr_pem: bytes):
            try:
                chain, roots = await self._client().sign_certificate(csr_pem,
                                                                     ttl_seconds=self.config.cert_ttl_seconds)
            except grpc.aio.AioRpcError as exc:
                # Down or restarting (UNAVAILABLE, DEADLINE_EXCEEDED...) is retried with
                # backoff by the identity manager; a refusal is final.
                error = SignerUnavailable if exc.code() in TRANSIENT_RPC_CODES else IdentityError
                raise error(f"controller CA: {exc.code().name}: {exc.details()}") from None
            to_bytes = lambda v: v.encode() if isinstance(v, str) else v
            return to_bytes(chain), to_bytes(roots)
        return sign

    def _client(self):
        if self._config_client is None:
            from shoal.xds.client import ConfigClient

            token = Path(self.config.token_file) if self.config.token_file else ""
            self._config_client = ConfigClient(self.config.controller, self.config.node, token, self.state,
                                               component="proxy", ca_bundle=self.config.ca_bundle or None)
        return self._config_client

    # -- lifecycle
    async def start(self) -> None:
        Path(self.config.node_dir).mkdir(parents=True, exist_ok=True)
        predecessor = self._read_marker("proxy.pid")
        await self.zds.start()  # from here on the agent's (re)connects reach us
        self._write_marker("proxy.pid")
        if self.config.controller or self._config_client is not None:
            client = self._client()
            self._tasks.append(asyncio.ensure_future(client.run()))
            self._tasks.append(asyncio.ensure_future(self._mark_synced(client.synced)))
        else:
            self.ctx.config_synced.set()  # state handed in (tests, benches): nothing to wait for
        self._tasks.append(asyncio.ensure_future(self._rotate()))
        self._tasks.append(asyncio.ensure_future(self._announce_ready()))
        if self._serve_http:
            await self._start_http()
        old_pid = _marker_pid(predecessor)
        if old_pid and old_pid != os.getpid() and _pid_alive(old_pid):
            log.info("handover: asking proxy %d to retire", old_pid)
            os.kill(old_pid, signal.SIGTERM)

    async def _start_http(self) -> None:
        home = self.config.http_address
        for pages, host, port in (
                (admin_pages(self.ctx, lambda: self.pods.pods.values()), self.config.admin_address, self.config.admin_port),
                (metrics_pages(self.registry), home, self.config.metrics_port),
                (ready_pages(lambda: self.ready), home, self.config.ready_port)):
            endpoint = HttpEndpoint(pages, on_bad_request=lambda: self.metrics.reject("http", "bad_request"))
            await endpoint.start(host, port)
            self._endpoints.append(endpoint)

    async def _rotate(self) -> None:
        while True:
            await asyncio.sleep(self.config.rotation_check_interval)
            rotated = await self.ctx.identities.rotate_due()
            if rotated:
                self.metrics.certs_rotated.inc(rotated)

    async def _mark_synced(self, synced: asyncio.Event) -> None:
        await synced.wait()
        self.ctx.config_synced.set()

    async def _announce_ready(self) -> None:
        # A predecessor stops accepting only when we can route: pods open AND config in.
        await self.pods.snapshot_done.wait()
        await self.ctx.config_synced.wait()
        self._write_marker("proxy.ready")

    async def retire(self) -> None:
        """Handover/shutdown: let a successor take over, stop accepting, drain, stop."""
        if self.retiring.is_set():
            return
        self.retiring.set()
        successor = not self._owns_zds_path()
        await self.zds.close()  # the agent reconnects to the successor and replays
        if successor:
            deadline = time.monotonic() + self.config.handover_wait
            while time.monotonic() < deadline:
                ready = self._read_marker("proxy.ready")
                if ready and ready != self.instance and _pid_alive(_marker_pid(ready)):
                    break
                await asyncio.sleep(0.05)
            else:
                log.warning("handover: no ready successor after %.0fs, stopping anyway", self.config.handover_wait)
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
        log.info("drain: carried %d of %d connections to their end in %.1fs; %d cut at the %.0fs grace deadline",
                 completed, len(at_start), time.monotonic() - started, cut, self.config.drain_grace)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.zds.close()
        self.ctx.pool.close_all()
        for session in list(self.ctx.inbound_sessions):
            session.close()
        self.pods.close()
        for endpoint in self._endpoints:
            await endpoint.close()
        self._endpoints.clear()
        if self._config_client is not None:
            await self._config_client.close()
        for name in ("proxy.pid", "proxy.ready"):
            if self._read_marker(name) == self.instance:
                with contextlib.suppress(FileNotFoundError):
                    (Path(self.config.node_dir) / name).unlink()

    # -- markers
    def _owns_zds_path(self) -> bool:
        try:
            return os.stat(self.config.zds_path).st_ino == self.zds._path_inode
        except FileNotFoundError:
            return False

    def _write_marker(self, name: str) -> None:
        path = Path(self.config.node_dir) / name
        tmp = path.with_name(f".{name}.{self.instance}")
        tmp.write_text(f"{self.instance}\n")
        os.replace(tmp, path)

    def _read_marker(self, name: str) -> str:
        try:
            return (Path(self.config.node_dir) / name).read_text().strip()
        except FileNotFoundError:
            return ""


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
    log.info("open-file limit %d", raise_open_file_limit())
    app = ProxyApp(config, origdst=_LazyOrigdst(config), flows=True)
    await app.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        task = asyncio.ensure_future(app.retire())
        task.add_done_callback(lambda _: done.set())

    if install_signals:
        loop.add_signal_handler(signal.SIGTERM, on_signal)
        loop.add_signal_handler(signal.SIGINT, on_signal)
    log.info("node proxy for %s up (pid %d)", config.node, os.getpid())
    await done.wait()

"""The control plane core: model + config distribution + CA behind one gRPC server.

Sources (local store, Kubernetes) call ``apply``/``replace``; both update the model and
queue the change for every connected node. ``status()`` is the view behind ``shoal status``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal import __version__
from shoal.controller.auth import Authenticator, AuthError, AuthUnavailable
from shoal.controller.ca import CertificateAuthority, issue_serving_certificate
from shoal.controller.ca_service import SERVICE_NAME as CA_SERVICE
from shoal.controller.ca_service import CertificateService
from shoal.controller.distribution import SERVICE_NAME as DISTRIBUTION_SERVICE
from shoal.controller.distribution import Distributor
from shoal.controller.metrics import ControllerMetrics
from shoal.controller.model import Change, MeshModel, Obj
from shoal.controller.rpcguard import MAX_REQUEST_BYTES, NodeAuthInterceptor
from shoal.ratelog import LogLimiter, held_note
from shoal.xds.client import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# Nodes ping every 20 s even when idle (ConfigClient's keepalive): accept that instead of
# answering GOAWAY "too_many_pings"; ping nodes too, to notice dead ones.
# Requests are small (per-method limits in rpcguard); pushes can be large.
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)

async def serve_admin(host: str, port: int, metrics: ControllerMetrics,
                      authenticator: Authenticator, ready: Callable[[], bool],
                      status: Callable[[], dict[str, Any]]) -> web.AppRunner:
    """/metrics (Prometheus: counts only, no secrets, no per-flow data) and /ready for
    anyone, as scrapers and probes expect; /status (JSON: every node and its config
    version) only for a caller presenting a node credential as a bearer token."""
    app = web.Application()
    # Any pod can reach 15014: a flood of refused /status requests is counted in full but
    # logged a line a second per reason, saying how many were held back.
    refusals_logged = LogLimiter()

    async def metrics_handler(_request):
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def ready_handler(_request):
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")

    async def status_handler(request):
        try:
            await authenticator.authenticate(
                (("authorization", request.headers.get("Authorization", "")),))
        except AuthError as err:
            metrics.auth_failures.labels("status", err.reason).inc()
            held = refusals_logged.allow(err.reason)
            if held is not None:
                log.warning("/status from %s refused: %s%s", request.remote, err, held_note(held))
            code = 503 if isinstance(err, AuthUnavailable) else 401
            return web.json_response({"error": str(err)}, status=code,
                                     headers={"WWW-Authenticate": "Bearer"})
        return web.json_response(status())

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/ready", ready_handler)
    app.router.add_get("/status", status_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class ControlPlane:
    def __init__(self, model: MeshModel, ca: CertificateAuthority, authenticator: Authenticator,
                 metrics: ControllerMetrics | None = None,
                 persist_identities: Callable[[list], Awaitable[None]] | None = None,
                 not_issuing: Callable[[], str | None] = lambda: None) -> None:
        """``persist_identities``: saves new identity allocations elsewhere (Kubernetes mode)
        before any push uses them; see ``apply_async``. ``not_issuing``: see
        ``CertificateService`` (a standby serves the config stream but signs nothing)."""
        self.model = model
        self.persist_identities = persist_identities
        self.ca = ca
        self.metrics = metrics or ControllerMetrics.create()
        self.authenticator = authenticator
        self.distributor = Distributor(model, self.metrics)
        self.certificates = CertificateService(ca, model, self.metrics, not_issuing)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._synced_sources: set[str] = set()
        self._expected_sources: set[str] = set()
        self._metrics_runner: web.AppRunner | None = None
        self.started_at = time.time()
        # The embedded store's newest write the model has taken (its resourceVersion; 0 in
        # Kubernetes mode): set by the local source, shown in status.
        self.applied_revision = 0

    # -- sources -----------------------------------------------------------------------------

    def expect_source(self, name: str) -> None:
        """Readiness waits until every expected source has done its first full list."""
        self._expected_sources.add(name)

    def source_synced(self, name: str) -> None:
        self._synced_sources.add(name)

    @property
    def ready(self) -> bool:
        return self.server is not None and self._expected_sources <= self._synced_sources

    def apply(self, events: Iterable[tuple[str, Obj]]) -> Change:
        change = self.model.apply(events)
        self._after(change)
        return change

    def replace(self, kind: str, objs: Iterable[Obj]) -> Change:
        change = self.model.replace(kind, objs)
        self._after(change)
        return change

    async def apply_async(self, events: Iterable[tuple[str, Obj]]) -> Change:
        """``apply`` for sources whose identities are persisted asynchronously: new
        identities are saved (retrying) before the change is pushed."""
        change = self.model.apply(events)
        await self._persist()
        self._after(change)
        return change

    async def replace_async(self, kind: str, objs: Iterable[Obj]) -> Change:
        change = self.model.replace(kind, objs)
        await self._persist()
        self._after(change)
        return change

    def learn_identities(self, allocations: list) -> Change:
        """A standby: the leader's identity table as last read; publishes the workloads
        that waited for their number."""
        self.model.identities.restore(allocations)
        change = self.model.recheck_withheld()
        self._after(change)
        return change

    async def lead(self, allocations: list,
                   persist_identities: Callable[[list], Awaitable[None]]) -> Change:
        """A standby becomes the leader: from the latest table on, it allocates (and saves)
        the numbers of the workloads it withheld."""
        self.model.identities.restore(allocations)
        self.model.identities.lead()
        self.persist_identities = persist_identities
        change = self.model.recheck_withheld()
        await self._persist()
        self._after(change)
        return change

    async def _persist(self, max_backoff: float = 10.0) -> None:
        if self.persist_identities is None:
            return
        pending = self.model.identities.take_pending()
        backoff = 0.2
        while pending:
            try:
                await self.persist_identities(pending)
                return
            except Exception as err:  # noqa: BLE001 - API errors of any kind: nothing is pushed until saved
                self.metrics.source_errors.labels("identities", "ConfigMap").inc()
                log.warning("saving %d new identities failed (%s); retrying", len(pending), err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)

    def _after(self, change: Change) -> None:
        self.metrics.model_errors.set(len(self.model.errors))
        if change:
            for kind, count in self.model.counts().items():
                self.metrics.resources.labels(kind).set(count)
            self.distributor.notify(change)

    # -- serving -------------------------------------------------------------------------------

    async def start(self, address: str, tls_names: list[str] | None = None) -> int:
        """Serves the config stream and the CA on ``address``; returns the bound port.

        With ``tls_names`` (DNS names / IPs) it serves TLS with a certificate from its own CA,
        so nodes verify the controller with the trust bundle (``root-cert.pem``).
        """
        guard = NodeAuthInterceptor(self.authenticator, self.metrics,
                                    (DISTRIBUTION_SERVICE, CA_SERVICE))
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=(guard,))
        self.server.add_generic_rpc_handlers((self.distributor.handler(),
                                              self.certificates.handler()))
        if tls_names:
            chain, key = issue_serving_certificate(self.ca, tls_names)
            credentials = grpc.ssl_server_credentials([(key, chain)])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        log.info("config stream and CA on %s (port %d)", address, self.port)
        return self.port

    async def start_admin(self, host: str, port: int,
                          status: Callable[[], dict[str, Any]] | None = None) -> None:
        """The admin HTTP endpoints (``serve_admin``) for this control plane."""
        self._metrics_runner = await serve_admin(host, port, self.metrics, self.authenticator,
                                                 lambda: self.ready, status or self.status)

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None

    def status(self) -> dict[str, Any]:
        """Connected agents and the config version each holds (for ``shoal status``)."""
        version = str(self.model.generation)
        agents = self.distributor.status()
        for agent in agents:
            agent["synced"] = (agent["connected"] and agent["version"] == version
                               and agent["in_flight"] == 0)
        return {
            "ready": self.ready,
            "version": version,
            "build_version": __version__,
            "resources": self.model.counts(),
            "identities": len(self.model.identities),
            "agents": agents,
            "applied_revision": self.applied_revision,
            "errors": sorted(self.model.errors.values()),
            "trust_domain": self.ca.trust_domain,
        }

"""Wiring: builds the waypoint from its config and runs it.

Pieces, as in the node proxy: state (``ConfigState``, written only by the config
client), identity (``IdentityManager`` with the waypoint's SVID), the proxy pipeline,
the listeners (HBONE; plain HTTP only when asked, for development and benchmarks),
metrics and readiness over HTTP, telemetry sinks (access log, flows, OTLP).

Routes and TrafficPolicies arrive on the config stream as pass-through Kubernetes
objects (``KubeObject``); each push re-parses them and swaps them into the proxy, so a
new HTTPRoute or a removed policy applies to the next request, without a restart.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shoal.xds import model as m
from shoal.xds.state import ConfigState

from .config import WaypointConfig
from .listener import start_plaintext
from .model import ROUTE_KINDS, HTTPRoute, TrafficPolicy, parse_grpcroute, parse_httproute, parse_traffic_policy
from .proxy import WaypointProxy
from .resolver import StateResolver, StaticResolver
from .telemetry import BatchedLines, OtlpSpanExporter, RequestTelemetry
from .upstream import Endpoint, TcpConnector

log = logging.getLogger(__name__)
GC_YOUNG_THRESHOLD = 20_000   # allocations between young collections (default 700)

PARSERS: dict[str, Callable[[dict], Any]] = {"HTTPRoute": parse_httproute, "GRPCRoute": parse_grpcroute,
                                             "TrafficPolicy": parse_traffic_policy}


def validate_resource(resource: m.Resource) -> None:
    """Config-stream validator: a malformed HTTPRoute/GRPCRoute/TrafficPolicy is NACKed (ValueError)."""
    if isinstance(resource, m.KubeObject) and resource.kind in PARSERS:
        try:
            body = resource.body
        except ValueError as err:
            raise ValueError(f"{resource.kind} {resource.namespace}/{resource.name}: bad JSON: {err}") from None
        PARSERS[resource.kind](body)


def parse_objects(objects: Iterable[dict], on_error: Callable[[str, str], None]) -> tuple[list[HTTPRoute], list[TrafficPolicy]]:
    routes, policies = [], []
    for obj in objects:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind not in PARSERS:
            continue
        try:
            parsed = PARSERS[kind](obj)
        except ValueError as err:
            meta = obj.get("metadata") or {}
            on_error(kind, f"{kind} {meta.get('namespace')}/{meta.get('name')}: {err}")
            continue
        (routes if kind in ROUTE_KINDS else policies).append(parsed)
    return routes, policies


def load_objects_file(path: str) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


class WaypointApp:
    def __init__(self, config: WaypointConfig, *, state: ConfigState | None = None, signer=None,
                 config_client=None) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.state = state if state is not None else ConfigState()
        self._config_client = config_client
        self._tasks: list[asyncio.Task] = []
        self._servers: list = []   # PlainListener, HboneListener: drain(), active, close()
        self._runners: list[web.AppRunner] = []
        self.ready = asyncio.Event()    # listeners up (see ``serving`` for the probe's answer)
        self.draining = False
        self.flows = None
        if config.emit_flows and config.flows_path:
            from shoal.flows.emitter import FlowEmitter

            self.flows = FlowEmitter(config.flows_path, registry=self.registry, component="waypoint")
        self.spans = OtlpSpanExporter(config.otlp_endpoint, f"{config.name}.{config.namespace}") \
            if config.otlp_endpoint else None
        self._access_stream: TextIO | None = None
        self.access_log = self._access_sink()
        self.telemetry = RequestTelemetry(self.registry, access_log=self.access_log, flow_emitter=self.flows,
                                   span_exporter=self.spans)
        self.identities = None
        if config.static_services:
            services = {(ns, name): [Endpoint(ip, port, name=f"{name}-{i}", namespace=ns)
                                     for i, (ip, port) in enumerate(eps)]
                        for ns, name, eps in config.static_services}
            first = config.static_services[0]
            resolver = StaticResolver(services, namespace=config.namespace, default=(first[0], first[1]))
            connector = TcpConnector(config.connect_timeout)
        else:
            resolver = StateResolver(self.state, config.namespace, config.trust_domain,
                                     gateway=(config.namespace, config.name))
            connector = TcpConnector(config.connect_timeout)
        if signer is not None or config.controller:
            from shoal.hbone.issuer import IdentityManager

            from .hbone import HboneConnector

            self.identities = IdentityManager(signer or self._controller_signer(), config.trust_domain)
            if not config.static_services:
                connector = HboneConnector(self.identities, config.spiffe_id, config.pod_ip,
                                           connect_timeout=config.connect_timeout)
        self.connector = connector
        self.proxy = WaypointProxy(resolver, connector, self.telemetry, config.limits, fast_path=config.fast_path)
        self._static_objects = load_objects_file(config.routes_file) if config.routes_file else []

    def _access_sink(self) -> BatchedLines | None:
        """One JSON line per request on stdout (``-``) or appended to a file, written in batches."""
        target = self.config.access_log
        if not target:
            return None
        stream = sys.stdout if target == "-" else open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()

        def write(text: str) -> None:
            stream.write(text)
            stream.flush()

        self._access_stream = None if stream is sys.stdout else stream
        return BatchedLines(write)

    def _controller_signer(self):
        import grpc

        async def sign(csr_pem: bytes):
            try:
                chain, roots = await self._client().sign_certificate(csr_pem, ttl_seconds=self.config.cert_ttl_seconds)
            except grpc.aio.AioRpcError as err:
                # The identity manager treats OSError as "try again later".
                raise ConnectionError(f"CA at {self.config.controller}: {err.code().name} {err.details()}") from None
            as_bytes = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
            return as_bytes(chain), as_bytes(roots)
        return sign

    def _client(self):
        if self._config_client is None:
            from shoal.xds.client import ConfigClient

            token = Path(self.config.token_file) if self.config.token_file else ""
            # The caller name its credential proves (issued by the local launcher): the
            # waypoint's own, not its node's, so it gets its Gateway's identity and no other.
            node = f"waypoint-{self.config.namespace}-{self.config.name}"
            self._config_client = ConfigClient(self.config.controller, node, token, self.state,
                                               component="waypoint", validator=validate_resource,
                                               ca_bundle=self.config.ca_bundle or None)
        return self._config_client

    # -- configuration
    def reload(self, _delta: m.ConfigDelta | None = None) -> None:
        objects = [o.body for kind in PARSERS for o in self.state.objects(kind)] + self._static_objects

        def rejected(kind: str, message: str) -> None:
            self.telemetry.metrics.config_rejected.labels(kind=kind).inc()
            log.warning("ignoring invalid %s", message)

        routes, policies = parse_objects(objects, rejected)
        self.proxy.update(routes, policies)
        log.info("config: %d routes (HTTPRoute, GRPCRoute), %d TrafficPolicies", len(routes), len(policies))

    # -- lifecycle
    async def start(self) -> None:
        config = self.config
        self.state.subscribe(self.reload)
        self.reload()
        if config.controller or self._config_client is not None:
            self._tasks.append(asyncio.ensure_future(self._client().run()))
        if self.identities is not None:
            await self._acquire_identity()
            from .hbone import start_hbone_listener

            host, port = config.hbone_address
            self._servers.append(await start_hbone_listener(self.proxy, config.limits, self.identities,
                                                            config.spiffe_id, host, port,
                                                            handshake_limits=config.handshake_limits))
            self._tasks.append(asyncio.ensure_future(self._rotate()))
        if config.plaintext_address is not None:
            host, port = config.plaintext_address
            self._servers.append(await start_plaintext(self.proxy, config.limits, host, port))
        await self._start_http()
        self.ready.set()
        log.info("waypoint %s/%s serving as %s", config.namespace, config.name, config.spiffe_id)

    async def _acquire_identity(self) -> None:
        from shoal.hbone.identity import IdentityError

        delay = 0.2
        while True:
            try:
                await self.identities.get(self.config.spiffe_id)
                return
            except IdentityError as err:
                log.warning("no SVID yet for %s: %s (retrying)", self.config.spiffe_id, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _rotate(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            await self.identities.rotate_due()

    async def _start_http(self) -> None:
        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def ready(_request: web.Request) -> web.Response:
            return web.Response(status=200 if self.serving else 503, text="ready\n" if self.serving else "not ready\n")

        async def config_dump(_request: web.Request) -> web.Response:
            cfg = self.proxy.config
            return web.json_response({
                "routes": [f"{ns}/{name}" for ns, name in cfg.route_keys],
                "traffic_policies": sorted({f"{p.namespace}/{p.name}" for p in cfg.policies.values()}),
                "identity": self.config.spiffe_id,
            })

        for port, routes in ((self.config.metrics_port, [("/metrics", metrics), ("/config_dump", config_dump)]),
                             (self.config.ready_port, [("/healthz/ready", ready)])):
            if not port:
                continue
            app = web.Application()
            for path, handler in routes:
                app.router.add_get(path, handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "0.0.0.0", port, reuse_address=True).start()
            self._runners.append(runner)

    @property
    def serving(self) -> bool:
        """What the readiness probe answers, and what the controller waits for before it
        routes to this waypoint: listening, with its SVID, and the first config applied
        (a request arriving earlier would find no Service); false again once draining."""
        synced = self._config_client is None or self._config_client.synced.is_set()
        return self.ready.is_set() and synced and not self.draining

    async def drain(self, grace: float) -> None:
        """Stop taking connections, let the ones in flight finish (HBONE sessions get
        GOAWAY), for at most ``grace`` seconds. By the time the waypoint is told to stop,
        the controller has already moved the routes away from it."""
        self.draining = True
        for listener in self._servers:
            listener.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(listener.active for listener in self._servers):
            await asyncio.sleep(0.05)
        left = sum(listener.active for listener in self._servers)
        log.info("drained%s", f"; {left} connections still open after {grace:.1f} s" if left else "")

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.proxy.close()
        close = getattr(self.connector, "close", None)
        if close is not None:
            close()
        for runner in self._runners:
            await runner.cleanup()
        if self._config_client is not None:
            await self._config_client.close()
        self.telemetry.flush()   # the last requests' log lines, flows and spans
        if self.flows is not None:
            self.flows.close()
        if self.spans is not None:
            self.spans.shutdown()
        if self.access_log is not None:
            self.access_log.flush()
        if self._access_stream is not None:
            self._access_stream.close()


async def main(config: WaypointConfig) -> None:
    import signal

    app = WaypointApp(config)
    await app.start()
    # What start-up built (modules, config, pools) lives as long as the process: out of the
    # collector's sight, and young collections less often (each request allocates a few
    # hundred objects, almost none in cycles).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("waypoint stopping: draining for up to %.1f s", config.drain_seconds)
    await app.drain(config.drain_seconds)
    await app.stop()

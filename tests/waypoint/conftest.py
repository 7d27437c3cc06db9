"""A real waypoint on loopback in front of real aiohttp backends (no mesh, no root).

``Bed`` builds backends (named Services, each with endpoints), a ``WaypointProxy`` with a
``StaticResolver`` and a plaintext listener, so tests drive the whole HTTP path with real
sockets and real clients.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from shoal.waypoint.http import Limits
from shoal.waypoint.listener import start_plaintext
from shoal.waypoint.model import parse_route, parse_traffic_policy
from shoal.waypoint.proxy import WaypointProxy
from shoal.waypoint.resolver import StaticResolver
from shoal.waypoint.telemetry import RequestTelemetry
from shoal.waypoint.upstream import Endpoint, TcpConnector


def generated_twin(cls: type) -> type:
    """A dataclass with ``cls``'s init fields and defaults and the ``__init__`` the decorator
    generates: the reference for a class whose ``__init__`` is written out (so mypyc compiles it)."""
    specs: list = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            specs.append((f.name, object, dataclasses.field(default=f.default)))
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, object, dataclasses.field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, object))
    return dataclasses.make_dataclass(f"{cls.__name__}Twin", specs)


def init_values(obj: object) -> dict[str, object]:
    """A dataclass instance's init fields by name."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def make_backend_app(name: str, seen: list) -> web.Application:
    """Echoes what it got; ?status=N answers N, ?delay_ms=N waits first, /ws echoes websocket frames."""

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(f"{name}:{msg.data}")
        return sock

    async def anything(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.path_qs, dict(request.headers)))
        if "delay_ms" in request.query:
            await asyncio.sleep(int(request.query["delay_ms"]) / 1000)
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"x-backend": name})
            await resp.prepare(request)
            total = 0
            async for chunk in request.content.iter_any():
                total += len(chunk)
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        body = await request.read()
        status = int(request.query.get("status", 200))
        return web.json_response({"backend": name, "method": request.method, "path": request.path_qs,
                                  "headers": dict(request.headers), "body_len": len(body)}, status=status,
                                 headers={"x-backend": name, "server": "aiohttp-test"})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


class Bed:
    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.services: dict[tuple[str, str], list[Endpoint]] = {}
        self.seen: dict[str, list] = {}
        self.registry = CollectorRegistry()
        self._access_log: list[dict] = []
        self.http2: set[tuple[str, str]] = set()   # Services whose endpoints speak h2c
        self.grpc_servers: list = []
        self.proxy: WaypointProxy | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    async def backend(self, service: str, name: str | None = None, namespace: str = "demo") -> Endpoint:
        name = name or service
        seen = self.seen.setdefault(name, [])
        runner = web.AppRunner(make_backend_app(name, seen), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        endpoint = Endpoint("127.0.0.1", port, uid=name, name=name, namespace=namespace)
        self.services.setdefault((namespace, service), []).append(endpoint)
        return endpoint

    def grpc_backend(self, service: str, name: str | None = None, namespace: str = "demo") -> Endpoint:
        """A real grpcio server (h2c) as an endpoint of ``service`` (see grpcecho.py)."""
        from concurrent import futures

        import grpc

        from . import grpcecho
        name = name or service
        seen = self.seen.setdefault(name, [])
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        server.add_generic_rpc_handlers((grpcecho.handler(name, seen),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.grpc_servers.append(server)
        self.http2.add((namespace, service))
        endpoint = Endpoint("127.0.0.1", port, uid=name, name=name, namespace=namespace)
        self.services.setdefault((namespace, service), []).append(endpoint)
        return endpoint

    def dead_endpoint(self, service: str, namespace: str = "demo") -> None:
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there: connection refused
        self.services.setdefault((namespace, service), []).append(Endpoint("127.0.0.1", port, name="dead", namespace=namespace))

    async def start(self, routes=(), policies=(), authz=(), limits: Limits = Limits(), seed: int = 1,
                    fast_path: bool = True) -> None:
        resolver = StaticResolver(self.services, namespace="demo", policies=list(authz), http2=frozenset(self.http2))
        telemetry = RequestTelemetry(self.registry, access_log=lambda line: self._access_log.append(json.loads(line)))
        self.proxy = WaypointProxy(resolver, TcpConnector(), telemetry, limits, rng=random.Random(seed),
                                   fast_path=fast_path)
        self.proxy.update([parse_route(r) for r in routes], [parse_traffic_policy(p) for p in policies])
        self.server = await start_plaintext(self.proxy, limits)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def access_log(self) -> list[dict]:
        """The access log so far: the lines of requests already answered are made in batches
        (``telemetry.REPORT_DELAY``), so what is recorded is reported first."""
        if self.proxy is not None:
            self.proxy.telemetry.flush()
        return self._access_log

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.proxy is not None:
            await self.proxy.close()
        for runner in self.runners:
            await runner.cleanup()
        for server in self.grpc_servers:
            server.stop(grace=None)


@pytest.fixture
async def bed():
    b = Bed()
    try:
        yield b
    finally:
        await b.close()


def route(rules, name="r", service="web", namespace="demo"):
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": service}], "rules": rules}}


def traffic_policy(spec, service="web", namespace="demo", name="tp"):
    return {"apiVersion": "networking.shoal.io/v1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"targetRefs": [{"kind": "Service", "name": service}], **spec}}

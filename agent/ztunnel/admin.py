"""Per-node HTTP endpoints: admin on loopback 15000, Prometheus on 15020, readiness on 15021."""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from shoal.agent.ztunnel.app import ProxyApp


def _json(data) -> web.Response:
    return web.Response(text=json.dumps(data, indent=1, default=str), content_type="application/json")


def admin_app(app: "ProxyApp") -> web.Application:
    ctx = app.ctx

    async def config_dump(_request):
        return _json({
            "node": app.config.node,
            "config_version": ctx.state.version,
            "pods": [pod.describe() for pod in app.pods.pods.values()],
            "workloads": [dataclasses.asdict(w) for w in ctx.state.all_workloads()],
            "services": [dataclasses.asdict(s) for s in ctx.state.all_services()],
            "policies": [dataclasses.asdict(p) for p in ctx.state.all_policies()],
        })

    async def certs(_request):
        return _json({"certificates": ctx.identities.describe(), "rotations": ctx.identities.rotations})

    async def connections(_request):
        return _json({"connections": ctx.telemetry.live_connections(), "pool": ctx.pool.describe(),
                      "inbound_hbone_sessions": len(ctx.inbound_sessions)})

    web_app = web.Application()
    web_app.add_routes([web.get("/config_dump", config_dump), web.get("/certs", certs),
                        web.get("/connections", connections)])
    return web_app


def metrics_app(app: "ProxyApp") -> web.Application:
    async def metrics(_request):
        return web.Response(body=generate_latest(app.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    web_app = web.Application()
    web_app.add_routes([web.get("/metrics", metrics), web.get("/stats/prometheus", metrics)])
    return web_app


def ready_app(app: "ProxyApp") -> web.Application:
    async def ready(_request):
        if app.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: waiting for the agent's pod snapshot\n")

    web_app = web.Application()
    web_app.add_routes([web.get("/healthz/ready", ready)])
    return web_app

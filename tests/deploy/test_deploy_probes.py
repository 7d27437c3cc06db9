"""HTTP probe paths are served by the components' real HTTP apps (on loopback)."""
from __future__ import annotations

from types import SimpleNamespace

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from tests.deploy.deploybed import containers, find, pod_spec


def http_probes(objects, module):
    for obj, c in containers(objects):
        if c["command"][2] == module:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "httpGet" in (c.get(probe) or {}):
                    yield c[probe]["httpGet"]["path"]


async def get_status(runner: web.AppRunner, path: str) -> int:
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}{path}") as response:
            return response.status


async def test_proxy_readiness_path_is_served(everything):
    import pytest
    ready_app = pytest.importorskip("shoal.agent.ztunnel.admin", reason="node proxy admin not landed").ready_app
    paths = set(http_probes(everything, "shoal.agent.ztunnel")) | set(http_probes(everything, "shoal.waypoint"))
    assert paths == {"/healthz/ready"}
    proxy = SimpleNamespace(ready=False)
    runner = web.AppRunner(ready_app(proxy))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        for path in paths:
            assert await get_status(runner, path) == 503      # before the agent's snapshot
            proxy.ready = True
            assert await get_status(runner, path) == 200
    finally:
        await runner.cleanup()


async def test_controller_probe_path_is_served(rendered):
    from shoal.controller.controlplane import ControlPlane
    (path,) = set(http_probes(rendered, "shoal.controller"))
    plane = SimpleNamespace(metrics=SimpleNamespace(registry=CollectorRegistry()), ready=True,
                            status=lambda: {}, _metrics_runner=None)
    await ControlPlane.start_admin(plane, "127.0.0.1", 0)
    try:
        assert await get_status(plane._metrics_runner, path) == 200
        assert await get_status(plane._metrics_runner, path + "-not") == 404
    finally:
        await plane._metrics_runner.cleanup()
    probe = pod_spec(find(rendered, "Deployment", "shoal-controller"))["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["port"] == 15014

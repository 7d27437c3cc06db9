"""HTTP probe paths are served by the components' real HTTP apps (on loopback)."""
from __future__ import annotations

from types import SimpleNamespace

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from tests.shoal.cli.deploy.deploybed import containers, find, pod_spec


def http_probes(objects, module):
    for _obj, c in containers(objects):
        if c["command"][2] == module:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "httpGet" in (c.get(probe) or {}):
                    yield c[probe]["httpGet"]["path"]


async def get_url(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            return response.status


async def get_status(runner: web.AppRunner, path: str) -> int:
    host, port = runner.addresses[0][:2]
    return await get_url(f"http://{host}:{port}{path}")


async def test_proxy_readiness_path_is_served(everything):
    from shoal.agent.ztunnel.admin import HttpEndpoint, ready_pages
    paths = set(http_probes(everything, "shoal.agent.ztunnel")) | set(http_probes(everything, "shoal.waypoint"))
    assert paths == {"/healthz/ready"}
    proxy = SimpleNamespace(ready=False)
    endpoint = HttpEndpoint(ready_pages(lambda: proxy.ready), on_bad_request=lambda: None)
    await endpoint.start("127.0.0.1", 0)
    port = endpoint.server.sockets[0].getsockname()[1]
    try:
        for path in paths:
            assert await get_url(f"http://127.0.0.1:{port}{path}") == 503      # before the agent's snapshot
            proxy.ready = True
            assert await get_url(f"http://127.0.0.1:{port}{path}") == 200
    finally:
        await endpoint.close()


async def test_controller_probe_path_is_served(rendered):
    from shoal.controller.auth import NodeCredentialAuthenticator
    from shoal.controller.controlplane import serve_admin
    from shoal.credentials import NodeCredentials
    (path,) = set(http_probes(rendered, "shoal.controller"))
    runner = await serve_admin("127.0.0.1", 0, SimpleNamespace(registry=CollectorRegistry()),
                               NodeCredentialAuthenticator(NodeCredentials(bytes(32))),
                               lambda: True, lambda: {})
    try:
        assert await get_status(runner, path) == 200
        assert await get_status(runner, path + "-not") == 404
    finally:
        await runner.cleanup()
    probe = pod_spec(find(rendered, "Deployment", "shoal-controller"))["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["port"] == 15014

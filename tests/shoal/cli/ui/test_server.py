"""The UI server: Hubble-flag filter text, read-only and hardened, the flows API."""
from __future__ import annotations

import time

import pytest

from shoal.cli.ui.feed import FlowFeed
from shoal.cli.ui.server import MAX_FILTER_TERMS, build_app, parse_filter_text
from shoal.flows.filters import FilterError
from tests.shoal.cli.ui.test_graph import endpoint, proxied  # noqa: F401


def test_filter_text_is_hubble_flags():
    allow, deny = parse_filter_text("--namespace demo --not --verdict FORWARDED -t drop --to-pod=demo/db")
    assert allow.namespace == ["demo"] and allow.plain == {"type": ["drop"]}
    assert allow.destination == {"pod": ["demo/db"]}
    assert deny.plain == {"verdict": ["FORWARDED"]}
    for bad in ("--bogus x", "demo", "--namespace", "--not", "'unclosed", " ".join(["-n a"] * (MAX_FILTER_TERMS + 1))):
        with pytest.raises(FilterError):
            parse_filter_text(bad)



@pytest.fixture
async def client(tmp_path):
    import grpc
    from aiohttp.test_utils import TestClient, TestServer

    feed = FlowFeed(lambda: grpc.aio.insecure_channel(f"unix:{tmp_path}/none.sock"))
    feed.add(proxied(40000, time.time_ns()))
    async with TestClient(TestServer(build_app(feed, {"127.0.0.1", "localhost"}), host="127.0.0.1")) as client:
        yield client



async def test_read_only_and_hardened(client):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/", "/api/graph", "/api/flows"):
            response = await client.request(method, path)
            assert response.status == 405, (method, path)
    page = await client.get("/")
    assert page.status == 200
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/static/../server.py", "/static/%2e%2e%2fserver.py", "/static/index.py", "/static/VENDOR.md"):
        assert (await client.get(path)).status == 404, path
    assert (await client.get("/static/cytoscape.min.js")).status == 200
    rebinding = await client.get("/api/graph", headers={"Host": "attacker.example:8089"})
    assert rebinding.status == 421



async def test_flows_api(client):
    body = await (await client.get("/api/flows", params={"filter": "--from-pod demo/client-0"})).json()
    assert len(body["flows"]) == 1 and body["flows"][0]["source"].startswith("demo/client-0")
    assert (await (await client.get("/api/flows", params={"filter": "--to-pod demo/nothing"})).json())["flows"] == []
    bad = await client.get("/api/flows", params={"filter": "--verdict NOPE"})
    assert bad.status == 400 and "unknown verdict" in (await bad.json())["error"]
    assert (await client.get("/api/flows", params={"filter": "-n x " * 2000})).status == 400
    assert (await client.get("/api/flows", params={"after": "x"})).status == 400
    graph = await (await client.get("/api/graph")).json()
    assert graph["relay"]["connected"] is False and graph["namespaces"] == ["demo"]

"""The controller's local API (the CLI's door): bad requests are refused and counted."""
import asyncio

import pytest
from aiohttp import ClientSession, UnixConnector

from shoal.controller.localapi import build_app, serve_unix
from shoal.controller.store import Store


@pytest.fixture
async def api(tmp_path):
    store = Store(tmp_path / "store.db")
    store.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}])
    errors = []
    path = tmp_path / "api.sock"
    runner = await serve_unix(build_app(store, lambda: {"ready": True}, on_error=errors.append), path)
    session = ClientSession(connector=UnixConnector(path=str(path)))
    yield session, store, errors, path
    await session.close()
    await runner.cleanup()
    store.close()


async def test_malformed_requests_are_refused_counted_and_the_api_keeps_serving(api):
    session, store, errors, _ = api
    async with session.post("http://local/apply", data=b"{not json") as resp:
        assert resp.status == 400 and "not JSON" in (await resp.json())["errors"][0]
    async with session.post("http://local/apply", json={"items": []}) as resp:
        assert resp.status == 400 and (await resp.json())["errors"] == ['expected {"objects": [...]}']
    async with session.get("http://local/objects", params={"kind": "Secret"}) as resp:
        assert resp.status == 400
    bad_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "demo"},
               "spec": {"containers": [{"name": "c"}]}}
    async with session.post("http://local/apply", json={"objects": [bad_pod]}) as resp:
        assert resp.status == 422
        assert (await resp.json())["errors"] == [
            "Pod demo/x: spec.containers[0].command: required: the local cluster runs this command in the pod"]
    async with session.post("http://local/delete", json={"objects": [bad_pod]}) as resp:
        assert resp.status == 404
    assert errors == ["bad_request", "bad_request", "bad_request", "invalid_manifest", "invalid_manifest"]
    good = dict(bad_pod, spec={"containers": [{"name": "c", "command": ["sleep", "1"]}]})
    async with session.post("http://local/apply", json={"objects": [good]}) as resp:
        assert resp.status == 200 and (await resp.json())["events"][0]["type"] == "ADDED"
    assert store.get("Pod", "demo", "x")["spec"]["nodeName"] == "node-1"


async def test_the_socket_is_for_root_only_and_garbage_gets_400(api):
    *_, path = api
    assert path.stat().st_mode & 0o777 == 0o600
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"GARBAGE\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.read(100), 5)).split(b" ", 2)[1] == b"400"
    writer.close()

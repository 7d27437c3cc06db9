"""The controller's local API (the CLI's door): bad requests are refused and counted."""
import asyncio
import collections
import copy
import json

import pytest
from aiohttp import ClientSession, UnixConnector

from shoal.controller.localapi import build_app, serve_unix
from shoal.controller.manifests import KINDS
from shoal.controller.store import Store
from shoal.local.demo import demo_objects


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
    assert errors == ["not_json", "bad_request", "unknown_kind", "invalid_manifest", "invalid_manifest"]
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


async def _post(session, path, data):
    async with session.post(f"http://local{path}", data=data,
                            headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def test_non_utf8_body_is_a_400_naming_the_encoding(api):
    session, _, errors, _ = api
    # A UTF-16 BOM: json.loads(bytes) would guess an encoding; the API insists on UTF-8.
    for body in (b'{"objects": [\xff]}', b"\xff\xfe{\x00}\x00"):
        status, answer = await _post(session, "/apply", body)
        assert status == 400 and "utf-8" in answer["errors"][0]
    assert errors == ["not_json", "not_json"]


async def test_deep_nesting_is_a_400_before_any_recursive_code_runs(api):
    session, store, errors, _ = api
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "deep", "namespace": "demo"},
           "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}]}}
    for depth in (100, 100_000):   # past the limit; past the interpreter's recursion limit
        body = ('{"objects": [' + json.dumps(pod)[:-1] + ', "x": ' + "[" * depth + "]" * depth
                + "}]}")
        status, answer = await _post(session, "/apply", body.encode())
        assert status == 400 and answer["errors"] == ["request body nests deeper than 64 levels"]
    assert errors == ["too_deep", "too_deep"] and store.get("Pod", "demo", "deep") is None


async def test_missing_fields_are_named(api):
    session, _, errors, _ = api
    status, answer = await _post(session, "/apply", json.dumps({"objects": [
        {"kind": "Pod", "apiVersion": "v1"},
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "s", "namespace": "demo"}},
        {"metadata": {"name": "x"}}]}).encode())
    assert status == 422
    assert answer["errors"] == [
        "Pod <no name>: metadata: expected a mapping, got NoneType",
        "Service demo/s: spec.ports: expected a non-empty list of ports",
        "document 3: kind: unknown kind None; known: " + ", ".join(sorted(KINDS))]
    assert errors == ["invalid_manifest"]


WRONG_TYPES = (None, 0, True, "x", [], [1], ["x"], {}, {"x": 1}, [[{}]])


def _paths(value, prefix=()):
    """Every path into a JSON document (dict keys and list indexes)."""
    yield prefix
    children = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


def _replaced(doc, path, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


async def test_every_field_of_every_kind_with_a_wrong_type_is_refused_never_a_500(api):
    """Each field of a sample of every kind replaced by each JSON type: the answer is 200
    (still valid), 404 or 422 naming the problem, never an exception (today's 500s were
    AttributeErrors from .get on a string or a list)."""
    session, _, errors, _ = api
    statuses = collections.Counter()
    for sample in _SAMPLES:
        for path in list(_paths(sample)):
            for value in WRONG_TYPES:
                status, answer = await _post(session, "/apply", json.dumps(
                    {"objects": [_replaced(sample, path, value)]}).encode())
                statuses[status] += 1
                assert status in (200, 422), (path, value, status, answer)
                if status == 422:
                    assert answer["errors"] and all(isinstance(e, str) for e in answer["errors"])
    assert statuses[422] > 200 and errors.count("invalid_manifest") == statuses[422]


_SAMPLES = [
    *demo_objects(),
    {"apiVersion": "security.shoal.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "p", "namespace": "demo", "labels": {"a": "b"}},
     "spec": {"action": "ALLOW", "selector": {"matchLabels": {"app": "db"}},
              "rules": [{"from": [{"source": {"principals": ["a"], "ipBlocks": ["10.0.0.0/8"]}}],
                         "to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}],
                         "when": [{"key": "request.headers[x]", "values": ["y"]}]}]}},
    {"apiVersion": "security.shoal.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "t", "namespace": "demo"},
     "spec": {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}], "rules": [{}]}},
    {"apiVersion": "security.shoal.io/v1", "kind": "PeerAuthentication",
     "metadata": {"name": "pa", "namespace": "demo"}, "spec": {"mtls": {"mode": "STRICT"}}},
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
     "metadata": {"name": "waypoint", "namespace": "demo"},
     "spec": {"gatewayClassName": "shoal-waypoint",
              "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
]


async def test_a_pod_mounting_the_mesh_state_is_refused_counted_and_the_launcher_still_may(tmp_path):
    """The attack: a pod that mounts its node's flows folder (hostPath) sends forged L7
    flows to the agent, which trusts that only waypoints reach the socket. Through the API
    (what `shoal apply` uses) every hostPath that reaches the mesh's state is refused; the
    waypoint launcher writes its Deployments into the store directly."""
    state = tmp_path / "run" / "shoal"
    flows = state / "c1" / "node-1" / "flows"
    flows.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(flows)
    store = Store(tmp_path / "store.db")
    store.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}},
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}])
    errors = []
    path = tmp_path / "api.sock"
    runner = await serve_unix(build_app(store, lambda: {}, on_error=errors.append, protected_host_paths=(state,)), path)

    def pod(name, host_path):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "demo"},
                "spec": {"volumes": [{"name": "v", "hostPath": {"path": host_path}}],
                         "containers": [{"name": "c", "command": ["sleep", "inf"],
                                         "volumeMounts": [{"name": "v", "mountPath": "/tmp/v"}]}]}}

    def deployment(name, host_path):
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "demo"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": pod(name, host_path)["spec"]}}}

    try:
        async with ClientSession(connector=UnixConnector(path=str(path))) as session:
            for obj in (pod("evil", str(flows)), pod("parent", "/"), pod("above", str(state.parent)),
                        pod("via-link", str(tmp_path / "link")), deployment("evil-deploy", str(state / "c1"))):
                async with session.post("http://local/apply", json={"objects": [obj]}) as resp:
                    body = await resp.json()
                    assert resp.status == 422 and "reaches the mesh's state" in body["errors"][0], body
            assert errors == ["host_path"] * 5
            assert store.list("Pod", "demo") == [] and store.list("Deployment", "demo") == []
            async with session.post("http://local/apply",
                                    json={"objects": [pod("fine", str(tmp_path / "elsewhere"))]}) as resp:
                assert resp.status == 200, await resp.text()
        store.apply([deployment("waypoint", str(flows))])   # the launcher's path: not the API's
        assert store.list("Deployment", "demo")
    finally:
        await runner.cleanup()
        store.close()

"""The Kubernetes source, with the real kubernetes_asyncio client against a local server
that speaks the list/watch wire protocol (tests/controller/fake_apiserver.py)."""
import asyncio

import pytest
from kubernetes_asyncio import client

from shoal.controller.auth import AuthError, TokenReviewAuthenticator, kubernetes_token_reviewer
from shoal.controller.ca import CertificateAuthority
from shoal.controller.controlplane import ControlPlane
from shoal.controller.model import MeshModel
from shoal.controller.sources import kubernetes as kube
from shoal.controller.sources.kubernetes import KubernetesSource

from .fake_apiserver import FakeApiServer
from .objects import namespace, pod, policy, service

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def apiserver():
    server = await FakeApiServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def api_client(apiserver):
    configuration = client.Configuration(host=apiserver.url)
    api = client.ApiClient(configuration)
    yield api
    await api.close()


@pytest.fixture
def plane(tmp_path):
    from shoal.controller.auth import BootstrapTokenAuthenticator
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    return ControlPlane(MeshModel(), ca, BootstrapTokenAuthenticator("x"))


async def until(predicate, timeout=10, message=lambda: ""):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"condition not reached {message()}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def source(api_client, plane, monkeypatch):
    monkeypatch.setattr(kube, "PAGE_SIZE", 2)   # exercise limit/continue pagination
    src = KubernetesSource(api_client, plane, min_backoff=0.05, max_backoff=0.1, watch_timeout=5)
    task = asyncio.ensure_future(src.run())
    yield src
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def keys(plane):
    return set(plane.model.resources)


async def test_list_then_watch_feeds_the_model(apiserver, plane, api_client, monkeypatch):
    for obj in (namespace("demo"), pod("demo", "web-0", labels={"app": "web"}),
                pod("demo", "web-1", ip="10.244.1.3", labels={"app": "web"}),
                pod("demo", "web-2", ip="10.244.1.4", labels={"app": "web"}),
                service("demo", "web", {"app": "web"}),
                policy("demo", "allow-web", selector={"app": "web"})):
        apiserver.put(obj)
    monkeypatch.setattr(kube, "PAGE_SIZE", 2)
    src = KubernetesSource(api_client, plane, min_backoff=0.05, watch_timeout=5)
    task = asyncio.ensure_future(src.run())
    try:
        await until(lambda: plane.ready is False and "Pod" not in src._unsynced)
        await until(lambda: not src._unsynced)
        assert {"workload/demo/web-0", "workload/demo/web-2", "service/demo/web",
                "authorization/demo/allow-web"} <= keys(plane)
        assert any("continue=" in r for r in apiserver.requests)   # paginated
        assert plane.model.resources["workload/demo/web-0"].resource.meshed
        # Watch events: a new pod, a modified namespace, a deleted pod.
        apiserver.put(pod("demo", "web-3", ip="10.244.1.5", labels={"app": "web"}))
        apiserver.delete("Pod", "demo", "web-1")
        apiserver.put(namespace("demo", meshed=False))
        await until(lambda: "workload/demo/web-3" in keys(plane)
                    and "workload/demo/web-1" not in keys(plane)
                    and not plane.model.resources["workload/demo/web-3"].resource.meshed)
        endpoints = plane.model.resources["service/demo/web"].resource.endpoints
        assert endpoints == ("demo/web-0", "demo/web-2", "demo/web-3")
        assert any("allowwatchbookmarks=true" in r.lower() for r in apiserver.requests)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_bookmarks_advance_and_streams_resume(apiserver, plane, source):
    apiserver.put(namespace("demo"))
    await until(lambda: "Namespace" not in source._unsynced and source.resource_versions.get("Pod"))
    await until(lambda: len(apiserver.watchers) == len(source.clients))
    apiserver.put(pod("demo", "unrelated", ip="10.244.1.9"))   # moves the global version
    apiserver.bookmark()
    await until(lambda: source.resource_versions["Namespace"] == str(apiserver.rv))
    # The server ends every stream (timeout): the source resumes from the bookmark, no relist.
    apiserver.end_watches()
    apiserver.put(pod("demo", "after", ip="10.244.1.10"))
    await until(lambda: "workload/demo/after" in keys(plane))
    assert sum(source.relists.values()) == 0


async def test_410_gone_triggers_a_relist_that_catches_deletions(apiserver, plane, source):
    apiserver.put(namespace("demo"))
    apiserver.put(pod("demo", "doomed"))
    apiserver.put(pod("demo", "kept", ip="10.244.1.3"))
    await until(lambda: {"workload/demo/doomed", "workload/demo/kept"} <= keys(plane))
    await until(lambda: len(apiserver.watchers) == len(source.clients))
    # While the watches are down, a pod is deleted and the history is compacted.
    apiserver.watchers_snapshot = list(apiserver.watchers)
    apiserver.end_watches()
    apiserver.delete("Pod", "demo", "doomed")
    apiserver.put(pod("demo", "new", ip="10.244.1.4"))
    apiserver.compact()
    await until(lambda: source.relists["Pod"] >= 1)
    await until(lambda: "workload/demo/doomed" not in keys(plane)
                and "workload/demo/new" in keys(plane))
    assert plane.metrics.source_errors.labels("kubernetes", "Pod")._value.get() >= 1


async def test_missing_crd_does_not_block_other_kinds(plane, api_client):
    server = await FakeApiServer(missing_kinds={"TrafficPolicy"}).start()
    api = client.ApiClient(client.Configuration(host=server.url))
    server.put(namespace("demo"))
    server.put(pod("demo", "web-0"))
    src = KubernetesSource(api, plane, min_backoff=0.05, max_backoff=0.1, watch_timeout=5)
    task = asyncio.ensure_future(src.run())
    try:
        await until(lambda: "workload/demo/web-0" in keys(plane))
        await until(lambda: src._unsynced == {"TrafficPolicy"}, message=lambda: src._unsynced)
        await asyncio.sleep(0.3)   # retries keep failing; readiness waits for every kind
        assert src._unsynced == {"TrafficPolicy"} and not plane.ready
        assert plane.metrics.source_errors.labels("kubernetes", "TrafficPolicy")._value.get() >= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()
        await server.stop()


async def test_token_review_authenticates_nodes(apiserver, api_client):
    apiserver.tokens["agent-token"] = {
        "username": "system:serviceaccount:shoal-system:shoal-agent",
        "extra": {"authentication.kubernetes.io/node-name": ["node-7"]}}
    apiserver.tokens["pod-bound"] = {
        "username": "system:serviceaccount:shoal-system:shoal-agent",
        "extra": {"authentication.kubernetes.io/pod-name": ["shoal-agent-xyz"]}}
    apiserver.tokens["someone-else"] = {"username": "system:serviceaccount:demo:web"}
    pods = {("shoal-system", "shoal-agent-xyz"): "node-3"}
    auth = TokenReviewAuthenticator(kubernetes_token_reviewer(api_client),
                                    ["shoal-system/shoal-agent"],
                                    lambda ns, name: pods.get((ns, name)))

    def md(token):
        return (("authorization", f"Bearer {token}"), ("x-shoal-node", "node-1"))

    assert await auth.authenticate(md("agent-token")) == "node-7"   # not the claimed node-1
    assert await auth.authenticate(md("pod-bound")) == "node-3"
    with pytest.raises(AuthError, match="not an agent"):
        await auth.authenticate(md("someone-else"))
    with pytest.raises(AuthError, match="invalid bearer token"):
        await auth.authenticate(md("forged"))
    with pytest.raises(AuthError, match="Bearer"):
        await auth.authenticate((("x-shoal-node", "node-1"),))

"""The Kubernetes source, with the real kubernetes_asyncio client against a local server
that speaks the list/watch wire protocol (tests/controller/fake_apiserver.py)."""
import asyncio
import base64
import copy
import re

import pytest
from kubernetes_asyncio import client

from shoal.controller.auth import (
    AuthError,
    AuthUnavailable,
    TokenReviewAuthenticator,
    kubernetes_pod_lookup,
    kubernetes_token_reviewer,
)
from shoal.controller.ca import CertificateAuthority
from shoal.controller.controlplane import ControlPlane
from shoal.controller.model import MeshModel
from shoal.controller.sources import kubernetes as kube
from shoal.controller.sources.kubernetes import KubernetesSource
from tests.conftest import until
from tests.controller.fake_apiserver import FakeApiServer
from tests.controller.objects import namespace, pod, policy, service

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
    from shoal.controller.auth import NodeCredentialAuthenticator
    from shoal.credentials import NodeCredentials
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    return ControlPlane(MeshModel(), ca, NodeCredentialAuthenticator(NodeCredentials(bytes(32))))



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
        await until(lambda: src._unsynced == {"TrafficPolicy"}, what=lambda: f"sync; unsynced: {src._unsynced}")
        await asyncio.sleep(0.3)   # retries keep failing; readiness waits for every kind
        assert src._unsynced == {"TrafficPolicy"} and not plane.ready
        assert plane.metrics.source_errors.labels("kubernetes", "TrafficPolicy")._value.get() >= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()
        await server.stop()


def agent_pod(name, node):
    obj = pod("shoal-system", name, node=node, ip=f"192.168.0.{node[-1]}", sa="shoal-agent")
    obj["metadata"]["labels"] = {"app.kubernetes.io/name": "shoal-agent"}
    return obj


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


async def test_token_review_binds_the_node_to_the_tokens_pod(apiserver, api_client):
    """The node is the spec.nodeName of the pod the token is bound to, read from the API
    server; nothing the caller declares counts."""
    apiserver.put(agent_pod("shoal-agent-a", "node-3"))
    auth = TokenReviewAuthenticator(kubernetes_token_reviewer(api_client, ["shoal"]),
                                    ["shoal-system/shoal-agent"], kubernetes_pod_lookup(api_client),
                                    ["shoal"])
    token = apiserver.pod_token("shoal-system", "shoal-agent-a")
    assert await auth.authenticate(bearer(token)) == "node-3"
    assert apiserver.reviews[-1]["audiences"] == ["shoal"]
    assert "/api/v1/namespaces/shoal-system/pods/shoal-agent-a" in apiserver.requests


@pytest.mark.parametrize("case, reason, message", [
    ("no credential", "no_credential", "missing 'authorization: Bearer"),
    ("forged", "rejected", "invalid bearer token"),
    ("expired", "expired", "token is expired"),
    ("wrong audience", "rejected", "invalid for the target audiences"),
    ("legacy token", "rejected", "invalid for the target audiences"),
    ("deleted pod", "rejected", 'pods "shoal-agent-a" not found'),
    ("recreated pod", "rejected", "does not match the UID"),
    ("another account", "not_agent", "is not an agent service account"),
    ("unbound", "not_pod_bound", "not bound to a pod"),
    ("review without audiences", "wrong_audience", "not meant for audience"),
    ("pod gone since review", "pod_gone", "no longer exists"),
    ("other node claimed", "node_mismatch", "names node 'node-9'"),
])
async def test_token_review_refusals(apiserver, api_client, case, reason, message):
    """Each bad token is refused with a reason (the metric label) and a clear message."""
    apiserver.put(agent_pod("shoal-agent-a", "node-3"))
    apiserver.put(pod("demo", "web-0", sa="web"))
    review = kubernetes_token_reviewer(api_client, ["shoal"])
    lookup = kubernetes_pod_lookup(api_client)
    metadata = bearer(apiserver.pod_token("shoal-system", "shoal-agent-a"))
    if case == "no credential":
        metadata = ()
    elif case == "forged":
        metadata = bearer("fake-jwt.forged")
    elif case == "expired":
        metadata = bearer(apiserver.pod_token("shoal-system", "shoal-agent-a", expires_in=-1))
    elif case == "wrong audience":
        metadata = bearer(apiserver.pod_token("shoal-system", "shoal-agent-a",
                                              audiences=["https://kubernetes.default.svc"]))
    elif case == "legacy token":
        apiserver.tokens["legacy"] = {"username": "system:serviceaccount:shoal-system:shoal-agent"}
        metadata = bearer("legacy")
    elif case == "deleted pod":
        apiserver.delete("Pod", "shoal-system", "shoal-agent-a")
    elif case == "recreated pod":
        apiserver.delete("Pod", "shoal-system", "shoal-agent-a")
        apiserver.put(agent_pod("shoal-agent-a", "node-4"))
    elif case == "another account":
        metadata = bearer(apiserver.pod_token("demo", "web-0", service_account="demo/web"))
    elif case == "unbound":
        apiserver.tokens["unbound"] = {"username": "system:serviceaccount:shoal-system:shoal-agent"}
        apiserver.bound["unbound"] = {"audiences": ["shoal"], "expires": 1e12,
                                      "pod": ("shoal-system", "shoal-agent-a",
                                              apiserver.objects["Pod"][("shoal-system", "shoal-agent-a")]["metadata"]["uid"])}
        metadata = bearer("unbound")
    elif case == "review without audiences":   # an API server that ignores spec.audiences
        reviewed = review

        async def review(token):
            return {**await reviewed(token), "audiences": []}
    elif case == "pod gone since review":
        async def lookup(namespace, name):
            return None
    elif case == "other node claimed":
        token = metadata[0][1].split()[1]
        apiserver.tokens[token]["extra"]["authentication.kubernetes.io/node-name"] = ["node-9"]
    auth = TokenReviewAuthenticator(review, ["shoal-system/shoal-agent"], lookup, ["shoal"])
    with pytest.raises(AuthError, match=re.escape(message)) as refused:
        await auth.authenticate(metadata)
    assert refused.value.reason == reason


async def test_token_review_unreachable_api_server_is_unavailable_not_a_crash(api_client, apiserver):
    await apiserver.stop()
    auth = TokenReviewAuthenticator(kubernetes_token_reviewer(api_client, ["shoal"]),
                                    ["shoal-system/shoal-agent"], kubernetes_pod_lookup(api_client),
                                    ["shoal"])
    with pytest.raises(AuthUnavailable, match="TokenReview failed"):
        await auth.authenticate(bearer("anything"))


def _ca_files(tmp_path, name, trust_domain="cluster.local"):
    CertificateAuthority.load_or_create(tmp_path / name, trust_domain)
    return {f: (tmp_path / name / f).read_bytes() for f in ("ca-cert.pem", "ca-key.pem", "root-cert.pem")}


def _secret(files):
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "shoal-ca", "namespace": "shoal-system", "resourceVersion": "1"},
            "data": {k: v if isinstance(v, str) else base64.b64encode(v).decode()
                     for k, v in files.items()}}


@pytest.mark.parametrize("damage, message", [
    (lambda good, other: {"ca-cert.pem": good["ca-cert.pem"]}, "missing ca-key.pem"),
    (lambda good, other: {**good, "ca-key.pem": "not base64!"}, "ca-key.pem is not base64"),
    (lambda good, other: {**good, "ca-cert.pem": b"-----BEGIN CERTIFICATE-----\ngarbage\n"
                                                 b"-----END CERTIFICATE-----\n"}, "Secret shoal-system/shoal-ca: "),
    (lambda good, other: {**good, "ca-key.pem": other["ca-key.pem"]}, "ca-key.pem is not the key of ca-cert.pem"),
    (lambda good, other: {**other, "root-cert.pem": good["root-cert.pem"]}, "does not chain to root-cert.pem"),
    (lambda good, other: None, "trust domain 'example.org', not 'cluster.local'"),
])
async def test_a_corrupt_or_foreign_ca_secret_stops_the_controller_naming_it(
        apiserver, api_client, tmp_path, damage, message):
    """Never a silent new root: the error names the Secret and what is wrong, and the
    Secret is left as it was."""
    from shoal.controller.kubestate import CASecretError, KubernetesState

    good, other = _ca_files(tmp_path, "good"), _ca_files(tmp_path, "other")
    files = damage(good, other)
    if files is None:
        files = _ca_files(tmp_path, "foreign", trust_domain="example.org")
    apiserver.stored[("secrets", "shoal-system", "shoal-ca")] = _secret(files)
    before = copy.deepcopy(apiserver.stored[("secrets", "shoal-system", "shoal-ca")])
    state = KubernetesState(api_client)
    with pytest.raises(CASecretError) as refused:
        await state.load_ca(tmp_path / "ca", "cluster.local")
    text = str(refused.value)
    assert "Secret shoal-system/shoal-ca: " in text and message in text, text
    assert "Refusing to start" in text
    assert apiserver.stored[("secrets", "shoal-system", "shoal-ca")] == before


async def test_the_ca_secret_is_reused_not_regenerated(apiserver, api_client, tmp_path):
    from shoal.controller.kubestate import KubernetesState

    first = await KubernetesState(api_client).load_ca(tmp_path / "a", "cluster.local")
    second = await KubernetesState(api_client).load_ca(tmp_path / "b", "cluster.local")
    assert first.roots_pem == second.roots_pem

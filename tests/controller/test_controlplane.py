"""The control plane over real gRPC on loopback, driven by the real ConfigClient."""
import asyncio

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shoal.api import config_pb2 as pb
from shoal.api import config_pb2_grpc as pb_grpc
from shoal.controller.auth import NodeCredentialAuthenticator
from shoal.controller.ca import CertificateAuthority
from shoal.controller.controlplane import ControlPlane
from shoal.controller.identity import IdentityAllocator
from shoal.controller.model import MeshModel
from shoal.credentials import NodeCredentials
from shoal.xds import model as m
from shoal.xds.client import ConfigClient
from shoal.xds.state import ConfigState

from .objects import added, namespace, pod, policy, service

CREDENTIALS = NodeCredentials(b"test-cluster-key" * 2)
WEB = "spiffe://cluster.local/ns/demo/sa/web"
DB = "spiffe://cluster.local/ns/demo/sa/db"

pytestmark = pytest.mark.timeout(60)


def demo_objects():
    return added(namespace("demo"),
                 pod("demo", "web-0", node="node-1", sa="web", labels={"app": "web"}),
                 pod("demo", "db-0", node="node-2", ip="10.244.2.2", sa="db", labels={"app": "db"}),
                 service("demo", "web", {"app": "web"}),
                 policy("demo", "web-policy", selector={"app": "web"}))


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")


async def start_plane(ca, tmp_path, objects=None, port=0):
    plane = ControlPlane(MeshModel(IdentityAllocator(tmp_path / "identities")), ca,
                         NodeCredentialAuthenticator(CREDENTIALS))
    plane.apply(objects if objects is not None else demo_objects())
    await plane.start(f"127.0.0.1:{port}")
    return plane


@pytest.fixture
async def plane(ca, tmp_path):
    plane = await start_plane(ca, tmp_path)
    yield plane
    await plane.stop(0)


class Node:
    """A ConfigClient running in the background, as an agent would run it."""

    def __init__(self, port, name, component="proxy", token=None, validator=None):
        self.state = ConfigState()
        self.deltas = []
        self.state.subscribe(self.deltas.append)
        self.client = ConfigClient(f"127.0.0.1:{port}", name, token or CREDENTIALS.issue(name),
                                   self.state,
                                   component=component, validator=validator,
                                   min_backoff=0.05, max_backoff=0.2)
        self.task = asyncio.ensure_future(self.client.run())

    async def until(self, predicate, timeout=10):
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached"
            await asyncio.sleep(0.01)

    async def close(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


@pytest.fixture
async def nodes(plane):
    started = []

    def start(name, **kw):
        node = Node(plane.port, name, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        await node.close()


def acked(plane, node_name, version=None):
    version = version or str(plane.model.generation)
    return any(a["node"] == node_name and a["version"] == version and a["in_flight"] == 0
               for a in plane.status()["agents"])


async def test_full_sync_incremental_change_and_status(plane, nodes):
    n1, n2 = nodes("node-1"), nodes("node-2")
    await n1.client.synced.wait()
    await n2.client.synced.wait()
    for n in (n1, n2):
        assert {w.uid for w in n.state.all_workloads()} == {"demo/web-0", "demo/db-0"}
        assert n.state.service_by_vip("10.96.0.10").endpoints == ("demo/web-0",)
    # The web policy selects only a workload on node-1.
    assert [p.name for p in n1.state.all_policies()] == ["web-policy"]
    assert n2.state.all_policies() == []
    await n1.until(lambda: acked(plane, "node-1") and acked(plane, "node-2"))
    # One pod change reaches both nodes as a one-resource delta.
    plane.apply(added(pod("demo", "web-1", node="node-2", ip="10.244.2.3", sa="web",
                          labels={"app": "web"})))
    await n2.until(lambda: n2.state.workload_by_ip("10.244.2.3") is not None)
    await n1.until(lambda: n1.state.service("demo", "web").endpoints == ("demo/web-0", "demo/web-1"))
    # node-2 now runs a web pod, so it receives the web policy; node-1 keeps it.
    await n2.until(lambda: [p.name for p in n2.state.all_policies()] == ["web-policy"])
    assert n1.state.policies_for(n1.state.workload("demo/web-0"))[0].name == "web-policy"
    await n1.until(lambda: acked(plane, "node-1") and acked(plane, "node-2"))
    # A change that concerns only node-2 (a policy selecting db): node-1 gets no push but
    # is in sync with the new version too.
    pushes_before = plane.metrics.pushes.labels("proxy")._value.get()
    plane.apply(added(policy("demo", "db-policy", selector={"app": "db"})))
    await n2.until(lambda: n2.state.policies_for(n2.state.workload("demo/db-0")))
    await n1.until(lambda: acked(plane, "node-1") and acked(plane, "node-2"))
    assert plane.metrics.pushes.labels("proxy")._value.get() == pushes_before + 1
    assert [p.name for p in n1.state.all_policies()] == ["web-policy"]
    status = plane.status()
    assert plane.distributor.agent_hosts() == {}   # proxies are not agents
    assert {a["node"] for a in status["agents"]} == {"node-1", "node-2"}
    assert {a["version"] for a in status["agents"]} == {status["version"]}
    assert all(a["synced"] for a in status["agents"])
    assert n2.state.version == status["version"]   # node-1 needed no push for it


async def test_status_names_build_versions_stale_and_disconnected_components(plane, nodes, monkeypatch):
    from shoal import __version__
    from shoal.controller import distribution
    monkeypatch.setattr(distribution, "STALE_AFTER_SECONDS", 0.5)
    good = nodes("node-1")
    await good.until(lambda: acked(plane, "node-1"))
    # A client that says hello (as an older build: no version) and then never ACKs.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        call = pb_grpc.ConfigDiscoveryStub(channel).StreamConfig(
            metadata=(("authorization", f"Bearer {CREDENTIALS.issue('node-2')}"),))
        await call.write(pb.DeltaRequest(node="node-2", component="agent"))
        await call.read()                      # the first push, left unanswered

        def by_node():
            return {(a["node"], a["component"]): a for a in plane.status()["agents"]}
        await good.until(lambda: by_node().get(("node-2", "agent"), {}).get("health") == "stale")
        silent, healthy = by_node()[("node-2", "agent")], by_node()[("node-1", "proxy")]
        assert silent["build_version"] == "unknown" and not silent["synced"]
        assert silent["unanswered_for"] >= 0.5
        assert healthy["build_version"] == __version__ and healthy["health"] == "healthy"
        assert plane.status()["build_version"] == __version__
        call.cancel()
    await good.until(lambda: by_node().get(("node-2", "agent"), {}).get("health") == "disconnected")
    gone = by_node()[("node-2", "agent")]
    assert gone["connected"] is False and not gone["synced"] and gone["disconnected_at"] > 0
    # It comes back: connected again, and listed once.
    back = nodes("node-2", component="agent")
    await back.until(lambda: by_node()[("node-2", "agent")]["health"] == "healthy")
    assert [(a["node"], a["component"]) for a in plane.status()["agents"]].count(("node-2", "agent")) == 1


async def test_a_departed_waypoint_is_dropped_a_departed_proxy_is_kept(plane):
    from shoal.controller.distribution import Connection
    from shoal.xds.delta import DeltaSender
    for node, component in (("waypoint-demo.waypoint", "waypoint"), ("node-9", "proxy")):
        plane.distributor._remember_departed(Connection(
            node=node, component=component, peer="ipv4:127.0.0.1:1",
            sender=DeltaSender(node=node, component=component, build_version="0.0.9")))
    assert [(a["node"], a["health"], a["build_version"]) for a in plane.status()["agents"]] == [
        ("node-9", "disconnected", "0.0.9")]


async def test_resume_after_controller_restart_sends_only_changes(ca, tmp_path):
    plane = await start_plane(ca, tmp_path)
    port = plane.port
    node = Node(port, "node-1")
    try:
        await node.client.synced.wait()
        assert len(node.state.all_workloads()) == 2
        await plane.stop(0)
        await node.until(lambda: not node.client.connected)
        node.client.synced.clear()
        before = len(node.deltas)
        # The data path keeps its config while the controller is away.
        assert node.state.workload("demo/web-0") is not None
        # Restarted with one pod changed and one deleted meanwhile.
        objs = demo_objects()
        objs = [(e, o) for e, o in objs if o["metadata"]["name"] != "db-0"]
        objs += added(pod("demo", "web-0", node="node-1", ip="10.244.1.99", sa="web",
                          labels={"app": "web"}))
        plane = await start_plane(ca, tmp_path, objs, port=port)
        await node.client.synced.wait()
        resumed = node.deltas[before]
        assert {m.resource_key(r) for r in resumed.upserted} == {"workload/demo/web-0"}
        assert resumed.removed == ("workload/demo/db-0",)
        assert node.state.workload_by_ip("10.244.1.99").uid == "demo/web-0"
    finally:
        await node.close()
        await plane.stop(0)


async def test_nack_is_reported_and_other_resources_apply(plane, nodes):
    def refuse_db(resource):
        if isinstance(resource, m.Workload) and resource.name == "db-0":
            raise ValueError("db-0 is not welcome")

    node = nodes("node-1", validator=refuse_db)
    await node.client.synced.wait()
    assert node.state.workload("demo/db-0") is None and node.state.workload("demo/web-0")
    await node.until(lambda: plane.status()["agents"] and
                     plane.status()["agents"][0]["last_nack"] is not None)
    nack = plane.status()["agents"][0]["last_nack"]
    assert "db-0 is not welcome" in nack["message"]
    assert nack["rejected"] == ["workload/demo/db-0"]
    assert plane.metrics.rejects.labels("proxy")._value.get() == 1


async def test_bad_token_and_malformed_messages_are_refused_others_continue(plane, nodes):
    good = nodes("node-1")
    await good.client.synced.wait()
    # A wrong token: refused and counted.
    bad = nodes("node-2", token="wrong")
    await bad.until(lambda: plane.metrics.auth_failures.labels(
        "StreamConfig", "bad_credential")._value.get() >= 1)
    assert not bad.client.synced.is_set()
    # Garbage bytes on the stream.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        call = channel.stream_stream("/shoal.config.v1.ConfigDiscovery/StreamConfig",
                                     request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(
            iter([b"\xff\xff\xff\xff"]),
            metadata=(("authorization", f"Bearer {CREDENTIALS.issue('node-2')}"),))
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass
        # A hello naming another node than the one authenticated.
        stub = channel.stream_stream("/shoal.config.v1.ConfigDiscovery/StreamConfig",
                                     request_serializer=pb.DeltaRequest.SerializeToString,
                                     response_deserializer=pb.DeltaResponse.FromString)
        call = stub(iter([pb.DeltaRequest(node="node-1", component="proxy")]),
                    metadata=(("authorization", f"Bearer {CREDENTIALS.issue('node-2')}"),))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert plane.metrics.bad_requests.labels("StreamConfig")._value.get() >= 2
    # The good node still receives changes.
    plane.apply(added(pod("demo", "late-0", ip="10.244.1.77")))
    await good.until(lambda: good.state.workload_by_ip("10.244.1.77") is not None)


def make_csr(spiffe_id, key=None, ca_bit=False, extra_dns=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    names = [x509.UniformResourceIdentifier(spiffe_id)]
    if extra_dns:
        names.append(x509.DNSName(extra_dns))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])) \
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
    if ca_bit:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def test_certificates_only_for_identities_on_the_node(plane, nodes):
    node1 = nodes("node-1")
    chain_pem, roots_pem = await node1.client.sign_certificate(make_csr(WEB))
    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 24 * 3600 <= lifetime.total_seconds() <= 24 * 3600 + 600
    root = x509.load_pem_x509_certificates(roots_pem.encode())[0]
    leaf.verify_directly_issued_by(root)
    assert await node1.client.trust_bundle() == roots_pem
    # db only runs on node-2: node-1 is refused, node-2 is served.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node1.client.sign_certificate(make_csr(DB))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await nodes("node-2").client.sign_certificate(make_csr(DB), ttl_seconds=3600)
    assert plane.metrics.certs_issued._value.get() == 2
    assert plane.metrics.cert_errors.labels("not_on_node")._value.get() == 1


@pytest.mark.parametrize("csr, message", [
    (lambda: make_csr(WEB, ca_bit=True), "CA certificate"),
    (lambda: make_csr(WEB, extra_dns="evil.example"), "SAN must be exactly"),
    (lambda: make_csr(WEB, key=rsa.generate_private_key(65537, 1024)), "1024 bits"),
    (lambda: make_csr(WEB, key=ec.generate_private_key(ec.SECP521R1())), "not allowed"),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nbm9wZQ==\n-----END CERTIFICATE REQUEST-----\n",
     "not a PEM certificate request"),
])
async def test_bad_csrs_are_refused_with_a_reason(plane, nodes, csr, message):
    node1 = nodes("node-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node1.client.sign_certificate(csr(), spiffe_id=WEB)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert plane.metrics.cert_errors.labels("bad_csr")._value.get() == 1


def test_ca_persists_and_accepts_a_plugged_in_intermediate(tmp_path):
    first = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    again = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    assert first.roots_pem == again.roots_pem
    assert oct((tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    # A user-supplied intermediate under that root: leaves chain through it.
    key = ec.generate_private_key(ec.SECP256R1())
    root_key = serialization.load_pem_private_key((tmp_path / "ca" / "ca-key.pem").read_bytes(), None)
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc)
    inter = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inter")]))
             .issuer_name(first.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(root_key, hashes.SHA256()))
    plugged = tmp_path / "plugged"
    plugged.mkdir()
    pem = serialization.Encoding.PEM
    (plugged / "ca-cert.pem").write_bytes(inter.public_bytes(pem))
    (plugged / "ca-key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (plugged / "root-cert.pem").write_text(first.roots_pem)
    (plugged / "cert-chain.pem").write_bytes(inter.public_bytes(pem))
    ca = CertificateAuthority.load_or_create(plugged, "cluster.local")
    signed = ca.sign(make_csr(WEB), WEB)
    chain = x509.load_pem_x509_certificates(signed.chain_pem.encode())
    assert [c.subject for c in chain] == [x509.Name([]), inter.subject]
    chain[0].verify_directly_issued_by(inter)
    chain[1].verify_directly_issued_by(first.cert)
    assert signed.not_after <= inter.not_valid_after_utc


async def test_tls_stream_verified_with_the_trust_bundle(ca, tmp_path):
    plane = ControlPlane(MeshModel(), ca, NodeCredentialAuthenticator(CREDENTIALS))
    plane.apply(demo_objects())
    port = await plane.start("127.0.0.1:0", tls_names=["127.0.0.1", "shoal-controller"])
    bundle = tmp_path / "root-cert.pem"
    bundle.write_text(ca.roots_pem)
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca", "cluster.local")
    wrong = tmp_path / "wrong-root.pem"
    wrong.write_text(other.roots_pem)
    clients = []
    try:
        def client(**kw):
            c = ConfigClient(f"127.0.0.1:{port}", "node-1", CREDENTIALS.issue("node-1"), ConfigState(), component="proxy",
                             min_backoff=0.05, max_backoff=0.1, **kw)
            clients.append((c, asyncio.ensure_future(c.run())))
            return c

        good = client(ca_bundle=bundle)
        named = client(ca_bundle=bundle, server_name="shoal-controller")
        await asyncio.wait_for(good.synced.wait(), 10)
        await asyncio.wait_for(named.synced.wait(), 10)
        assert good.state.workload("demo/web-0") is not None
        chain, _ = await good.sign_certificate(make_csr(WEB))
        assert "BEGIN CERTIFICATE" in chain
        impostor = client(ca_bundle=wrong)         # does not trust this controller
        plaintext = client()                       # does not speak TLS
        missing = client(ca_bundle=tmp_path / "absent.pem")
        await asyncio.sleep(0.5)
        assert not impostor.synced.is_set() and not plaintext.synced.is_set()
        assert not missing.synced.is_set() and missing.reconnects >= 1
    finally:
        for c, task in clients:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await c.close()
        await plane.stop(0)


async def test_agent_hosts_feed_relay_discovery(plane, nodes):
    agent = nodes("node-1", component="agent")
    await agent.client.synced.wait()
    assert plane.distributor.agent_hosts() == {"node-1": "127.0.0.1"}


async def test_node_1s_credential_never_obtains_node_2s_identities(plane):
    """The node is the one the credential names: no header, hello or forged MAC changes it
    (before: the shared token + a self-declared ``x-shoal-node: node-2`` got db's cert)."""
    node1_token = CREDENTIALS.issue("node-1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        sign = channel.unary_unary("/shoal.config.v1.CertificateAuthority/SignCertificate",
                                   request_serializer=pb.CertificateRequest.SerializeToString,
                                   response_deserializer=pb.CertificateResponse.FromString)
        request = pb.CertificateRequest(csr_pem=make_csr(DB), spiffe_id=DB)
        # node-1's credential with every way of claiming node-2: still node-1.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await sign(request, metadata=(("authorization", f"Bearer {node1_token}"),
                                          ("x-shoal-node", "node-2")))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node node-1" in err.value.details()
        # A credential for node-2 made by splicing node-1's MAC, or with another key.
        forged = [node1_token.replace("node-1", "node-2"),
                  NodeCredentials(b"another-cluster-key" * 2).issue("node-2")]
        for token in forged:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await sign(request, metadata=(("authorization", f"Bearer {token}"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "not issued by this cluster" in err.value.details()
    assert plane.metrics.certs_issued._value.get() == 0
    assert plane.metrics.auth_failures.labels("SignCertificate", "bad_credential")._value.get() == 2
    assert plane.metrics.cert_errors.labels("not_on_node")._value.get() == 1


async def test_requests_are_refused_by_size_per_method_and_unauthenticated_unread(plane):
    """No credential: refused on the metadata, the body never decoded (not counted as a bad
    request). With a credential: a CSR past 16 KiB and any message past the server's limit
    are refused without reaching protobuf."""
    token = CREDENTIALS.issue("node-1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        raw = channel.unary_unary("/shoal.config.v1.CertificateAuthority/SignCertificate",
                                  request_serializer=lambda b: b,
                                  response_deserializer=pb.CertificateResponse.FromString)
        big = pb.CertificateRequest(csr_pem="A" * (12 << 20)).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(big, timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert plane.metrics.auth_failures.labels("SignCertificate", "no_credential")._value.get() == 1
        assert plane.metrics.bad_requests.labels("SignCertificate")._value.get() == 0
        authed = (("authorization", f"Bearer {token}"),)
        with pytest.raises(grpc.aio.AioRpcError) as err:   # past MAX_REQUEST_BYTES: gRPC's own
            await raw(big, metadata=authed, timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        csr = pb.CertificateRequest(csr_pem="A" * (64 << 10)).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as err:   # past the CSR limit: ours
            await raw(csr, metadata=authed, timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds this method's limit of 17408 bytes" in err.value.details()
        assert plane.metrics.bad_requests.labels("SignCertificate")._value.get() == 1
        assert plane.metrics.cert_errors.labels("too_large")._value.get() == 1
        # The same channel still works for a proper request.
        stub = channel.unary_unary("/shoal.config.v1.CertificateAuthority/SignCertificate",
                                   request_serializer=pb.CertificateRequest.SerializeToString,
                                   response_deserializer=pb.CertificateResponse.FromString)
        reply = await stub(pb.CertificateRequest(csr_pem=make_csr(WEB)), metadata=authed)
        assert "BEGIN CERTIFICATE" in reply.cert_chain_pem


async def test_a_standby_plane_streams_config_but_signs_nothing_until_it_leads(ca, tmp_path):
    """A standby's plane (following allocator, not issuing) over real gRPC: the stream
    carries what the leader numbered; a CSR gets UNAVAILABLE with the refusal's text
    (retried by the client, then raised), counted, nothing issued. ``lead()`` numbers and
    saves what was withheld, and signing starts."""
    refusal = ["replica b is a standby: certificates are issued only by the leader a"]
    identities = IdentityAllocator(None, external=True, following=True)
    identities.restore([(500, "demo", "web")])
    plane = ControlPlane(MeshModel(identities), ca, NodeCredentialAuthenticator(CREDENTIALS),
                         not_issuing=lambda: refusal[0])
    plane.apply(demo_objects())
    await plane.start("127.0.0.1:0")
    node = Node(plane.port, "node-2")
    try:
        await node.client.synced.wait()
        assert {w.uid: w.identity for w in node.state.all_workloads()} == {"demo/web-0": 500}
        assert await node.client.trust_bundle() == ca.roots_pem
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.client.sign_certificate(make_csr(DB))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == refusal[0]
        assert plane.metrics.cert_errors.labels("not_leader")._value.get() == 3   # 3 attempts
        assert plane.metrics.certs_issued._value.get() == 0

        saved = []

        async def persist(allocations):
            saved.extend(allocations)
        refusal[0] = None
        change = await plane.lead([(500, "demo", "web"), (501, "demo", "api")], persist)
        assert change.keys == {"workload/demo/db-0"} and saved == [(502, "demo", "db")]
        await node.until(lambda: node.state.workload("demo/db-0") is not None)
        assert node.state.workload("demo/db-0").identity == 502
        await node.client.sign_certificate(make_csr(DB))
        assert plane.metrics.certs_issued._value.get() == 1
    finally:
        await node.close()
        await plane.stop(0)

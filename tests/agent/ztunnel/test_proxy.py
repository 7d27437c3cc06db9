"""The node proxy end to end on real namespaces: in-pod listeners, HBONE mTLS, authz,
telemetry, and the attacks of issue 4's "bad input" list. No eBPF: the test plays the
agent (ZDS adds, and the original-destination lookup)."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from shoal.agent.ztunnel.app import ProxyApp
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.config import ClusterLayout
from shoal.hbone.handshakes import HandshakeLimits
from shoal.hbone.issuer import make_csr
from shoal.xds.model import Authorization, ConfigDelta, Rule, Service, ServicePort, Source
from shoal.zds import PodInfo, ZdsClient
from tests.agent.ztunnel.proxybed import (
    CLIENT_IP,
    CLIENT_IP6,
    OTHER_IP,
    SERVER_IP,
    SERVER_IP6,
    EchoServer,
    FakeOrigdst,
    until,
    workload,
)
from tests.devca import DevCA

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

APP_PORT = 8080
PODS = {
    "client": PodInfo("uid-client-0", "demo", "client-0", CLIENT_IP, "client", (CLIENT_IP, CLIENT_IP6)),
    "server": PodInfo("uid-web-0", "demo", "web-0", SERVER_IP, "web", (SERVER_IP, SERVER_IP6)),
}


def metric(app: ProxyApp, name: str, **labels) -> float:
    total = 0.0
    for family in app.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class Harness:
    def __init__(self, netns, app, origdst, echo):
        self.netns, self.app, self.origdst, self.echo = netns, app, origdst, echo

    def path(self, role):
        return f"/run/netns/{self.netns[role]}"

    def raw_socket(self, role) -> socket.socket:
        from shoal.agent.ztunnel.netns import NetnsHandle

        home = NetnsHandle.current()
        ns = NetnsHandle.from_path(self.path(role), home)
        try:
            with ns.entered():
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:   # both (a home handle's close() keeps its fd): one leaked fd per socket
            ns.close()   # took later tests of the run past select()'s limit of 1,024
            os.close(home.fd)
        sock.setblocking(False)
        return sock

    async def connect_via_proxy(self, dst_ip, dst_port, role="client"):
        """What a captured app connect() looks like to the proxy."""
        sock = self.raw_socket(role)
        sock.bind(("127.0.0.1", 0))
        self.origdst.by_port[sock.getsockname()[1]] = (dst_ip, dst_port)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", 15001))
        return await asyncio.open_connection(sock=sock)

    async def echo_roundtrip(self, payload=b"hello", dst=(SERVER_IP, APP_PORT)):
        reader, writer = await self.connect_via_proxy(*dst)
        writer.write(payload)
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data


async def start_harness(config: ProxyConfig, pod_netns, state, signer) -> tuple[Harness, ZdsClient]:
    """A proxy app serving both PODS (handed over by a stand-in agent) and the echo app."""
    origdst = FakeOrigdst()
    app = ProxyApp(config, state=state, signer=signer, origdst=origdst, serve_http=False)
    await app.start()
    echo = await EchoServer().start(f"/run/netns/{pod_netns['server']}", SERVER_IP, APP_PORT)
    agent = ZdsClient(config.zds_path)
    await agent.connect()
    for role, pod in PODS.items():
        fd = os.open(f"/run/netns/{pod_netns[role]}", os.O_RDONLY)
        try:
            await agent.add(pod, fd)
        finally:
            os.close(fd)
    await agent.snapshot_sent()
    return Harness(pod_netns, app, origdst, echo), agent


@pytest.fixture
async def harness(pod_netns, state, ca, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="shoal.proxy.access")
    config = ProxyConfig(node="node-1", layout=ClusterLayout(name="shoal-test", run_root=tmp_path),
                         handshake_limits=HandshakeLimits(timeout=2.0), connect_timeout=4.0, drain_grace=2.0,
                         handover_wait=3.0)
    harness, agent = await start_harness(config, pod_netns, state, ca.sign)
    app, echo = harness.app, harness.echo
    yield harness
    await agent.close()
    echo.close()
    await app.stop()


async def test_hbone_echo_pooled_with_istio_metrics_and_access_log(harness, caplog):

    assert await harness.echo_roundtrip(b"x" * 300_000) == b"x" * 300_000
    assert await harness.echo_roundtrip() == b"hello"
    await asyncio.sleep(0.1)
    app = harness.app
    assert len(app.ctx.pool) == 1  # both tunnels rode one pooled HBONE connection
    labels = dict(reporter="source", source_principal="spiffe://cluster.local/ns/demo/sa/client",
                  destination_principal="spiffe://cluster.local/ns/demo/sa/web", connection_security_policy="mutual_tls")
    assert metric(app, "istio_tcp_connections_opened_total", **labels) == 2
    assert metric(app, "istio_tcp_connections_closed_total", **labels) == 2
    assert metric(app, "istio_tcp_received_bytes_total", **labels) == 300_005
    assert metric(app, "istio_tcp_sent_bytes_total", reporter="destination") == 300_005
    lines = [json.loads(line) for r in caplog.records if r.name == "shoal.proxy.access"
             for line in r.getMessage().splitlines()]   # a turn's closes share one write
    outbound = [line for line in lines if line["reporter"] == "source"]
    assert len(outbound) == 2 and all(line["mtls"] and line["response_flags"] == "-" for line in outbound)
    # IP_TRANSPARENT: the app sees the real client, not the proxy.
    assert {peer[0] for peer in harness.echo.peers} == {CLIENT_IP}


async def test_server_first_protocol_greeting_is_not_lost(harness):
    db = await EchoServer(greeting=b"db ready\n").start(f"/run/netns/{harness.netns['server']}", SERVER_IP, 7000)
    try:
        reader, writer = await harness.connect_via_proxy(SERVER_IP, 7000)
        assert await asyncio.wait_for(reader.readline(), 5) == b"db ready\n"
        writer.write(b"select 1\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"select 1\n"
        writer.close()
    finally:
        db.close()


async def test_real_client_ip_on_ephemeral_range_ports_too(harness):
    high = await EchoServer().start(f"/run/netns/{harness.netns['server']}", SERVER_IP, 40000)
    try:
        assert await harness.echo_roundtrip(dst=(SERVER_IP, 40000)) == b"hello"
        assert high.peers[0][0] == CLIENT_IP  # the delivery's own mark: no port ranges
    finally:
        high.close()


async def test_service_vip_is_balanced_to_endpoints(harness, state):
    state.apply(ConfigDelta("2", upserted=(Service("web", "demo", "10.96.0.10",
                                                   (ServicePort("http", 80, APP_PORT),), ("uid-web-0",)),)))
    assert await harness.echo_roundtrip(dst=("10.96.0.10", 80)) == b"hello"
    # Both reporters name the Service by its FQDN (the destination finds it from its endpoint and port).
    for reporter in ("source", "destination"):
        assert metric(harness.app, "istio_tcp_connections_opened_total", reporter=reporter,
                      destination_service="web.demo.svc.cluster.local") == 1


async def test_unmeshed_destination_is_passed_through_in_plaintext(harness):
    other = await EchoServer().start(f"/run/netns/{harness.netns['other']}", OTHER_IP, 9000)
    try:
        assert await harness.echo_roundtrip(dst=(OTHER_IP, 9000)) == b"hello"
        assert metric(harness.app, "istio_tcp_connections_opened_total", connection_security_policy="none",
                      reporter="source") == 1
    finally:
        other.close()


async def test_allow_policy_for_another_account_denies_with_401(harness, state):
    state.apply(ConfigDelta("3", upserted=(Authorization(
        "only-other", "demo", "ALLOW", rules=(Rule(sources=(Source(principals=("cluster.local/ns/demo/sa/other",)),)),)),)))
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"hello")
    with pytest.raises(ConnectionError):
        data = await asyncio.wait_for(reader.read(), 5)
        assert data == b"", "a denied connection must not carry data"
        raise ConnectionResetError("closed")
    await asyncio.sleep(0.1)
    app = harness.app
    assert metric(app, "shoal_proxy_rejected_total", listener="hbone", reason="policy_denied") == 1
    assert metric(app, "istio_tcp_connections_closed_total", reporter="destination", response_flags="UAEX") == 1
    assert metric(app, "istio_tcp_connections_closed_total", reporter="source", response_flags="UAEX") == 1
    assert harness.echo.peers == []


async def test_no_guessing_before_the_config_stream_synced(harness):
    harness.app.ctx.config_synced.clear()  # e.g. a proxy just restarted, controller slow
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"hello")
    with pytest.raises(ConnectionError):
        if not await asyncio.wait_for(reader.read(), 5):
            raise ConnectionResetError("closed")
    assert metric(harness.app, "shoal_proxy_rejected_total", reason="config_not_synced") == 1
    assert harness.echo.peers == []  # nothing went out in plaintext meanwhile
    harness.app.ctx.config_synced.set()
    assert await harness.echo_roundtrip() == b"hello"


async def test_upstream_down_gives_503(harness):
    reader, writer = await harness.connect_via_proxy(SERVER_IP, 8999)
    with pytest.raises(ConnectionError):
        if not await asyncio.wait_for(reader.read(), 5):
            raise ConnectionResetError("closed")
    await until(lambda: metric(harness.app, "shoal_proxy_rejected_total", reason="hbone_503"), "the 503 counted")
    assert metric(harness.app, "shoal_proxy_rejected_total", reason="hbone_503") == 1


# -- attacks on 15008 --------------------------------------------------------------------------

async def _raw_15008(harness, role="other"):
    sock = harness.raw_socket(role)
    await asyncio.get_running_loop().sock_connect(sock, (SERVER_IP, 15008))
    return await asyncio.open_connection(sock=sock)


async def _expect_closed(reader):
    try:
        await asyncio.wait_for(reader.read(65536), 5)
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
    except ConnectionError:
        pass


async def test_garbage_and_plaintext_http_on_15008_are_refused(harness):
    for payload in (os.urandom(512), b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"):
        reader, writer = await _raw_15008(harness)
        writer.write(payload)
        await _expect_closed(reader)
        writer.close()
    # Counted as its handler resumes, which can be after our end saw the close.
    await until(lambda: metric(harness.app, "shoal_proxy_rejected_total", reason="tls_handshake") >= 2,
                "both refusals counted")
    assert metric(harness.app, "shoal_proxy_rejected_total", reason="tls_handshake") == 2
    assert await harness.echo_roundtrip() == b"hello"  # everyone else unaffected


async def test_stalled_handshake_times_out(harness):
    reader, writer = await _raw_15008(harness)
    await _expect_closed(reader)  # the handshake timeout is 2 s in the fixture
    writer.close()
    assert metric(harness.app, "shoal_proxy_rejected_total", reason="handshake_timeout") == 1


def _client_context(ca: DevCA, spiffe: str | None, expired: bool = False) -> ssl.SSLContext:
    key_pem, csr_pem = make_csr(spiffe or "spiffe://cluster.local/ns/x/sa/y")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_pem, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    window = (now - datetime.timedelta(hours=2), now - datetime.timedelta(hours=1)) if expired else (None, None)
    chain = ca.issue(key.public_key(), [spiffe] if spiffe else [], *window)
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker does not care who the server is
    ctx.set_alpn_protocols(["h2"])
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
        f.write(chain + key_pem)
        f.flush()
        ctx.load_cert_chain(f.name)
    return ctx


async def _tls_15008(harness, ctx):
    sock = harness.raw_socket("other")
    await asyncio.get_running_loop().sock_connect(sock, (SERVER_IP, 15008))
    return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="")


@pytest.mark.parametrize("case", ["unknown_ca", "expired", "no_spiffe_san"])
async def test_bad_client_certificates_are_refused(harness, ca, case):
    if case == "unknown_ca":
        ctx = _client_context(DevCA("evil"), "spiffe://cluster.local/ns/demo/sa/client")
    elif case == "expired":
        ctx = _client_context(ca, "spiffe://cluster.local/ns/demo/sa/client", expired=True)
    else:
        ctx = _client_context(ca, None)
    try:
        reader, writer = await _tls_15008(harness, ctx)
        await _expect_closed(reader)  # TLS 1.3: the client learns after its Finished
        writer.close()
    except (ssl.SSLError, ConnectionError):
        pass
    await asyncio.sleep(0.1)
    # By reason: a certificate the mesh CA did not issue (or no longer vouches for) is
    # untrusted; one it issued without a SPIFFE ID is not a mesh identity.
    reason = "peer_identity" if case == "no_spiffe_san" else "untrusted_certificate"
    refused = {r: metric(harness.app, "shoal_proxy_rejected_total", reason=r)
               for r in ("tls_handshake", "untrusted_certificate", "peer_identity")}
    assert refused == {r: float(r == reason) for r in refused}
    assert await harness.echo_roundtrip() == b"hello"


async def _h2_exchange(harness, ca, headers, validate=True):
    ctx = _client_context(ca, "spiffe://cluster.local/ns/demo/sa/client")
    reader, writer = await _tls_15008(harness, ctx)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=validate))
    conn.initiate_connection()
    conn.send_headers(1, headers)
    writer.write(conn.data_to_send())
    events = []
    while not any(isinstance(e, (h2.events.ResponseReceived, h2.events.StreamReset, h2.events.ConnectionTerminated))
                  for e in events):
        data = await asyncio.wait_for(reader.read(65536), 5)
        if not data:
            break
        events += conn.receive_data(data)
        writer.write(conn.data_to_send())
    writer.close()
    return events


def _status(events):
    for e in events:
        if isinstance(e, h2.events.ResponseReceived):
            return int(dict(e.headers)[b":status"])
    return None


async def test_connect_to_non_local_address_gets_400(harness, ca):
    events = await _h2_exchange(harness, ca, [(":method", "CONNECT"), (":authority", f"{OTHER_IP}:{APP_PORT}")])
    assert _status(events) == 400
    assert metric(harness.app, "shoal_proxy_rejected_total", reason="not_local_pod") == 1


async def test_connect_without_authority_or_malformed_frames(harness, ca):
    events = await _h2_exchange(harness, ca, [(":method", "CONNECT")], validate=False)
    assert _status(events) == 400 or any(isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated))
                                         for e in events)
    ctx = _client_context(ca, "spiffe://cluster.local/ns/demo/sa/client")
    reader, writer = await _tls_15008(harness, ctx)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x09\x00\x00\x00\x00\x00garbage!")
    await _expect_closed(reader)
    writer.close()
    await until(lambda: metric(harness.app, "shoal_proxy_rejected_total", reason="bad_request") +
                metric(harness.app, "shoal_proxy_rejected_total", reason="h2_protocol") >= 2, "both refusals counted")
    assert await harness.echo_roundtrip() == b"hello"


async def test_client_verifies_server_identity(harness, state):
    # The config says web-0 runs as "admin": the server's real certificate (sa "web") must not pass.
    state.apply(ConfigDelta("9", upserted=(workload("web-0", SERVER_IP, "admin"),)))
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    await _expect_closed(reader)
    assert metric(harness.app, "shoal_proxy_rejected_total", listener="outbound", reason="peer_identity") == 1
    assert harness.echo.peers == []


# -- lifecycle: rotation and restart --------------------------------------------------------------

async def _make_app(tmp_path, state, signer, origdst, serve_http=False, **overrides) -> ProxyApp:
    settings = dict(handshake_limits=HandshakeLimits(timeout=2.0), connect_timeout=4.0, drain_grace=3.0, handover_wait=5.0) | overrides
    config = ProxyConfig(node="node-1", layout=ClusterLayout(name="shoal-test", run_root=tmp_path), **settings)
    app = ProxyApp(config, state=state, signer=signer, origdst=origdst, serve_http=serve_http)
    await app.start()
    return app


async def _agent(path: str, netns: dict, synced: asyncio.Event) -> None:
    """What the agent does: connect, replay every pod, say so; reconnect when the proxy goes."""
    from shoal.zds import ZdsError

    while True:
        client = ZdsClient(path, timeout=3)
        try:
            await client.connect()
            for role, pod in PODS.items():
                fd = os.open(f"/run/netns/{netns[role]}", os.O_RDONLY)
                try:
                    await client.add(pod, fd)
                finally:
                    os.close(fd)
            await client.snapshot_sent()
            synced.set()
            await client.wait_closed()
        except ZdsError:
            await asyncio.sleep(0.05)
        finally:
            await client.close()


@contextlib.asynccontextmanager
async def running_proxy(pod_netns, state, signer, tmp_path, **overrides):
    """A proxy app, the echo app and a stand-in agent that follows restarts; yields
    (Harness, the agent's synced event). Everything is stopped on the way out."""
    origdst = FakeOrigdst()
    app = await _make_app(tmp_path, state, signer, origdst, **overrides)
    echo = await EchoServer().start(f"/run/netns/{pod_netns['server']}", SERVER_IP, APP_PORT)
    synced = asyncio.Event()
    agent = asyncio.ensure_future(_agent(app.config.zds_path, pod_netns, synced))
    try:
        await asyncio.wait_for(synced.wait(), 5)
        yield Harness(pod_netns, app, origdst, echo), synced
    finally:
        agent.cancel()
        echo.close()
        await app.stop()


async def test_certificate_rotation_keeps_long_lived_connection(pod_netns, state, tmp_path):
    short = DevCA("short-lived", ttl=datetime.timedelta(seconds=3))
    origdst = FakeOrigdst()
    app = await _make_app(tmp_path, state, short.sign, origdst, rotation_check_interval=0.2)
    echo = await EchoServer().start(f"/run/netns/{pod_netns['server']}", SERVER_IP, APP_PORT)
    synced = asyncio.Event()
    agent = asyncio.ensure_future(_agent(app.config.zds_path, pod_netns, synced))
    try:
        await asyncio.wait_for(synced.wait(), 5)
        h = Harness(pod_netns, app, origdst, echo)
        reader, writer = await h.connect_via_proxy(SERVER_IP, APP_PORT)
        before = {c["identity"]: c["not_after"] for c in app.ctx.identities.describe()}
        for _ in range(8):  # 4 s: past the first certificates' expiry
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 3) == b"ping"
            await asyncio.sleep(0.5)
        after = {c["identity"]: c["not_after"] for c in app.ctx.identities.describe()}
        assert all(after[k] > before[k] for k in before)  # every SVID was renewed...
        assert metric(app, "shoal_proxy_certificates_rotated_total") >= 2
        writer.close()
        app.ctx.pool.close_all()  # ...and new connections handshake with the new ones
        assert await h.echo_roundtrip() == b"hello"
    finally:
        agent.cancel()
        echo.close()
        await app.stop()


async def test_restart_handover_refuses_no_connection(pod_netns, state, ca, tmp_path):
    """New connections keep coming while a successor starts beside the proxy and the old
    one retires: none is refused, reset or left unanswered, before, during or after.

    The load is paced but closed: CLIENTS clients, each opening its next connection once its
    last one answered, at most RATE a second together. An open-loop 200 a second (as
    before) outran a loaded machine, where one event loop runs these clients, both proxies
    and the app: the backlog grew until round trips passed their 5 s timeout, a failure of
    the test's pace, not of the handover. The traffic spans the handover by what happened
    (connections answered before it, and after the old proxy finished retiring), not by a
    fixed time."""
    clients, rate = 10, 200
    origdst = FakeOrigdst()
    old = await _make_app(tmp_path, state, ca.sign, origdst)
    echo = await EchoServer().start(f"/run/netns/{pod_netns['server']}", SERVER_IP, APP_PORT)
    synced = asyncio.Event()
    agent = asyncio.ensure_future(_agent(old.config.zds_path, pod_netns, synced))
    h = Harness(pod_netns, old, origdst, echo)
    results: dict = {"ok": 0, "failed": []}
    enough = asyncio.Event()

    async def client() -> None:
        while not enough.is_set():
            try:
                data = await h.echo_roundtrip()
                if data == b"hello":
                    results["ok"] += 1
                else:
                    results["failed"].append(data)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                results["failed"].append(repr(exc))
            await asyncio.sleep(clients / rate)

    new = None
    load: list[asyncio.Future] = []
    try:
        await asyncio.wait_for(synced.wait(), 5)
        load = [asyncio.ensure_future(client()) for _ in range(clients)]
        await until(lambda: results["ok"] >= 50 or results["failed"], "answers before the handover")
        synced.clear()
        new = await _make_app(tmp_path, state, ca.sign, origdst)   # the successor binds beside...
        retiring = asyncio.ensure_future(old.retire())              # ...and the old one retires
        await asyncio.wait_for(synced.wait(), 20)
        await asyncio.wait_for(retiring, 30)
        after = results["ok"]
        await until(lambda: results["ok"] >= after + 50 or results["failed"], "answers after the handover")
        enough.set()
        await asyncio.gather(*load)
        assert results["failed"] == [], f"{results['ok']} answered, then: {results['failed'][:5]}"
        assert all(not s.serving for pod in old.pods.pods.values() for s in pod.servers)
        assert metric(new, "istio_tcp_connections_opened_total", reporter="source") > 0
    finally:
        enough.set()
        for task in load:
            task.cancel()
        agent.cancel()
        echo.close()
        if new is not None:
            await new.stop()
        await old.stop()


async def test_admin_metrics_and_readiness_endpoints(pod_netns, state, ca, tmp_path):
    import urllib.error
    import urllib.request

    origdst = FakeOrigdst()
    # Ports the kernel picks (three random ones could be taken on a shared machine).
    app = await _make_app(tmp_path, state, ca.sign, origdst, serve_http=True, http_address="127.0.0.1",
                          admin_port=0, metrics_port=0, ready_port=0)
    ports = dict(zip(("admin_port", "metrics_port", "ready_port"),
                     (endpoint.server.sockets[0].getsockname()[1] for endpoint in app._endpoints)))
    echo = await EchoServer().start(f"/run/netns/{pod_netns['server']}", SERVER_IP, APP_PORT)

    async def get(port, path):
        def fetch():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                    return reply.status, reply.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
        return await asyncio.get_running_loop().run_in_executor(None, fetch)

    synced = asyncio.Event()
    try:
        assert (await get(ports["ready_port"], "/healthz/ready"))[0] == 503  # no agent snapshot yet
        agent = asyncio.ensure_future(_agent(app.config.zds_path, pod_netns, synced))
        await asyncio.wait_for(synced.wait(), 5)
        assert (await get(ports["ready_port"], "/healthz/ready"))[0] == 200
        assert await Harness(pod_netns, app, origdst, echo).echo_roundtrip() == b"hello"
        status, body = await get(ports["admin_port"], "/config_dump")
        dump = json.loads(body)
        assert status == 200 and {p["name"] for p in dump["pods"]} == {"client-0", "web-0"}
        assert all(p["listening"] for p in dump["pods"])
        certs = json.loads((await get(ports["admin_port"], "/certs"))[1])["certificates"]
        assert {c["identity"] for c in certs} == {"spiffe://cluster.local/ns/demo/sa/client",
                                                  "spiffe://cluster.local/ns/demo/sa/web"}
        connections = json.loads((await get(ports["admin_port"], "/connections"))[1])
        assert connections["pool"] and connections["pool"][0]["dst"].endswith("/sa/web")
        status, body = await get(ports["admin_port"], "/debug/memory")
        memory = json.loads(body)
        tables = memory["structures"]
        assert status == 200 and memory["rss_kib"] > 0 and "off" in memory["tracemalloc"]
        assert tables["pool_connections"] == 1 and tables["inbound_hbone_connections"] == 1
        assert tables["hbone_h2_closed_streams"] >= 0 and tables["hbone_read_buffer_bytes"] > 0
        assert tables["svids"] == 2 and tables["metric_samples:istio_tcp_connections_opened"] >= 1
        objects = json.loads((await get(ports["admin_port"], "/debug/memory/objects"))[1])
        assert objects["gc"]["objects_by_type"] and objects["gc"]["collected_now"] >= 0
        status, metrics = await get(ports["metrics_port"], "/metrics")
        assert status == 200 and 'istio_tcp_connections_opened_total{' in metrics
        assert 'connection_security_policy="mutual_tls"' in metrics
        assert (await get(ports["admin_port"], "/nope"))[0] == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["metrics_port"])
        writer.write(b"\x16\x03\x01garbage\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        assert metric(app, "shoal_proxy_rejected_total", listener="http", reason="bad_request") == 1
        # A single process is its own one worker for `shoal status` (pid, connections, health).
        report_path = Path(app.config.workers_status_path)
        for _ in range(50):   # written once a second
            report = json.loads(report_path.read_text()) if report_path.exists() else {}
            if report and report["workers"][0]["health"] == "ready" and report["workers"][0]["handled"]:
                break
            await asyncio.sleep(0.1)
        assert report["workers_wanted"] == 1 and report["proxy"] == os.getpid()
        assert [(w["pid"], w["health"]) for w in report["workers"]] == [(os.getpid(), "ready")]
        assert report["workers"][0]["handled"] >= 1 and report["workers"][0]["pods"] == ["demo/client-0", "demo/web-0"]
        agent.cancel()
    finally:
        echo.close()
        await app.stop()
    assert not Path(app.config.workers_status_path).exists()   # removed with the proxy


async def test_own_connection_steered_back_is_refused_not_looped(harness):
    # What a capture bug looks like from 15006: a connection carrying the proxy's mark.
    pod = harness.app.pods.pods["uid-web-0"]
    sock = pod.netns.socket()  # marked, like every proxy upstream socket
    await asyncio.get_running_loop().sock_connect(sock, (SERVER_IP, 15006))
    reader, writer = await asyncio.open_connection(sock=sock)
    await _expect_closed(reader)
    writer.close()
    await until(lambda: metric(harness.app, "shoal_proxy_rejected_total", listener="plaintext", reason="proxy_loop"),
                "the loop counted")
    assert metric(harness.app, "shoal_proxy_rejected_total", listener="plaintext", reason="proxy_loop") == 1
    assert harness.echo.peers == []

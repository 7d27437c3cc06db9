"""Inbound delivery on real namespaces: to the pod IP (never loopback), from the client's
real address, over IPv6 as over IPv4, and a client-supplied ``forwarded`` never trusted."""
from __future__ import annotations

import asyncio

import pytest

from shoal.xds.model import Authorization, ConfigDelta, Rule, Source
from tests.agent.ztunnel.proxybed import CLIENT_IP, CLIENT_IP6, OTHER_IP, SERVER_IP, SERVER_IP6, EchoServer, until

from .test_proxy import APP_PORT, _h2_exchange, _status, harness, metric  # noqa: F401 (fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


async def _start(harness, port, bind):
    return await EchoServer().start(harness.path("server"), SERVER_IP, port, bind=bind)


async def test_app_bound_only_to_its_pod_ip_answers_with_the_real_client_ip(harness):
    v4 = await _start(harness, 9100, SERVER_IP)
    v6 = await _start(harness, 9100, SERVER_IP6)
    try:
        assert await harness.echo_roundtrip(dst=(SERVER_IP, 9100)) == b"hello"
        assert await harness.echo_roundtrip(dst=(SERVER_IP6, 9100)) == b"hello"
        assert v4.peers[0][0] == CLIENT_IP and v6.peers[0][0] == CLIENT_IP6
    finally:
        v4.close()
        v6.close()


async def test_ipv6_hbone_pod_ip_to_pod_ip_with_mtls(harness):
    assert await harness.echo_roundtrip(b"v6" * 1000, dst=(SERVER_IP6, APP_PORT)) == b"v6" * 1000
    assert harness.echo.peers[-1][0] == CLIENT_IP6
    assert metric(harness.app, "istio_tcp_connections_opened_total", reporter="destination",
                  connection_security_policy="mutual_tls") >= 1


@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1"])
async def test_loopback_only_listener_is_not_reachable_through_the_mesh(harness, ca, loopback):
    private = await _start(harness, 9999, loopback)
    try:
        pod_ip = SERVER_IP6 if ":" in loopback else SERVER_IP
        reader, writer = await harness.connect_via_proxy(pod_ip, 9999)
        with pytest.raises(ConnectionError):
            if not await asyncio.wait_for(reader.read(), 5):
                raise ConnectionResetError("closed")
        writer.close()
        # An HBONE CONNECT naming the loopback address itself is refused before any connect.
        authority = f"[{loopback}]:9999" if ":" in loopback else f"{loopback}:9999"
        events = await _h2_exchange(harness, ca, [(":method", "CONNECT"), (":authority", authority)])
        assert _status(events) == 400
        await until(lambda: metric(harness.app, "shoal_proxy_rejected_total", reason="loopback_destination"),
                    "the refusal counted")
        assert metric(harness.app, "shoal_proxy_rejected_total", reason="loopback_destination") == 1
        assert private.peers == []
    finally:
        private.close()


@pytest.mark.parametrize("claimed", ["127.0.0.1", CLIENT_IP, "::1"])
async def test_forwarded_header_never_changes_the_client_address(harness, ca, claimed):
    """A peer with a valid certificate (here from the 'other' pod) claims another source."""
    node = f'"[{claimed}]"' if ":" in claimed else claimed
    events = await _h2_exchange(harness, ca, [(":method", "CONNECT"), (":authority", f"{SERVER_IP}:{APP_PORT}"),
                                                     ("forwarded", f"for={node}")])
    assert _status(events) == 200
    await until(lambda: harness.echo.peers, "the app's connection")
    assert harness.echo.peers[-1][0] == OTHER_IP   # what the app sees: the real peer
    assert metric(harness.app, "shoal_proxy_rejected_total", reason="forwarded_ignored") == 1


async def test_forwarded_header_cannot_bypass_an_ip_blocks_deny(harness, ca, state):
    state.apply(ConfigDelta("5", upserted=(Authorization(
        "deny-other", "demo", "DENY", rules=(Rule(sources=(Source(ip_blocks=(f"{OTHER_IP}/32",)),)),)),)))
    for claimed in ("127.0.0.1", CLIENT_IP):
        events = await _h2_exchange(harness, ca, [(":method", "CONNECT"),
                                                         (":authority", f"{SERVER_IP}:{APP_PORT}"),
                                                         ("forwarded", f"for={claimed}")])
        assert _status(events) == 401
    assert harness.echo.peers == []
    assert await harness.echo_roundtrip() == b"hello"   # the real client is not denied


async def test_client_giving_up_during_the_app_connect_leaves_no_app_connection(harness, ca, monkeypatch):
    """Seen under load: the source reset its stream while the destination was still
    connecting to the app; the app's connection then waited forever for a request."""
    import h2.config
    import h2.connection

    from shoal.agent.ztunnel import inbound

    from .test_proxy import _client_context, _tls_15008

    connected, release = asyncio.Event(), asyncio.Event()
    real_connect = inbound.connect_app

    async def slow_connect(*args):
        sock = await real_connect(*args)
        connected.set()
        await release.wait()   # the app connect "takes long"
        return sock

    monkeypatch.setattr(inbound, "connect_app", slow_connect)
    reader, writer = await _tls_15008(harness, _client_context(ca, "spiffe://cluster.local/ns/demo/sa/client"))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", f"{SERVER_IP}:{APP_PORT}")])
    writer.write(conn.data_to_send())
    await asyncio.wait_for(connected.wait(), 5)
    conn.reset_stream(1)
    writer.write(conn.data_to_send())
    await writer.drain()
    await asyncio.sleep(0.2)
    release.set()
    for _ in range(50):
        if harness.echo.finished:
            break
        await asyncio.sleep(0.05)
    writer.close()
    assert len(harness.echo.peers) == 1 and harness.echo.finished == 1


async def test_releasing_a_pod_closes_its_inbound_tunnels(harness):
    """A live HBONE session into a deleted pod kept that pod's namespace (and its veth, with
    its IP) alive: a new pod given the same IP then saw its traffic land in the dead one."""
    assert await harness.echo_roundtrip() == b"hello"
    server = harness.app.pods.pods["uid-web-0"]
    assert len(server.sessions) == 1
    session = next(iter(server.sessions))
    await harness.app.pods.remove_pod("uid-web-0")
    await until(lambda: session.closed and not harness.app.ctx.inbound_sessions, "the tunnel closed")


async def test_the_app_connect_starts_no_task_of_its_own():
    """A CONNECT waits for the app connect before its answer. A task around the connect
    (asyncio.wait_for's) costs three more loop turns, and each turn is as long as all the
    I/O of that turn: 10,000 tunnels closing made them long enough to miss the answer wait."""
    import socket
    from types import SimpleNamespace

    from shoal.agent.ztunnel.inbound import connect_app

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def plain_socket(family, transparent=False, mark=0):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    pod = SimpleNamespace(netns=SimpleNamespace(socket=plain_socket), owns=lambda ip: True)
    ctx = SimpleNamespace(config=SimpleNamespace(connect_timeout=5.0))
    loop = asyncio.get_running_loop()
    started: list[object] = []

    def counting_factory(loop, coro, **kwargs):
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    previous = loop.get_task_factory()
    loop.set_task_factory(counting_factory)
    try:
        upstream = await connect_app(ctx, pod, "127.0.0.1", listener.getsockname()[1], "127.0.0.1")
    finally:
        loop.set_task_factory(previous)
        listener.close()
    upstream.close()
    assert started == [], f"the app connect ran {len(started)} task(s) of its own"


async def test_the_app_connect_takes_its_port_per_destination_not_per_address(harness):
    """The delivery socket's port is chosen at connect() for the whole 4-tuple (as the
    app's own clients' are), not by bind(0), which skips every port any socket of the
    client's address holds. After a 10,000-connection burst that made each bind scan
    ~14,000 ports in TIME_WAIT (6 ms of the proxy's one thread each) and stalled the
    proxy at 200 connections/s. Here the pod's whole port range is two ports, both held
    by connections to another app: a third, to this app, still gets one."""
    import subprocess

    from shoal.agent.ztunnel.inbound import connect_app

    def sysctl(*args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", harness.netns["server"], "sysctl", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    other_app = await _start(harness, APP_PORT + 1, "::")
    pod = harness.app.pods.pods["uid-web-0"]
    previous = " ".join(sysctl("-n", "net.ipv4.ip_local_port_range").split())
    held = []
    try:
        sysctl("-w", "net.ipv4.ip_local_port_range=40000 40001")
        held = [await connect_app(harness.app.ctx, pod, SERVER_IP, APP_PORT + 1, CLIENT_IP) for _ in range(2)]
        assert sorted(s.getsockname()[1] for s in held) == [40000, 40001]
        held.append(await connect_app(harness.app.ctx, pod, SERVER_IP, APP_PORT, CLIENT_IP))
        assert held[-1].getsockname()[0] == CLIENT_IP and held[-1].getsockname()[1] in (40000, 40001)
    finally:
        for sock in held:
            sock.close()
        sysctl("-w", f"net.ipv4.ip_local_port_range={previous}")
        other_app.close()

"""Same-node bypass through the node proxy: the agent's real verdict program on its pinned
maps, the proxy serving two pods of its node in real namespaces, apps in those pods."""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket

import pytest

from shoal.agent.ztunnel.config import ProxyConfig
from shoal.config import ClusterLayout
from shoal.datapath.bypass import queued_bytes
from shoal.hbone.handshakes import HandshakeLimits
from shoal.xds.model import Authorization, ConfigDelta, Rule, Source
from tests.agent.ztunnel.proxybed import CLIENT_IP, SERVER_IP
from tests.agent.ztunnel.test_proxy import APP_PORT, Harness, metric, start_harness

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def bypass_layout(tmp_path_factory):
    """The agent's maps and programs for a node of a cluster of our own, with the bypass
    verdict attached to its SOCKHASH (nothing attached to any cgroup: capture is stood in
    for by FakeOrigdst, and tested in tests/agent)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: eBPF")
    from shoal.agent.loader import Datapath, FeatureFlags
    layout = ClusterLayout(name=f"shoal-t{os.getpid()}-bypass", run_root=tmp_path_factory.mktemp("run"))
    datapath = Datapath(layout.bpf_pin_dir("node-1"), FeatureFlags(15001, 15006, 15008))
    try:
        datapath.load()
        datapath.attach_bypass()
        yield layout
    finally:
        datapath.close()
        shutil.rmtree(layout.bpffs_root / layout.name, ignore_errors=True)


@pytest.fixture
async def proxy(pod_netns, state, ca, bypass_layout, caplog):
    caplog.set_level(logging.INFO, logger="shoal.proxy.access")
    harnesses = []

    async def start(**overrides) -> Harness:
        config = ProxyConfig(node="node-1", layout=bypass_layout, handshake_limits=HandshakeLimits(timeout=2.0),
                             connect_timeout=4.0,
                             drain_grace=1.0, **overrides)
        harness, agent = await start_harness(config, pod_netns, state, ca.sign)
        harnesses.append((harness, agent))
        return harness
    yield start
    for harness, agent in harnesses:
        await agent.close()
        harness.echo.close()
        await harness.app.stop()


def _access_lines(caplog) -> list[dict]:
    return [json.loads(line) for r in caplog.records if r.name == "shoal.proxy.access"
            for line in r.getMessage().splitlines()]   # a turn's closes share one write


async def _pump(reader, writer, payload: bytes) -> bytes:
    """Send ``payload`` and read as many bytes back, concurrently."""
    async def send():
        for at in range(0, len(payload), 1 << 20):
            writer.write(payload[at:at + (1 << 20)])
            await writer.drain()
    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
    await sender
    return got


async def _until(predicate, timeout: float = 5.0) -> None:
    """Waits for ``predicate``, then one more turn of the loop: closes are reported (metrics,
    access log) once per turn."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.02)


def _sockhash_holds(layout: ClusterLayout, cookie: int) -> bool:
    from shoal.datapath import bpfsys
    fd = bpfsys.obj_get(layout.bpf_pin_dir("node-1") / "bypass_socks")
    try:
        return bpfsys.map_lookup(fd, ctypes.c_uint64(cookie), ctypes.c_uint64())
    finally:
        os.close(fd)


async def test_large_transfer_both_ways_is_identical_and_reported_with_identities_and_byte_counts(proxy, caplog):
    harness = await proxy()
    app = harness.app
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    payload = os.urandom(32 * 1024 * 1024)
    echoed = await _pump(reader, writer, payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await _until(lambda: not app.ctx.bypass.live)
    assert len(app.ctx.pool) == 0            # no HBONE connection to ourselves
    assert metric(app, "shoal_proxy_bypass_connections_total", outcome="joined") == 1
    identities = dict(source_principal="spiffe://cluster.local/ns/demo/sa/client",
                      destination_principal="spiffe://cluster.local/ns/demo/sa/web")
    for reporter in ("source", "destination"):
        assert metric(app, "istio_tcp_received_bytes_total", reporter=reporter, **identities) == len(payload)
        assert metric(app, "istio_tcp_sent_bytes_total", reporter=reporter, **identities) == len(payload)
        assert metric(app, "istio_tcp_connections_closed_total", reporter=reporter, response_flags="-",
                      **identities) == 1
    lines = [line for line in _access_lines(caplog) if line["route"] == "bypass"]
    assert {line["reporter"] for line in lines} == {"source", "destination"}
    for line in lines:
        assert (line["bytes_received"], line["bytes_sent"]) == (len(payload), len(payload))
        assert line["src_identity"].endswith("/sa/client") and line["dst_identity"].endswith("/sa/web")
        assert line["response_flags"] == "-"
    assert {peer[0] for peer in harness.echo.peers} == {CLIENT_IP}   # the app sees the real client


async def _listen_in_pod(netns_path: str, port: int, serve) -> asyncio.Server:
    from shoal.agent.ztunnel.netns import NetnsHandle
    home = NetnsHandle.current()
    ns = NetnsHandle.from_path(netns_path, home)
    with ns.entered():
        sock = socket.socket()
    ns.close()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    return await asyncio.start_server(serve, sock=sock)


@pytest.mark.parametrize("kind", ["joined", "relayed"])
async def test_an_open_same_node_connection_shows_its_bytes_before_it_closes(proxy, kind):
    """The kernel carries a joined pair's bytes, so nothing counts them as they pass: the
    proxy reads the verdict's counters every LIVE_BYTES_INTERVAL into istio_tcp_*_bytes
    (both reporters), and /connections reads them when asked. The close adds only the rest."""
    from shoal.agent.ztunnel.admin import admin_pages
    from shoal.agent.ztunnel.bypass import LIVE_BYTES_INTERVAL
    from shoal.datapath.bypass import BypassUnavailable
    harness = await proxy()
    app = harness.app
    if kind == "relayed":
        def refuse(*_sockets):
            raise BypassUnavailable("map full")
        app.ctx.bypass.kernel().join = refuse
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    first = os.urandom(3 * 1024 * 1024)
    assert await _pump(reader, writer, first) == first
    pages = admin_pages(app.ctx, lambda: app.ctx.served_pods.values())
    listed = json.loads((await pages["/connections"]())[2])["connections"]
    same_node = [entry for entry in listed if entry["route"] == "bypass"]
    assert sorted(entry["reporter"] for entry in same_node) == ["destination", "source"]
    assert {(entry["bytes_received"], entry["bytes_sent"]) for entry in same_node} == {(len(first), len(first))}
    # Read every LIVE_BYTES_INTERVAL: the next read (its timer can fire late on a loaded
    # machine, so waited for, not slept for) counts them while the connection is open.
    def counted() -> bool:
        return all(metric(app, name, reporter=reporter) == len(first) for reporter in ("source", "destination")
                   for name in ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"))
    await _until(counted, timeout=LIVE_BYTES_INTERVAL + 10)
    assert app.ctx.bypass.live, "still open"
    more = os.urandom(1024 * 1024)
    assert await _pump(reader, writer, more) == more
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await _until(lambda: not app.ctx.bypass.live)
    for reporter in ("source", "destination"):   # counted once: the close added the rest
        assert metric(app, "istio_tcp_received_bytes_total", reporter=reporter) == len(first) + len(more)
        assert metric(app, "istio_tcp_sent_bytes_total", reporter=reporter) == len(first) + len(more)
    assert metric(app, "shoal_proxy_bypass_connections_total", outcome=kind) == 1


class HalfCloser:
    """A server app that half-closes first, then reads the client to EOF. ``wait_for_go``:
    it first waits for the client's two bytes (so the proxy has joined the pair);
    otherwise it speaks and half-closes at once."""

    def __init__(self, wait_for_go: bool):
        self.received: list[bytes] = []
        self.server = None
        self.wait_for_go = wait_for_go

    async def start(self, netns_path: str, port: int):
        self.server = await _listen_in_pod(netns_path, port, self._serve)
        return self

    async def _serve(self, reader, writer):
        if self.wait_for_go:
            await reader.readexactly(2)
        writer.write(b"server says bye first")
        writer.write_eof()
        self.received.append(await reader.read())
        writer.close()


async def test_a_server_that_closed_before_the_join_is_relayed_in_userspace(proxy, caplog):
    """The kernel takes only established sockets into a SOCKHASH: a server app that
    greets and half-closes at once may leave the proxy a CLOSE-WAIT socket. The join is
    refused with nothing changed, and the proxy relays that connection itself."""
    harness = await proxy()
    app = await HalfCloser(wait_for_go=False).start(harness.path("server"), 7101)
    try:
        for _ in range(5):
            reader, writer = await harness.connect_via_proxy(SERVER_IP, 7101)
            assert await asyncio.wait_for(reader.read(), 10) == b"server says bye first"
            writer.write(b"client still talking")
            writer.write_eof()
            writer.close()
        await _until(lambda: len(app.received) == 5, timeout=10)
        assert app.received == [b"client still talking"] * 5
    finally:
        app.server.close()
    outcomes = {o: metric(harness.app, "shoal_proxy_bypass_connections_total", outcome=o)
                for o in ("joined", "relayed")}
    assert sum(outcomes.values()) == 5
    await _until(lambda: metric(harness.app, "istio_tcp_connections_closed_total", reporter="destination") == 5)
    lines = [line for line in _access_lines(caplog) if line["reporter"] == "destination"]
    assert [(line["bytes_received"], line["bytes_sent"]) for line in lines] == [(20, 21)] * 5


async def test_half_close_in_both_directions(proxy):
    harness = await proxy()
    # client first: its FIN reaches the app after all its bytes, the answer still flows back
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    payload = os.urandom(4 * 1024 * 1024)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    writer.close()
    # server first: the client reads to EOF, then sends and closes; the app reads all of it
    app = await HalfCloser(wait_for_go=True).start(harness.path("server"), 7100)
    try:
        reader, writer = await harness.connect_via_proxy(SERVER_IP, 7100)
        writer.write(b"go")
        assert await asyncio.wait_for(reader.read(), 10) == b"server says bye first"
        writer.write(b"client still talking")
        writer.write_eof()
        await _until(lambda: app.received == [b"client still talking"], timeout=10)
        writer.close()
    finally:
        app.server.close()
    await _until(lambda: not harness.app.ctx.bypass.live)
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="joined") == 2


async def test_a_finished_pair_leaves_no_watch_behind(proxy):
    """The end that forwarded its EOF first watches its socket for a reset until the pair
    ends; when the other end's EOF ends the pair (and closes both sockets) during its
    sleep, it stops there: it once read TCP_INFO of the closed socket, and each such pair
    (every request/answer connection) logged a "Task exception was never retrieved"
    traceback, thousands a minute under load."""
    from shoal.agent.ztunnel.bypass import RESET_POLL

    harness = await proxy()
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    await _until(lambda: harness.app.ctx.bypass.live)
    (pair,) = harness.app.ctx.bypass.live
    writer.write(b"request")
    writer.write_eof()   # client first: its end forwards and watches; the echo app closes next
    assert await asyncio.wait_for(reader.read(), 10) == b"request"
    writer.close()
    await _until(lambda: pair.finished)
    watches = [end._forwarding for end in (pair.client_end, pair.server_end) if end._forwarding is not None]
    assert watches
    await _until(lambda: all(task.done() for task in watches), timeout=RESET_POLL * 2 + 10)   # at its next poll
    assert [task.exception() for task in watches] == [None] * len(watches)


class Streamer:
    """A server app that sends ``head`` at once, reads the client to EOF, then sends
    ``tail`` and closes: its answer outlives the client's half-close."""

    def __init__(self, head: bytes, tail: bytes):
        self.head, self.tail = head, tail
        self.received: list[bytes] = []
        self.server = None

    async def start(self, netns_path: str, port: int):
        self.server = await _listen_in_pod(netns_path, port, self._serve)
        return self

    async def _serve(self, reader, writer):
        writer.write(self.head)
        self.received.append(await reader.read())
        writer.write(self.tail)
        await writer.drain()
        writer.close()


async def test_a_client_that_half_closes_before_reading_the_answer_still_gets_all_of_it(proxy):
    """The CI stall of the same-node test, made deterministic: the client half-closes
    while the answer it has not read yet waits in the kernel's redirect queue toward it,
    and the server keeps answering after that FIN. Every byte arrives, then EOF; the pair
    ends cleanly (a FIN queued behind those bytes used to break the redirect: EPIPE on the
    proxy's socket, the rest dropped, the client waiting for ever)."""
    harness = await proxy()
    bypass = harness.app.ctx.bypass
    head, tail = os.urandom(16 * 1024 * 1024), os.urandom(1024 * 1024)
    app = await Streamer(head, tail).start(harness.path("server"), 7102)
    try:
        reader, writer = await harness.connect_via_proxy(SERVER_IP, 7102)
        await _until(lambda: len(bypass.live) == 1)
        (conn,) = bypass.live
        await _until(lambda: bypass.kernel().counts(conn.pair).server_to_client == len(head), timeout=20)
        # the precondition: part of the answer is not on the client's socket yet (in the
        # kernel's redirect queue, or handed back to the proxy past the high-water mark)
        assert queued_bytes(conn.pair.client) - conn.pair.client_queued_before < len(head)
        writer.write(b"request")
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)
        assert (len(got), hashlib.sha256(got).digest()) == (len(head) + len(tail),
                                                             hashlib.sha256(head + tail).digest())
        await _until(lambda: app.received == [b"request"])
        writer.close()
    finally:
        app.server.close()
    await _until(lambda: not bypass.live)
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="broken") == 0
    assert metric(harness.app, "istio_tcp_connections_closed_total", reporter="destination",
                  response_flags="-") == 1


async def test_a_redirect_broken_after_a_half_close_is_counted_and_resets_both_apps(proxy):
    """Once a socket's EOF is read the event loop stops reading it, so the proxy polls its
    SO_ERROR. Here the server app half-closes and stops reading while the client keeps
    sending; the kernel then fails to send the bytes redirected toward it (the proxy's
    socket's write side shut by the test, standing in for any break of the redirect:
    EPIPE). Those bytes cannot reach the app any more: both apps are reset, and it is
    counted as a broken pair (not as an app's reset)."""
    async def say_bye_then_read_nothing(reader, writer):
        await reader.readexactly(2)
        writer.write(b"bye")
        writer.write_eof()
        await asyncio.sleep(30)
        writer.close()

    harness = await proxy()
    bypass = harness.app.ctx.bypass
    server = await _listen_in_pod(harness.path("server"), 7103, say_bye_then_read_nothing)
    try:
        reader, writer = await harness.connect_via_proxy(SERVER_IP, 7103)
        writer.write(b"go")
        assert await asyncio.wait_for(reader.read(), 10) == b"bye"
        (conn,) = bypass.live
        conn.pair.server.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):
            for _ in range(100):
                writer.write(os.urandom(1024 * 1024))
                await asyncio.wait_for(writer.drain(), 10)
                await asyncio.sleep(0.05)
        await _until(lambda: not bypass.live)
    finally:
        server.close()
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="broken") == 1
    for reporter in ("source", "destination"):
        assert metric(harness.app, "istio_tcp_connections_closed_total", reporter=reporter, response_flags="UR") == 1


@pytest.mark.parametrize("closer", ["client", "server"])
async def test_close_or_reset_of_either_end_tears_the_pair_down(proxy, bypass_layout, closer):
    harness = await proxy()
    bypass = harness.app.ctx.bypass
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    (conn,) = bypass.live
    cookies = (conn.pair.client_cookie, conn.pair.server_cookie)
    assert all(_sockhash_holds(bypass_layout, c) for c in cookies)
    if closer == "client":
        writer.transport.abort()      # the client app dies: RST
    else:
        harness.echo.server.close()   # the server app goes: its connection closes
        for task in asyncio.all_tasks():
            if "EchoServer._serve" in repr(task):
                task.cancel()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)   # its FIN reached the client
        # the client, still open, writes: the closed app's kernel answers RST, the proxy
        # resets the client too
        writer.write(b"anyone there?")
    await _until(lambda: not bypass.live)
    await asyncio.sleep(0.05)
    assert not any(_sockhash_holds(bypass_layout, c) for c in cookies)
    assert metric(harness.app, "shoal_proxy_active_connections", reporter="source") == 0
    assert metric(harness.app, "istio_tcp_connections_closed_total", reporter="destination") == 1


async def test_a_deny_policy_applied_mid_connection_resets_it(proxy, state):
    harness = await proxy()
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"before")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
    state.apply(ConfigDelta("9", upserted=(Authorization(
        "deny-client", "demo", "DENY", rules=(Rule(sources=(Source(principals=("cluster.local/ns/demo/sa/client",)),)),)),)))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    app = harness.app
    assert not app.ctx.bypass.live
    await asyncio.sleep(0.05)   # closes are reported at the end of the loop turn
    assert metric(app, "shoal_proxy_bypass_connections_total", outcome="revoked") == 1
    for reporter in ("source", "destination"):
        assert metric(app, "istio_tcp_connections_closed_total", reporter=reporter, response_flags="UAEX") == 1
    # and a new connection is refused before anything reaches the app
    served = len(harness.echo.peers)
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"after")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    assert len(harness.echo.peers) == served
    assert metric(app, "shoal_proxy_rejected_total", listener="bypass", reason="policy_denied") == 1


DENY_CLIENT = Authorization("deny-client", "demo", "DENY",
                            rules=(Rule(sources=(Source(principals=("cluster.local/ns/demo/sa/client",)),)),))


async def test_a_deny_pushed_while_the_app_is_dialled_refuses_the_connection(proxy, state, monkeypatch):
    """Attack on the window between the policy check and the join: the DENY arrives while
    the proxy dials the app (the re-check on that change finds no pair yet). The proxy
    decides again once dialled: the connection is refused, nothing is joined, the app gets
    no byte."""
    import shoal.agent.ztunnel.bypass as bypass_module
    real_connect = bypass_module.connect_app

    async def connect_then_deny(*args, **kwargs):
        upstream = await real_connect(*args, **kwargs)
        state.apply(ConfigDelta("9", upserted=(DENY_CLIENT,)))
        return upstream

    monkeypatch.setattr(bypass_module, "connect_app", connect_then_deny)
    harness = await proxy()
    served = len(harness.echo.peers)
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"must not arrive")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    await asyncio.sleep(0.05)
    app = harness.app
    assert not app.ctx.bypass.live
    assert metric(app, "shoal_proxy_bypass_connections_total", outcome="joined") == 0
    assert metric(app, "shoal_proxy_rejected_total", listener="bypass", reason="policy_denied") == 1
    assert metric(app, "istio_tcp_connections_closed_total", reporter="destination", response_flags="UAEX") == 1
    assert len(harness.echo.peers) - served <= 1 and harness.echo.finished == len(harness.echo.peers)


async def test_a_deny_cuts_a_same_node_connection_relayed_in_userspace_too(proxy, state):
    """The fallback is held to the same rule: a connection the kernel would not join
    (here: the join refused as when the map is full) and the proxy relays is reset by a
    DENY pushed while it is open."""
    from shoal.datapath.bypass import BypassUnavailable
    harness = await proxy()
    kernel = harness.app.ctx.bypass.kernel()

    def refuse(*_sockets):
        raise BypassUnavailable("map full")
    kernel.join = refuse
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"before")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
    app = harness.app
    assert metric(app, "shoal_proxy_bypass_connections_total", outcome="relayed") == 1
    state.apply(ConfigDelta("9", upserted=(DENY_CLIENT,)))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    await _until(lambda: not app.ctx.bypass.live)
    assert metric(app, "shoal_proxy_bypass_connections_total", outcome="revoked") == 1
    for reporter in ("source", "destination"):
        assert metric(app, "istio_tcp_connections_closed_total", reporter=reporter, response_flags="UAEX") == 1


async def test_a_waypoint_put_in_front_of_the_destination_cuts_its_joined_pairs(proxy, state):
    """A waypoint enforces L7 policy a same-node pair would skip: a destination that gets
    one resets its live pairs (and new connections take the waypoint, never the bypass)."""
    from shoal.xds.model import Waypoint, WaypointRef
    from tests.agent.ztunnel.proxybed import workload
    harness = await proxy()
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    behind = dataclasses.replace(workload("web-0", SERVER_IP, "web", ips=(SERVER_IP, "fd00:250::2")),
                                 waypoint=WaypointRef("demo", "waypoint"))
    state.apply(ConfigDelta("9", upserted=(Waypoint("waypoint", "demo", "10.250.0.9", "waypoint",
                                                    "spiffe://cluster.local/ns/demo/sa/waypoint"), behind)))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    await _until(lambda: not harness.app.ctx.bypass.live)
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="revoked") == 1


async def test_concurrent_pairs_never_mix_bytes(proxy):
    """Attack surface: pairs are keyed by socket cookie only; eight at once, each gets
    exactly its own bytes back."""
    harness = await proxy()
    conns = [await harness.connect_via_proxy(SERVER_IP, APP_PORT) for _ in range(8)]
    payloads = [bytes([i]) * 300_000 + os.urandom(1000) for i in range(8)]
    results = await asyncio.gather(*(_pump(r, w, p) for (r, w), p in zip(conns, payloads)))
    assert results == payloads
    for _reader, writer in conns:
        writer.close()
    await _until(lambda: not harness.app.ctx.bypass.live)


async def test_bypass_turned_off_keeps_the_hbone_tunnel(proxy):
    harness = await proxy(same_node_bypass=False)
    assert harness.app.ctx.bypass is None
    assert await harness.echo_roundtrip(b"via hbone") == b"via hbone"
    assert len(harness.app.ctx.pool) == 1
    assert metric(harness.app, "istio_tcp_connections_closed_total", reporter="destination") == 1


def test_the_flag_and_its_environment_variable():
    assert ProxyConfig.from_args(["--node", "n"], env={}).same_node_bypass
    assert not ProxyConfig.from_args(["--node", "n", "--no-same-node-bypass"], env={}).same_node_bypass
    assert not ProxyConfig.from_args(["--node", "n"], env={"SHOAL_PROXY_SAME_NODE_BYPASS": "0"}).same_node_bypass


def test_without_the_agents_maps_same_node_connections_stay_on_hbone(tmp_path):
    """Declined, not failed: a proxy started before the agent (or with an old one)."""
    from prometheus_client import CollectorRegistry

    from shoal.agent.ztunnel.bypass import SameNodeBypass
    from shoal.agent.ztunnel.telemetry import ConnectionTelemetry, ProxyMetrics
    from shoal.xds.state import ConfigState
    registry = CollectorRegistry()
    bypass = SameNodeBypass(tmp_path / "no-maps", ConfigState(), ConnectionTelemetry(ProxyMetrics(registry)),
                            registry)
    assert bypass.kernel() is None
    bypass.close()


async def test_a_pod_on_another_node_is_still_reached_over_hbone(proxy, state, ca, tmp_path, caplog):
    """Cross-node connections are untouched: a meshed destination this proxy does not serve
    (here pod "remote-0", served by a second proxy as node-2) goes through the HBONE tunnel
    to its 15008, mTLS, even with the bypass on."""
    from shoal.zds import PodInfo, ZdsClient
    from tests.agent.ztunnel.proxybed import OTHER_IP, OTHER_IP6, EchoServer, workload
    from tests.agent.ztunnel.test_proxy import _make_app
    remote_pod = dataclasses.replace(workload("remote-0", OTHER_IP, "remote", ips=(OTHER_IP, OTHER_IP6)), node="node-2")
    state.apply(ConfigDelta("5", upserted=(remote_pod,)))
    harness = await proxy()
    remote = await _make_app(tmp_path, state, ca.sign, None)
    agent = ZdsClient(remote.config.zds_path)
    remote_app = await EchoServer().start(harness.path("other"), OTHER_IP, APP_PORT)
    try:
        await agent.connect()
        fd = os.open(harness.path("other"), os.O_RDONLY)
        try:
            await agent.add(PodInfo("uid-remote-0", "demo", "remote-0", OTHER_IP, "remote", (OTHER_IP, OTHER_IP6)), fd)
        finally:
            os.close(fd)
        await agent.snapshot_sent()
        assert await harness.echo_roundtrip(b"across nodes", dst=(OTHER_IP, APP_PORT)) == b"across nodes"
        await _until(lambda: metric(remote, "istio_tcp_connections_closed_total", reporter="destination") == 1)
    finally:
        await agent.close()
        remote_app.close()
        await remote.stop()
    local = harness.app
    assert [entry["address"] for entry in local.ctx.pool.describe()] == [f"{OTHER_IP}:15008"]
    assert metric(local, "shoal_proxy_bypass_connections_total") == 0
    assert metric(remote, "istio_tcp_received_bytes_total", reporter="destination",
                  connection_security_policy="mutual_tls",
                  source_principal="spiffe://cluster.local/ns/demo/sa/client") == len(b"across nodes")
    routes = {line["route"] for line in _access_lines(caplog) if line["reporter"] == "source"}
    assert routes == {"hbone"}


async def test_a_released_pod_loses_its_bypassed_connections(proxy, pod_netns):
    """As its tunnels are closed when a pod leaves the proxy (their sockets would keep its
    namespace alive), so are its same-node pairs: both apps get a reset."""
    from tests.agent.ztunnel.test_proxy import PODS
    harness = await proxy()
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    await harness.app.pods.remove_pod(PODS["server"].uid)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    assert not harness.app.ctx.bypass.live


async def test_ipv6_destination_takes_the_same_path(proxy):
    """Both families, one path: an app dialling the server's IPv6 address is joined the
    same way; the server app sees the client's IPv6 address."""
    from tests.agent.ztunnel.proxybed import CLIENT_IP6, SERVER_IP6
    harness = await proxy()
    payload = os.urandom(2 * 1024 * 1024)
    assert await harness.echo_roundtrip(payload, dst=(SERVER_IP6, APP_PORT)) == payload
    await _until(lambda: not harness.app.ctx.bypass.live)
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="joined") == 1
    assert metric(harness.app, "istio_tcp_received_bytes_total", reporter="destination") == len(payload)
    assert {peer[0] for peer in harness.echo.peers} == {CLIENT_IP6}


async def test_bytes_the_kernel_cannot_redirect_end_the_pair_and_go_nowhere(proxy, bypass_layout):
    """Fail closed: when the peer socket is no longer in the map (here taken out by hand;
    in life, a socket closing), the verdict keeps the bytes on the receiving socket; the
    proxy reads them there, resets both apps and counts it. The server app never sees them."""
    from shoal.datapath import bpfsys
    harness = await proxy()
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    (conn,) = harness.app.ctx.bypass.live
    fd = bpfsys.obj_get(bypass_layout.bpf_pin_dir("node-1") / "bypass_socks")
    try:
        assert bpfsys.map_delete(fd, ctypes.c_uint64(conn.pair.server_cookie))
    finally:
        os.close(fd)
    writer.write(b"not for anyone else")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    await _until(lambda: not harness.app.ctx.bypass.live)
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="broken") == 1
    for reporter in ("source", "destination"):
        assert metric(harness.app, "istio_tcp_connections_closed_total", reporter=reporter, response_flags="UR") == 1


async def test_a_server_that_stops_reading_pushes_back_on_the_client_then_gets_every_byte(proxy):
    """Attack: a client writing to a server app that reads nothing. The kernel's redirect
    queue stays below the high-water mark, the rest is handed back to the proxy, which
    holds one read of it until the server catches up, so TCP pushes back: the client's
    writes stop being taken. When the server reads again, every byte arrives in order, the
    byte counts are exact, and the pair is not broken."""
    from shoal.datapath.structs import BYPASS_HIGH_WATER
    harness = await proxy()
    bypass = harness.app.ctx.bypass
    reading, done = asyncio.Event(), asyncio.Event()
    digest, got = hashlib.sha256(), []

    async def stall_then_read(reader, writer):
        await reading.wait()
        while data := await reader.read(1 << 20):
            digest.update(data)
            got.append(len(data))
        done.set()
        writer.close()
    server = await _listen_in_pod(harness.path("server"), 7103, stall_then_read)
    try:
        reader, writer = await harness.connect_via_proxy(SERVER_IP, 7103)
        await _until(lambda: len(bypass.live) == 1)
        (conn,) = bypass.live
        payload = os.urandom(128 * 1024 * 1024)
        sent = 0
        while sent < len(payload):
            writer.write(payload[sent:sent + (1 << 20)])
            sent += 1 << 20
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except asyncio.TimeoutError:
                break   # the path took nothing for a second
        accepted = sent - writer.transport.get_write_buffer_size()
        counts = bypass.kernel().counts(conn.pair)
        on_server_socket = queued_bytes(conn.pair.server) - conn.pair.server_queued_before
        held_by_proxy = sum(map(len, conn.client_end.handed_back))
        print(f"accepted {accepted >> 10} KiB; redirected {counts.redirected_to_server >> 10} KiB, on the server "
              f"side's socket {on_server_socket >> 10} KiB, handed back {counts.handed_back_to_server >> 10} KiB, "
              f"held by the proxy {held_by_proxy >> 10} KiB")
        assert accepted < len(payload), "the client was never pushed back"
        assert counts.redirected_to_server - on_server_socket <= BYPASS_HIGH_WATER
        assert counts.handbacks >= 1 and held_by_proxy <= 1 << 20
        reading.set()
        writer.write(payload[sent:])
        await asyncio.wait_for(writer.drain(), 60)
        writer.write_eof()
        await asyncio.wait_for(done.wait(), 60)
        assert (sum(got), digest.digest()) == (len(payload), hashlib.sha256(payload).digest())
        relayed_at_end = conn.pair.relayed_to_server
        writer.close()
    finally:
        server.close()
    await _until(lambda: not bypass.live)
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="broken") == 0
    for reporter in ("source", "destination"):
        assert metric(harness.app, "istio_tcp_received_bytes_total", reporter=reporter) == len(payload)
    assert metric(harness.app, "shoal_proxy_bypass_handed_back_bytes_total") == relayed_at_end > 0


async def test_bytes_after_the_pair_entry_is_gone_are_not_taken_for_handed_back_ones(proxy, bypass_layout):
    """Attack on the hand-back: once a pair's entry is gone (evicted from the LRU map, here
    deleted by hand), the verdict passes every byte to the proxy unchecked. The proxy
    must not relay them (they could overtake bytes still in the kernel's queue): both apps
    are reset and it is counted as broken (not an app's reset)."""
    from shoal.datapath import bpfsys
    harness = await proxy()
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    (conn,) = harness.app.ctx.bypass.live
    fd = bpfsys.obj_get(bypass_layout.bpf_pin_dir("node-1") / "bypass_pairs")
    try:
        assert bpfsys.map_delete(fd, ctypes.c_uint64(conn.pair.client_cookie))
    finally:
        os.close(fd)
    writer.write(b"unchecked bytes")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    await _until(lambda: not harness.app.ctx.bypass.live)
    assert metric(harness.app, "shoal_proxy_bypass_connections_total", outcome="broken") == 1


def test_the_app_join_flag_and_its_environment_variable():
    """Off unless asked for (README: a blocking app's read in a sockmap can fail with EAGAIN)."""
    assert not ProxyConfig.from_args(["--node", "n"], env={}).same_node_app_join
    assert ProxyConfig.from_args(["--node", "n", "--same-node-app-join"], env={}).same_node_app_join
    assert ProxyConfig.from_args(["--node", "n"], env={"SHOAL_PROXY_SAME_NODE_APP_JOIN": "1"}).same_node_app_join


def _app_links(layout: ClusterLayout) -> int:
    from shoal.datapath import bpfsys
    from shoal.datapath.structs import AppKey
    fd = bpfsys.obj_get(layout.bpf_pin_dir("node-1") / "app_links")
    try:
        return len(bpfsys.map_keys(fd, AppKey))
    finally:
        os.close(fd)


async def test_with_the_app_join_the_proxy_links_both_apps_and_counts_exactly(proxy, bypass_layout, caplog):
    """The proxy's side of the app join (the kernel's is tests/shoal/datapath/test_bypass_app_join.py):
    both app sockets linked while the pair lives, unlinked when it ends, the same bytes and
    the same counts. (No sockops here, so the apps' sockets are not in app_socks: their
    sends take the proxy's path, which must stay exact with the links in place.)"""
    from shoal.datapath import bpfsys
    from shoal.datapath.structs import CONFIG_APP_JOIN, U32, U64
    harness = await proxy(same_node_app_join=True)
    app = harness.app
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    payload = os.urandom(8 * 1024 * 1024)
    assert await _pump(reader, writer, payload) == payload
    assert app.ctx.bypass.kernel().app_join
    assert _app_links(bypass_layout) == 2
    fd = bpfsys.obj_get(bypass_layout.bpf_pin_dir("node-1") / "config")
    try:
        value = U64()
        bpfsys.map_lookup(fd, U32(CONFIG_APP_JOIN), value)
        assert value.value == 1   # sockops puts app sockets into app_socks
    finally:
        os.close(fd)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await _until(lambda: not app.ctx.bypass.live)
    assert _app_links(bypass_layout) == 0
    assert metric(app, "shoal_proxy_bypass_app_directions_total", state="proxy_path") == 2
    for reporter in ("source", "destination"):
        assert metric(app, "istio_tcp_received_bytes_total", reporter=reporter) == len(payload)
        assert metric(app, "istio_tcp_sent_bytes_total", reporter=reporter) == len(payload)


async def test_with_the_app_join_a_reset_unlinks_the_apps_and_resets_both(proxy, bypass_layout):
    harness = await proxy(same_node_app_join=True)
    app = harness.app
    reader, writer = await harness.connect_via_proxy(SERVER_IP, APP_PORT)
    assert await _pump(reader, writer, b"x" * 1000) == b"x" * 1000
    assert _app_links(bypass_layout) == 2
    conn = next(iter(app.ctx.bypass.live))
    conn.reset("test")
    assert _app_links(bypass_layout) == 0
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 10)
    writer.close()

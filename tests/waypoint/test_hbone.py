"""The waypoint inside the mesh's transport: mTLS HBONE in, HBONE out (loopback, DevCA)."""
import asyncio
import contextlib
import json
import random
import types

import pytest
from prometheus_client import CollectorRegistry

from shoal.hbone import framing as hbone
from shoal.hbone.handshakes import HandshakeLimits
from shoal.hbone.identity import check_session
from shoal.hbone.issuer import IdentityManager
from shoal.hbone.session import HboneSession
from shoal.hbone.stream import HboneStream
from shoal.waypoint.hbone import HboneConnector, start_hbone_listener, trusted_source
from shoal.waypoint.http import Limits, StreamPair, pipe
from shoal.waypoint.proxy import WaypointProxy
from shoal.waypoint.resolver import StaticResolver
from shoal.waypoint.telemetry import RequestTelemetry
from shoal.waypoint.upstream import Endpoint
from shoal.xds.model import Authorization, Rule, Source
from tests.devca import DevCA

from .conftest import make_backend_app

pytestmark = pytest.mark.timeout(60)

WAYPOINT_ID = "spiffe://cluster.local/ns/demo/sa/waypoint"
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
WEB_ID = "spiffe://cluster.local/ns/demo/sa/web"
VIP = "10.96.0.10"


terminated_streams: dict[str, list] = {}   # the terminator's streams, per identity, for the tests to inspect


async def hbone_terminator(identities: IdentityManager, spiffe: str):
    """A stand-in for the endpoint's node proxy: HBONE in, plain TCP to the CONNECT target."""
    svid = await identities.get(spiffe)
    loop = asyncio.get_running_loop()
    seen = []
    streams = terminated_streams.setdefault(spiffe, [])

    def on_request(session, event):
        seen.append((session.peer_identity, event.host, event.port))
        stream = HboneStream()
        streams.append(stream)
        session.accept_stream(stream, event.stream_id)

        async def join():
            reader, writer = await asyncio.open_connection(event.host, event.port)
            app = StreamPair(reader, writer)
            await asyncio.gather(pipe(stream, app), pipe(app, stream), return_exceptions=True)
            stream.close()
            writer.close()
        asyncio.ensure_future(join())

    # TLS owns each socket from the accept on (no start_tls later: an early ClientHello would be lost).
    server = await loop.create_server(
        lambda: HboneSession(client_side=False, idle_timeout=30, on_request=on_request,
                             verify=lambda ssl_object: check_session(ssl_object, None)),
        "127.0.0.1", 0, ssl=svid.server_context)
    return server, seen


async def hbone_client(identities, port, identity=CLIENT_ID, host="127.0.0.1", source=None):
    """An HBONE session to the waypoint; ``source``: the local address to dial from (the
    waypoint keys its abuse limits by it, as by a pod's address in the mesh)."""
    svid = await identities.get(identity)
    loop = asyncio.get_running_loop()
    session = HboneSession(client_side=True, idle_timeout=30)
    transport, _ = await loop.create_connection(lambda: session, host, port, ssl=svid.client_context,
                                                server_hostname="", local_addr=(source, 0) if source else None)
    assert check_session(transport.get_extra_info("ssl_object"), WAYPOINT_ID) == WAYPOINT_ID
    return session


async def open_tunnel(session, authority_ip, authority_port, forwarded_for="10.244.1.7"):
    stream = HboneStream()
    stream.response = asyncio.get_running_loop().create_future()
    session.open_stream(stream, authority_ip, authority_port, forwarded_for, hbone.new_traceparent())
    return stream, await asyncio.wait_for(stream.response, 5)


async def http_over(stream, request: bytes) -> bytes:
    stream.write(request)
    await stream.drain()
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
            [line for line in answer.split(b"\r\n") if line.lower().startswith(b"content-length")][0].split(b":")[1]):
        chunk = await asyncio.wait_for(stream.read(65536), 5)
        assert chunk, answer
        answer += chunk
    return answer


@contextlib.asynccontextmanager
async def mesh_bed(policies=(), workloads=None, listen="127.0.0.1"):
    """A web app behind a stand-in node proxy (HBONE), and a waypoint in front (HBONE)."""
    from aiohttp import web
    ca = DevCA()
    identities = IdentityManager(ca.sign)
    await identities.get(WAYPOINT_ID)
    seen_app = []
    runner = web.AppRunner(make_backend_app("web", seen_app), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    app_port = runner.addresses[0][1]
    terminated_streams.pop(WEB_ID, None)
    terminator, seen_tunnels = await hbone_terminator(identities, WEB_ID)
    endpoint = Endpoint("127.0.0.1", app_port, "web-0", "web-0", "demo", WEB_ID, "HBONE")
    resolver = StaticResolver({("demo", "web"): [endpoint]}, namespace="demo", policies=list(policies),
                              vips={VIP: ("demo", "web")}, workloads=workloads or {})
    registry = CollectorRegistry()
    access_log: list[dict] = []
    connector = HboneConnector(identities, WAYPOINT_ID, "127.0.0.1",
                               hbone_port=terminator.sockets[0].getsockname()[1], mark=None)
    telemetry = RequestTelemetry(registry, access_log=lambda line: access_log.append(json.loads(line)))
    proxy = WaypointProxy(resolver, connector, telemetry, Limits(), rng=random.Random(1))
    listener = await start_hbone_listener(proxy, Limits(), identities, WAYPOINT_ID, host=listen, port=0)
    try:
        yield types.SimpleNamespace(ca=ca, identities=identities, port=listener.sockets[0].getsockname()[1],
                                    app_port=app_port, seen_tunnels=seen_tunnels, registry=registry, proxy=proxy,
                                    access_log=access_log)
    finally:
        listener.close()
        terminator.close()
        connector.close()
        await proxy.close()
        await runner.cleanup()


async def test_hbone_in_and_out_with_identities_and_policy():
    only_client = Authorization("only-client", "demo", "ALLOW", rules=(Rule(sources=(Source(principals=(CLIENT_ID,)),)),))
    async with mesh_bed([only_client]) as bed:
        ca, identities, port, app_port = bed.ca, bed.identities, bed.port, bed.app_port
        seen_tunnels, registry = bed.seen_tunnels, bed.registry
        session = await hbone_client(identities, port)
        stream, status = await open_tunnel(session, VIP, 8080)
        assert status == 200
        # Two requests on one tunnel (keep-alive), the Host header is ignored: the VIP decides.
        for path in ("/one", "/two"):
            answer = await http_over(stream, f"GET {path} HTTP/1.1\r\nHost: whatever\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200"), answer
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["path"] == path
        stream.close()
        # The upstream leg went over HBONE with the waypoint's identity, to the endpoint's address.
        assert seen_tunnels[0] == (WAYPOINT_ID, "127.0.0.1", app_port)
        assert len(seen_tunnels) == 1  # pooled: both requests on one upstream stream
        samples = {(s.labels["source_principal"], s.labels["connection_security_policy"]): s.value
                   for f in registry.collect() for s in f.samples if s.name == "istio_requests_total"}
        assert samples == {(CLIENT_ID, "mutual_tls"): 2.0}

        # HTTP/2 cleartext inside another tunnel: two concurrent streams.
        import h2.config
        import h2.connection
        import h2.events
        stream, status = await open_tunnel(session, VIP, 8080)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        client.initiate_connection()
        for sid in (1, 3):
            client.send_headers(sid, [(":method", "GET"), (":path", f"/h2/{sid}"), (":scheme", "http"),
                                      (":authority", "web.demo")], end_stream=True)
        stream.write(client.data_to_send())
        bodies, ended = {}, set()
        while len(ended) < 2:
            for ev in client.receive_data(await asyncio.wait_for(stream.read(65536), 5)):
                if isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended.add(ev.stream_id)
            stream.write(client.data_to_send())
        assert {sid: json.loads(b)["path"] for sid, b in bodies.items()} == {1: "/h2/1", 3: "/h2/3"}
        stream.close()

        # Another identity is refused by the L7 ALLOW policy.
        other = IdentityManager(ca.sign)
        svid = await other.get("spiffe://cluster.local/ns/legacy/sa/intruder")
        loop = asyncio.get_running_loop()
        intruder = HboneSession(client_side=True, idle_timeout=30)
        await loop.create_connection(lambda: intruder, "127.0.0.1", port, ssl=svid.client_context, server_hostname="")
        stream, status = await open_tunnel(intruder, VIP, 8080)
        answer = await http_over(stream, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403")
        stream.close()


async def test_plain_tls_without_client_certificate_is_refused():
    import ssl
    ca = DevCA()
    identities = IdentityManager(ca.sign)
    await identities.get(WAYPOINT_ID)
    proxy = WaypointProxy(StaticResolver({}), HboneConnector(identities, WAYPOINT_ID, "127.0.0.1", mark=None),
                          RequestTelemetry(CollectorRegistry()))
    listener = await start_hbone_listener(proxy, Limits(), identities, WAYPOINT_ID, host="127.0.0.1", port=0)
    port = listener.sockets[0].getsockname()[1]
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
        writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(reader.read(100), 5)
            if not data:
                raise ConnectionError("closed")
        writer.close()
    finally:
        listener.close()
        await proxy.close()


def test_l7_flow_per_request_with_reply_addresses(tmp_path):
    """Each request becomes one Hubble L7 flow on the agent's socket (server -> client addresses)."""
    import socket

    from shoal.api.flow import flow_pb2
    from shoal.flows.emitter import KIND_FLOW, FlowEmitter
    from shoal.waypoint.http import PeerInfo, ProxyRequest, empty_body
    from shoal.xds.model import Operation

    path = tmp_path / "flows.sock"
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    agent.bind(str(path))
    emitter = FlowEmitter(path)
    deny = Authorization("no-delete", "demo", "DENY", rules=(Rule(operations=(Operation(methods=("DELETE",)),)),))
    resolver = StaticResolver({("demo", "web"): [Endpoint("10.244.2.3", 8080)]}, policies=[deny],
                              vips={VIP: ("demo", "web")})
    proxy = WaypointProxy(resolver, HboneConnector(None, WAYPOINT_ID, "127.0.0.1", mark=None),
                          RequestTelemetry(CollectorRegistry(), flow_emitter=emitter))

    class Sink:
        started = False

        async def start(self, status, headers, length):
            self.started, self.status = True, status

        async def send(self, chunk):
            pass

        async def end(self):
            pass

    peer = PeerInfo("10.244.1.7", 0, CLIENT_ID, VIP, 8080, mtls=True)
    sink = Sink()

    async def request_then_receive() -> bytes:
        # Flows leave in batches, a moment after the answer: received while the loop runs.
        await proxy.handle(ProxyRequest("DELETE", "/admin/x", "web.demo:8080", [], "HTTP/1.1", peer, 0),
                           empty_body(), sink)
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(agent, 65536), 5)

    agent.setblocking(False)
    record = asyncio.run(request_then_receive())
    assert sink.status == 403
    agent.close()
    assert record[:1] == KIND_FLOW
    flow = flow_pb2.Flow.FromString(record[1:])
    assert flow.verdict == flow_pb2.DROPPED and flow.l7.http.code == 403 and flow.l7.http.method == "DELETE"
    assert flow.l7.http.url == "http://web.demo:8080/admin/x"
    assert (flow.IP.source, flow.IP.destination) == (VIP, "10.244.1.7")


def test_early_client_hello_is_never_lost_on_uvloop():
    """The ClientHello sent with the connect (as every TLS client does) reaches TLS even
    when the waypoint's loop is busy (uvloop reads right after accept): every handshake
    of a burst completes at once. Before the listener accepted raw sockets, a share of
    them stalled until the handshake timeout."""
    import time

    import uvloop

    async def burst():
        ca = DevCA()
        identities = IdentityManager(ca.sign)
        await identities.get(WAYPOINT_ID)
        await identities.get(CLIENT_ID)
        proxy = WaypointProxy(StaticResolver({}), HboneConnector(identities, WAYPOINT_ID, "127.0.0.1", mark=None),
                              RequestTelemetry(CollectorRegistry()))
        listener = await start_hbone_listener(proxy, Limits(), identities, WAYPOINT_ID, host="127.0.0.1", port=0,
                                              handshake_limits=HandshakeLimits(timeout=8.0))
        port = listener.sockets[0].getsockname()[1]
        client = (await identities.get(CLIENT_ID)).client_context
        loop = asyncio.get_running_loop()
        try:
            for _round in range(5):
                started = time.monotonic()
                # The loop is held while the connections are made and their ClientHellos sent.
                connects = [loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=client,
                                                   server_hostname="") for _ in range(40)]
                results = await asyncio.wait_for(asyncio.gather(*connects), 20)
                took = time.monotonic() - started
                assert took < 4.0, f"a handshake stalled: the burst took {took:.1f} s"
                for transport, _ in results:
                    assert check_session(transport.get_extra_info("ssl_object"), WAYPOINT_ID) == WAYPOINT_ID
                    transport.close()
        finally:
            listener.close()
            await proxy.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(burst())


async def test_normal_closes_end_streams_instead_of_resetting_them():
    """A response that closes the connection, and an idle pooled upstream closed by the
    waypoint, end their HBONE streams with END_STREAM: the node proxies on the other side
    must not see "stream reset by peer (code 8)" and report UR for normal traffic."""
    async with mesh_bed() as bed:
        session = await hbone_client(bed.identities, bed.port)
        stream, status = await open_tunnel(session, VIP, 8080)
        assert status == 200
        stream.write(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := await asyncio.wait_for(stream.read(65536), 5):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert stream._reset is None and stream._eof_in   # the waypoint ended its side
        stream.close()
        await bed.proxy.close()   # closes the idle pooled upstream
        upstream = terminated_streams[WEB_ID]
        for _ in range(50):
            if all(s._eof_in for s in upstream):
                break
            await asyncio.sleep(0.02)
        assert upstream and all(s._eof_in and s._reset is None for s in upstream)


def _hbone_rapid_reset() -> bytes:
    import h2.config
    import h2.connection
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for i in range(400):
        client.send_headers(1 + 2 * i, [(":method", "CONNECT"), (":authority", f"{VIP}:8080")])
        client.reset_stream(1 + 2 * i)
    return client.data_to_send()


def _hbone_continuation_flood() -> bytes:
    from .test_downstream import continuation_flood
    return continuation_flood(4)   # 5 x 18 KB: past the 64 KiB cap, small enough to be read whole


def rejected_by_reason(registry) -> dict:
    return {s.labels.get("reason"): s.value for f in registry.collect() for s in f.samples
            if s.name == "shoal_waypoint_rejected_requests_total"}


@pytest.mark.parametrize("attack,reason", [(_hbone_rapid_reset, "hbone_premature_reset_flood"),
                                           (_hbone_continuation_flood, "hbone_header_block_too_large")])
async def test_floods_on_the_hbone_side_get_goaway_and_others_live_on(attack, reason):
    """The HBONE side relies on the shared HBONE limits (shoal.hbone.framing), once; the
    abuser's address then waits in the penalty box, as on the node proxy."""
    from .test_downstream import goaway_code, read_all

    async with mesh_bed() as bed:
        svid = await bed.identities.get(CLIENT_ID)
        reader, writer = await asyncio.open_connection("127.0.0.1", bed.port, ssl=svid.client_context,
                                                       server_hostname="")
        writer.write(attack())
        got = await read_all(reader)
        writer.close()
        assert goaway_code(got) == 0xB        # ENHANCE_YOUR_CALM
        assert rejected_by_reason(bed.registry) == {reason: 1}
        # Its next connection is refused at accept (reset before any TLS), counted.
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(hbone_client(bed.identities, bed.port), 5)
        assert rejected_by_reason(bed.registry) == {reason: 1, "abuser_penalty": 1}
        # Another client's tunnel (another address) is unaffected.
        session = await hbone_client(bed.identities, bed.port, source="127.0.0.2")
        stream, status = await open_tunnel(session, VIP, 8080)
        assert status == 200
        assert (await http_over(stream, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")).startswith(b"HTTP/1.1 200")
        stream.close()


def test_forwarded_source_is_believed_only_from_that_workloads_own_identity():
    identities = {"10.244.1.7": CLIENT_ID}.get
    # The node proxy of client-0 speaks with client-0's identity: its forwarded address holds.
    assert trusted_source("10.244.1.7", "10.244.1.1", CLIENT_ID, identities) == "10.244.1.7"
    # Any other identity naming that address gets its own (connection) address instead.
    assert trusted_source("10.244.1.7", "10.244.2.9", WEB_ID, identities) == "10.244.2.9"
    # An address nobody hosts, garbage, no header, no identity: the peer's address.
    assert trusted_source("10.244.9.9", "10.244.2.9", CLIENT_ID, identities) == "10.244.2.9"
    assert trusted_source("not-an-ip", "10.244.2.9", CLIENT_ID, identities) == "10.244.2.9"
    assert trusted_source(None, "10.244.2.9", CLIENT_ID, identities) == "10.244.2.9"
    assert trusted_source("10.244.1.7", "10.244.2.9", None, identities) == "10.244.2.9"
    # IPv4 peers of the dual-stack listener are reported as IPv4.
    assert trusted_source(None, "::ffff:10.244.2.9", None, identities) == "10.244.2.9"
    assert trusted_source("::ffff:10.244.1.7", "::ffff:10.244.1.1", CLIENT_ID, identities) == "10.244.1.7"


async def test_a_forged_forwarded_header_does_not_borrow_another_workloads_source():
    """Attack: an HBONE peer with its own valid SVID (legacy/intruder) claims in ``forwarded``
    to come from client-0's address, to pass a policy that admits the demo namespace and
    client-0's address. The waypoint takes the intruder's own address and namespace: 403."""
    from shoal.waypoint.proxy import WorkloadInfo

    client_ip = "10.244.1.7"
    workloads = {client_ip: WorkloadInfo("client-0", "demo", "client", CLIENT_ID)}
    from_demo = Authorization("from-demo", "demo", "ALLOW", rules=(
        Rule(sources=(Source(namespaces=("demo",), ip_blocks=(f"{client_ip}/32",)),)),))
    async with mesh_bed([from_demo], workloads=workloads) as bed:
        intruder_id = "spiffe://cluster.local/ns/legacy/sa/intruder"
        intruder = await hbone_client(bed.identities, bed.port, identity=intruder_id)
        stream, status = await open_tunnel(intruder, VIP, 8080, forwarded_for=client_ip)
        assert status == 200
        answer = await http_over(stream, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403"), answer
        stream.close()
        # client-0's own node proxy (client-0's identity) with the same header is admitted.
        session = await hbone_client(bed.identities, bed.port)
        stream, status = await open_tunnel(session, VIP, 8080, forwarded_for=client_ip)
        answer = await http_over(stream, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        stream.close()
        bed.proxy.telemetry.flush()   # lines are made in batches
        sources = [(line["downstream_remote_address"], line["response_code"]) for line in bed.access_log]
        assert sources == [("127.0.0.1:0", 403), (f"{client_ip}:0", 200)], bed.access_log


async def test_the_hbone_listener_is_dual_stack():
    """Listening on ``::`` (the default) takes IPv6 and IPv4 clients on one socket; an IPv4
    client is reported with its IPv4 address, not ``::ffff:...``."""
    async with mesh_bed(listen="::") as bed:
        for host in ("::1", "127.0.0.1"):
            session = await hbone_client(bed.identities, bed.port, host=host)
            stream, status = await open_tunnel(session, VIP, 8080, forwarded_for=host)
            assert status == 200
            answer = await http_over(stream, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200"), (host, answer)
            stream.close()
        bed.proxy.telemetry.flush()   # lines are made in batches
        assert [line["downstream_remote_address"] for line in bed.access_log] == ["::1:0", "127.0.0.1:0"]


def test_an_upstream_dial_reset_before_its_client_hello_closes_no_other_socket(monkeypatch):
    """The waypoint's HBONE dial has the node proxy's burst bug's shape: a peer resetting
    before the ClientHello left the dial's socket naming a number libuv had closed; freed,
    it closed whichever socket had that number next (shoal/hbone/handoff.py). On uvloop,
    the waypoint's loop (shoal.runtime), where the bug lives."""
    import gc
    import os
    import select
    import socket
    import struct

    import uvloop

    from tests.shoal.hbone.test_handoff import client_context, sockets_until

    async def scenario() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        loop = asyncio.get_running_loop()
        real_connect = loop.sock_connect

        async def connect_then_get_reset(sock, address):
            await real_connect(sock, address)
            conn, _ = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            poller = select.poll()
            poller.register(sock, select.POLLERR | select.POLLHUP)
            assert poller.poll(2000), "the reset did not arrive"

        monkeypatch.setattr(loop, "sock_connect", connect_then_get_reset)

        async def identity(_spiffe_id):
            return types.SimpleNamespace(client_context=client_context())

        connector = HboneConnector(types.SimpleNamespace(get=identity), "spiffe://cluster.local/ns/a/sa/waypoint",
                                   "127.0.0.1", hbone_port=listener.getsockname()[1], mark=None, connect_timeout=2.0)
        made: list[tuple[socket.socket, int]] = []   # each socket and the number it was given
        real_socket = connector._socket

        def recorded_socket(family):
            sock = real_socket(family)
            made.append((sock, sock.fileno()))
            return sock

        monkeypatch.setattr(connector, "_socket", recorded_socket)
        try:
            with pytest.raises(ConnectionError):
                await connector.open(Endpoint("127.0.0.1", 8080, protocol="HBONE",
                                              spiffe_id="spiffe://cluster.local/ns/b/sa/b"))
            await asyncio.sleep(0.01)   # the closes the loop queued have run
            [(sock, number)] = made
            others = sockets_until(number)   # one takes the failed dial's number
            try:
                [other] = [s for s in others if s.fileno() == number]
                before = os.fstat(other.fileno()).st_ino
                made.clear()
                del sock
                gc.collect()   # frees whatever the failed dial left behind
                assert os.fstat(other.fileno()).st_ino == before, "the failed dial closed another socket"
            finally:
                for s in others:
                    s.close()
        finally:
            listener.close()

    uvloop.run(scenario())

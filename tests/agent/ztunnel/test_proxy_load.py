"""Issue 18 on the real in-process proxy (real namespaces, TLS, HTTP/2): many concurrent
connections, overload shedding, and HTTP/2 abuse on 15008 from a certificate holder
(a raw ``h2`` client over TLS) while another client keeps working. Floods are scaled
down for CI; the full-size runs are ``python -m shoal.perf run --only load``."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest

from shoal.agent.ztunnel.admission import STREAM_KIND
from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.agent.ztunnel.proxy import accept_queue_length
from shoal.h2guard import PrematureResets
from shoal.hbone.handshakes import HandshakeGate, HandshakeLimits
from shoal.hbone.penalty import PenaltyBox
from tests.agent.ztunnel.proxybed import OTHER_IP, SERVER_IP, EchoServer, until
from tests.agent.ztunnel.test_proxy import (
    APP_PORT,
    Harness,
    _client_context,
    _tls_15008,
    metric,
    running_proxy,
)
from tests.devca import DevCA

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]
ATTACKER = "spiffe://cluster.local/ns/demo/sa/client"  # any meshed pod's certificate will do


async def _roundtrips(h: Harness, count: int, payload: bytes = b"hello", timeout: float = 5) -> list:
    """``count`` concurrent echo round trips through the proxy; the failures."""
    async def one(i):
        line = payload + b"%d" % i
        try:
            reader, writer = await h.connect_via_proxy(SERVER_IP, APP_PORT)
            writer.write(line)
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), timeout)
            writer.close()
            return None if data == line else data
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            return repr(exc)
    results = await asyncio.gather(*(one(i) for i in range(count)))
    return [r for r in results if r is not None]


async def test_many_concurrent_connections_share_capped_hbone_connections(pod_netns, state, ca, tmp_path):
    # One loop runs the clients, both proxy halves and the app here, on a shared CI
    # machine: generous timeouts (all must succeed, not fast); 1,000 run against the
    # cluster's real proxies (test_zt_cluster) and 10,000 in perf/ (scenario "load").
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, connect_timeout=60.0,
                             handshake_limits=HandshakeLimits(timeout=60.0)) as (h, _):
        assert await _roundtrips(h, 350, timeout=60) == []
        pool = h.app.ctx.pool
        assert len(pool) == 4  # 100 streams per HBONE connection, more opened beyond
        assert sorted(s["streams"] for s in pool.describe()) == [0, 0, 0, 0]  # every stream released
        assert await h.echo_roundtrip() == b"hello"  # and right after, business as usual


async def test_overload_sheds_new_connections_and_keeps_established_ones(pod_netns, state, ca, tmp_path):
    # Both ends on this proxy: each connection is two live records (source, destination).
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, max_connections=20) as (h, _):
        held = [await h.connect_via_proxy(SERVER_IP, APP_PORT) for _ in range(10)]
        for reader, writer in held:
            writer.write(b"up")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"up"
        with pytest.raises(ConnectionError):  # refused at once (reset), not left hanging
            reader, writer = await h.connect_via_proxy(SERVER_IP, APP_PORT)
            if not await asyncio.wait_for(reader.read(), 2):
                raise ConnectionResetError("closed")
        assert metric(h.app, "shoal_proxy_rejected_total", reason="overloaded") >= 1
        for reader, writer in held:  # established connections carry on
            writer.write(b"still")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
        for _, writer in held[:5]:
            writer.close()
        telemetry = h.app.ctx.telemetry
        await until(lambda: len(telemetry.live) <= 10, "the proxy saw five of them end")
        assert await h.echo_roundtrip() == b"hello"  # room again: served


async def test_a_burst_past_the_setup_cap_waits_in_the_kernel_instead_of_being_refused(pod_netns, state, ca,
                                                                                        tmp_path):
    # Refusing here lost 1,408 of a 10,000-connection burst that a moment later would have
    # gone through (issue 18): past the cap the listener pauses, the burst queues in the
    # kernel's accept queue, and every connection is served.
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, max_connections_in_setup=10,
                             connect_timeout=60.0, handshake_limits=HandshakeLimits(timeout=60.0)) as (h, _):
        assert await _roundtrips(h, 200, timeout=60) == []
        assert metric(h.app, "shoal_proxy_accept_paused_total", listener="outbound") >= 1
        assert metric(h.app, "shoal_proxy_rejected_total", reason="overloaded") == 0
        assert h.app.ctx.admission.in_setup == 0
        assert await h.echo_roundtrip() == b"hello"


# -- shedding on queueing delay -------------------------------------------------------------

SLOW_PORT = 9000
SLOW_LINK = ["tbf", "rate", "16kbit", "burst", "1600", "latency", "20s"]  # ~5 connections a second


@contextlib.asynccontextmanager
async def _slow_upstream(pod_netns, state, ca, tmp_path):
    """The proxy (outbound setups capped at 4, shedding after 0.5 s standing for 1 s) in
    front of an unmeshed app behind a 16 kbit/s link: every setup waits for its SYN to
    cross the link, so the proxy serves about five connections a second, first-in first-out."""
    tc = ["ip", "netns", "exec", pod_netns["server"], "tc", "qdisc"]
    subprocess.run([*tc, "replace", "dev", "vother", "root", *SLOW_LINK], check=True)
    try:
        async with running_proxy(pod_netns, state, ca.sign, tmp_path, max_connections_in_setup=4,
                                 overload_target=0.5, overload_interval=1.0, connect_timeout=60.0) as (h, _):
            legacy = await EchoServer().start(f"/run/netns/{pod_netns['other']}", OTHER_IP, SLOW_PORT)
            try:
                yield h
            finally:
                legacy.close()
    finally:
        subprocess.run([*tc, "del", "dev", "vother", "root"], capture_output=True)   # the namespaces outlive a test


async def _timed_roundtrip(h: Harness, i: int, timeout: float = 60) -> tuple[str, float]:
    """One connection through the proxy to the slow app: (outcome, seconds to its echo)."""
    started = time.monotonic()
    line = b"conn %d\n" % i
    try:
        reader, writer = await h.connect_via_proxy(OTHER_IP, SLOW_PORT)
        try:
            writer.write(line)
            echoed = await asyncio.wait_for(reader.readexactly(len(line)), timeout)
        finally:
            writer.close()
        return ("ok" if echoed == line else "bad echo"), time.monotonic() - started
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        return f"reset:{type(exc).__name__}", time.monotonic() - started
    except asyncio.TimeoutError:
        return "timeout", time.monotonic() - started


async def test_sustained_overload_sheds_old_setups_and_serves_the_rest_in_bounded_time(pod_netns, state, ca,
                                                                                         tmp_path):
    # 20 connections a second for 6 s into a proxy that serves ~5 a second. First-in
    # first-out without shedding, the last one would wait ~20 s (and a client with a 10 s
    # timeout would see every one served after it had gone).
    async with _slow_upstream(pod_netns, state, ca, tmp_path) as h:
        established = await h.connect_via_proxy(SERVER_IP, APP_PORT)   # HBONE, not behind the slow link
        pings: list[float] = []

        async def keep_pinging(stop: asyncio.Event):
            reader, writer = established
            while not stop.is_set():
                started = time.monotonic()
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                pings.append(time.monotonic() - started)
                await asyncio.sleep(0.25)

        stop = asyncio.Event()
        pinger = asyncio.ensure_future(keep_pinging(stop))
        clients = []
        for i in range(120):
            clients.append(asyncio.ensure_future(_timed_roundtrip(h, i)))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*clients)
        stop.set()
        await pinger
        served = [seconds for outcome, seconds in results if outcome == "ok"]
        refused = [outcome for outcome, _ in results if outcome != "ok"]
        shed = metric(h.app, "shoal_proxy_rejected_total", listener="outbound", reason="queue_delay")
        # The excess was refused, at once (a reset, not a hang), and every refusal counted.
        assert refused and all(outcome.startswith("reset") for outcome in refused), refused
        assert shed == len(refused)
        # Those served did not wait behind a backlog older than they are.
        assert len(served) >= 15
        assert max(served) < 6.0, sorted(served)[-5:]
        # The established connection kept flowing all along.
        assert len(pings) >= 10 and max(pings) < 3.0, pings
        # Once the load is gone, the kind recovers and serves at once.
        outcome, seconds = await _timed_roundtrip(h, 1000, timeout=10)
        assert outcome == "ok"
        for _ in range(50):
            if not h.app.ctx.admission.overloaded("outbound"):
                break
            await asyncio.sleep(0.1)
        assert not h.app.ctx.admission.overloaded("outbound")
        assert metric(h.app, "shoal_proxy_setup_wait_seconds_count", listener="outbound") >= len(served)


async def test_a_burst_that_drains_is_not_shed_although_it_stands_longer_than_the_interval(pod_netns, state, ca,
                                                                                            tmp_path):
    # 40 connections at once, clients that wait: ~8 s to drain at ~5 a second, far more
    # than the 1 s interval, but nothing new arrives and the backlog shrinks all along.
    async with _slow_upstream(pod_netns, state, ca, tmp_path) as h:
        results = await asyncio.gather(*(_timed_roundtrip(h, i) for i in range(40)))
        assert [outcome for outcome, _ in results if outcome != "ok"] == []
        assert max(seconds for _, seconds in results) > 2.0   # it did stand past interval + target
        assert metric(h.app, "shoal_proxy_rejected_total", reason="queue_delay") == 0
        assert not h.app.ctx.admission.overloaded("outbound")


# -- an overloaded peer: inbound streams refused unprocessed ----------------------------------

STALL_PORT = 9300


def _stalled_app(netns: str) -> socket.socket:
    """An app in the pod that never accepts, its accept queue one deep: once one connection
    waits there, a connect to it hangs (the kernel drops its SYNs), so a stream dialling
    it stays in setup as long as we like."""
    home = NetnsHandle.current()
    pod = NetnsHandle.from_path(f"/run/netns/{netns}", home)
    try:
        with pod.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    finally:
        pod.close()
    sock.bind(("0.0.0.0", STALL_PORT))
    sock.listen(0)
    return sock


async def test_an_overloaded_peer_refuses_new_streams_unprocessed_and_keeps_serving_established_ones(
        pod_netns, state, ca, tmp_path):
    # The inbound half at its cap of streams in setup (1, by config): a new CONNECT is reset
    # with REFUSED_STREAM before anything is done; the outbound half retries once, then
    # resets its client and counts it. Neither half stalls, established tunnels carry on.
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, max_streams_in_setup=1,
                             connect_timeout=30.0) as (h, _):
        admission = h.app.ctx.admission
        reader, writer = await h.connect_via_proxy(SERVER_IP, APP_PORT)
        writer.write(b"up")
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"up"
        stalled = _stalled_app(pod_netns["server"])
        try:
            await h.connect_via_proxy(SERVER_IP, STALL_PORT)                  # fills its accept queue
            await until(lambda: accept_queue_length(stalled) == 1 and not admission.backlog(STREAM_KIND))
            await h.connect_via_proxy(SERVER_IP, STALL_PORT)                  # its dial hangs: in setup
            await until(lambda: admission.backlog(STREAM_KIND) == 1)
            apps_seen = len(h.echo.peers)
            refused_reader, refused_writer = await h.connect_via_proxy(SERVER_IP, APP_PORT)
            with pytest.raises(ConnectionError):         # reset, not left hanging until a timeout
                if not await asyncio.wait_for(refused_reader.read(), 15):
                    raise ConnectionResetError("closed")
            refused_writer.close()
            assert len(h.echo.peers) == apps_seen        # unprocessed: the app never saw it
            assert metric(h.app, "shoal_proxy_rejected_total", listener="hbone", reason="stream_overloaded") == 2
            assert metric(h.app, "shoal_proxy_rejected_total", listener="outbound", reason="peer_refused") == 1
            writer.write(b"still")                       # the established tunnel carries on
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"still"
        finally:
            stalled.close()   # the hung dial is refused at its next SYN: room again
        await until(lambda: not admission.backlog(STREAM_KIND))
        assert await h.echo_roundtrip() == b"hello"
        writer.close()


# -- HTTP/2 abuse on 15008 ---------------------------------------------------------------------

@pytest.fixture
async def bed(pod_netns, state, ca, tmp_path):
    """The proxy with room in its timeouts: the other client's requests must all succeed
    during a flood on a shared CI machine; their latency is perf's business."""
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, connect_timeout=30.0) as (h, _):
        yield h


class RawH2:
    """A certificate holder speaking raw HTTP/2 to a pod's 15008 (from the 'other' pod)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         validate_outbound_headers=False))
        self.events: list = []

    @classmethod
    async def open(cls, h: Harness, ca) -> "RawH2":
        raw = cls(*await _tls_15008(h, _client_context(ca, ATTACKER)))
        raw.conn.initiate_connection()
        raw.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        raw.flush()
        return raw

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def write(self, data: bytes) -> bool:
        try:
            self.writer.write(data)
            await self.writer.drain()
            return True
        except ConnectionError:
            return False

    async def read_until_closed(self, timeout: float = 10) -> list:
        try:
            while data := await asyncio.wait_for(self.reader.read(65536), timeout):
                try:
                    self.events += self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    pass  # the attacker does not care
        except ConnectionError:
            pass
        self.writer.close()
        return self.events

    def goaway(self):
        return next((int(e.error_code) for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)


def _sockets_to_app(netns: str) -> list[str]:
    """TCP sockets to or from the app's port in the server pod, any state but TIME-WAIT."""
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htan"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f":{APP_PORT} " in line + " " and "TIME-WAIT" not in line
            and "LISTEN" not in line]


async def _during(h: Harness, flood) -> list:
    """Another client's round trips, 40 over the flood's duration; their failures."""
    failures: list = []

    async def other_client():
        for _ in range(20):
            failures.extend(await _roundtrips(h, 2, timeout=15))
            await asyncio.sleep(0.02)
    await asyncio.gather(flood, other_client())
    return failures


async def test_rapid_reset_costs_no_orphaned_upstream_socket_and_no_other_client(bed, ca):
    raw = await RawH2.open(bed, ca)
    authority = f"{SERVER_IP}:{APP_PORT}"

    async def flood():
        reading = asyncio.ensure_future(raw.read_until_closed())
        for batch in range(40):  # up to 4,000 CONNECT+RST pairs
            for stream_id in range(1 + batch * 200, 1 + (batch + 1) * 200, 2):
                raw.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
                raw.conn.reset_stream(stream_id)
            if not await raw.write(raw.conn.data_to_send()):
                break
            await asyncio.sleep(0)
        await reading

    assert await _during(bed, flood()) == []
    assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="premature_reset_flood") == 1
    # No FIN-WAIT-1, no leaked ESTABLISHED: before, 12,443 orphans stayed for minutes; the
    # resets' closes are the proxy's next steps, on a loaded machine not within a fixed sleep.
    await until(lambda: _sockets_to_app(bed.netns["server"]) == [], "no socket to the app left", timeout=10)
    assert len(bed.echo.peers) <= PrematureResets().min_streams // 2 + 40  # not one per reset


async def test_a_slow_rapid_reset_is_cut_at_half_of_the_streams(bed, ca):
    """CONNECT+RST pairs a few a second: the old budget (200, then 20 a second) never ran
    out at this pace, so each pair could cost a dial forever; the ratio cuts it at 50."""
    raw = await RawH2.open(bed, ca)
    authority = f"{SERVER_IP}:{APP_PORT}"
    reading = asyncio.ensure_future(raw.read_until_closed())
    sent = 0
    for stream_id in range(1, 2 * 120, 2):
        if reading.done() or raw.goaway() is not None:
            break
        raw.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
        raw.conn.reset_stream(stream_id)
        if not await raw.write(raw.conn.data_to_send()):
            break
        sent += 1
        await asyncio.sleep(0.02)
    await reading
    assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="premature_reset_flood") == 1
    assert sent < 120
    assert await _roundtrips(bed, 2) == []   # and the others are served


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_control_frame_flood_gets_goaway_and_costs_other_clients_nothing(bed, ca, kind):
    raw = await RawH2.open(bed, ca)
    frame = hyperframe.frame.PingFrame(0, opaque_data=bytes(8)) if kind == "ping" else \
        hyperframe.frame.SettingsFrame(0, settings={4: 1 << 20})
    chunk = frame.serialize() * 2000

    async def flood():
        reading = asyncio.ensure_future(raw.read_until_closed())
        for _ in range(100):  # up to 200,000 frames
            if not await raw.write(chunk):
                break
        await reading

    assert await _during(bed, flood()) == []
    assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(bed.app, "shoal_proxy_rejected_total", reason=f"{kind}_flood") == 1


async def test_an_abuser_reconnecting_at_once_is_refused_before_tls_and_no_one_else_is(bed, ca):
    bed.app.ctx.gatekeeper.box = PenaltyBox(first=60.0)   # the default 2 s could pass on a loaded machine
    raw = await RawH2.open(bed, ca)
    chunk = hyperframe.frame.PingFrame(0, opaque_data=bytes(8)).serialize() * 2000
    refused: list = []

    async def flood():
        reading = asyncio.ensure_future(raw.read_until_closed())
        for _ in range(100):
            if not await raw.write(chunk):
                break
        await reading
        loop = asyncio.get_running_loop()
        for _ in range(5):   # straight back, as an abuser does, for a fresh budget each time
            sock = bed.raw_socket("other")
            try:
                await loop.sock_connect(sock, (SERVER_IP, 15008))
                # Refused at accept: reset at once, before any TLS (a served one would wait
                # for our ClientHello until the handshake timeout).
                refused.append(await asyncio.wait_for(loop.sock_recv(sock, 1), 5))
            except ConnectionResetError as exc:
                refused.append(repr(exc))
            finally:
                sock.close()

    assert await _during(bed, flood()) == []
    assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert len(refused) == 5, refused   # no TLS handshake, no new budget to spend
    assert all("reset" in str(answer).lower() for answer in refused), refused
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="ping_flood") == 1
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="abuser_penalty") == 5, refused


async def test_continuation_flood_is_cut_at_the_header_block_cap(bed, ca):
    raw = await RawH2.open(bed, ca)
    block = bytes(16 * 1024)
    sent = 0

    async def flood():
        nonlocal sent
        reading = asyncio.ensure_future(raw.read_until_closed())
        await raw.write(hyperframe.frame.HeadersFrame(1, data=block).serialize())
        for _ in range(4000):  # 64 MiB offered; h2 alone buffered 64 frames of 1 MiB per connection
            # Once the proxy cut us, the reader closed our end: later writes would vanish
            # there (no error), not reach the proxy, and must not count as sent.
            if reading.done() or not await raw.write(hyperframe.frame.ContinuationFrame(1, data=block).serialize()):
                break
            sent += len(block)
        await reading

    assert await _during(bed, flood()) == []
    assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="header_block_too_large") == 1
    assert sent < 8 * 1024 * 1024  # cut early: what was offered later never reached the proxy's memory


async def test_non_utf8_header_bytes_get_400_on_that_stream_and_are_counted(bed, ca):
    raw = await RawH2.open(bed, ca)
    raw.conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.250.0.2:80\xff\xfe")])
    raw.conn.send_headers(3, [(b":method", b"CONNECT"), (b":authority", f"{SERVER_IP}:{APP_PORT}".encode()),
                              (b"forwarded", b"for=\xc3\x28")])
    raw.conn.send_headers(5, [(b":method", b"CONNECT"), (b":authority", f"{SERVER_IP}:{APP_PORT}".encode())])
    raw.flush()
    statuses: dict[int, int] = {}
    while len(statuses) < 3:
        data = await asyncio.wait_for(raw.reader.read(65536), 5)
        assert data, "the connection must survive bad header bytes"
        for event in raw.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                statuses[event.stream_id] = int(dict(event.headers)[b":status"])
        raw.flush()
    raw.writer.close()
    assert statuses == {1: 400, 3: 400, 5: 200}
    assert metric(bed.app, "shoal_proxy_rejected_total", listener="hbone", reason="bad_request") == 2


# -- TLS handshake floods on 15008 -----------------------------------------------------------

async def _open_idle(h: Harness, count: int) -> list:
    """``count`` TCP connections to the server pod's 15008 from the 'other' pod that never
    start TLS (a handshake flood); the sockets (one the proxy reset as it connected
    included: refused at accept can be that fast)."""
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(count):
        sock = h.raw_socket("other")
        with contextlib.suppress(ConnectionResetError):
            await loop.sock_connect(sock, (SERVER_IP, 15008))
        socks.append(sock)
    return socks


async def _ended_within(socks: list, seconds: float) -> int:
    """How many of ``socks`` the proxy ended (EOF or RST) within ``seconds``."""
    loop = asyncio.get_running_loop()

    async def ended(sock) -> bool:
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 1), seconds) == b""
        except asyncio.TimeoutError:   # (an OSError too: first)
            return False
        except OSError:   # reset, or reset while connecting
            return True
    return sum(await asyncio.gather(*(ended(s) for s in socks)))


async def test_a_handshake_flood_from_one_pod_is_capped_and_others_keep_being_served(pod_netns, state, ca,
                                                                                       tmp_path):
    # A setup cap small enough for CI (8,192 by default) and a handshake timeout longer than
    # the other client's patience: before the per-source cap, 200 idle connections held
    # every setup slot of 15008 and the other client's HBONE dials waited in the kernel.
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, max_connections_in_setup=64,
                             handshake_limits=HandshakeLimits(per_source=20, total=1024, timeout=30.0)) as (h, _):
        flood = await _open_idle(h, 200)
        try:
            # Every flood connection accepted and judged (the proxy takes them from its accept
            # queue as its loop gets to them): 20 in the gate, the rest refused.
            await until(lambda: metric(h.app, "shoal_proxy_rejected_total", reason="handshake_source_cap") >= 180,
                        "the flood accepted and judged")
            assert await _roundtrips(h, 20, timeout=10) == []
            assert len(h.app.ctx.gatekeeper.gate) == 20
            assert metric(h.app, "shoal_proxy_rejected_total", reason="handshake_source_cap") == 180
            assert await _ended_within(flood[20:], 2.0) == 180   # reset at accept, before any TLS
        finally:
            for sock in flood:
                sock.close()


async def test_a_pod_failing_handshakes_is_boxed_and_its_handshakes_in_progress_are_cut(bed, ca, caplog):
    keeper = bed.app.ctx.gatekeeper
    keeper.box = PenaltyBox(first=60.0)   # the default 2 s could pass on a loaded machine
    keeper.gate = HandshakeGate(failures=30)
    # The bed's 2 s handshake timeout would end the idle handshakes too if the 30 failures
    # below took longer (a loaded machine): then they were not cut by the box, and
    # handshake_failures fell short of 5. Only the box can end them within this timeout.
    keeper.timeout = 60.0
    idle = await _open_idle(bed, 5)
    await until(lambda: len(keeper.gate) == 5, "the idle handshakes accepted")
    loop = asyncio.get_running_loop()
    for n in range(30):   # garbage ClientHellos, and certificates the mesh CA never issued
        if n % 2:
            with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.TimeoutError):
                _, writer = await asyncio.wait_for(_tls_15008(bed, _client_context(DevCA("evil"), ATTACKER)), 5)
                writer.close()
            continue
        sock = bed.raw_socket("other")
        await loop.sock_connect(sock, (SERVER_IP, 15008))
        await loop.sock_sendall(sock, b"\x16\x03\x01\x02\x00" + bytes(512))
        await _ended_within([sock], 5)
        sock.close()
    # Boxed: its idle handshakes are cut at once, not at the handshake timeout, and it is
    # refused at accept; another pod's requests are served.
    assert await _ended_within(idle, 1.5) == 5
    later = await _open_idle(bed, 3)
    assert await _ended_within(later, 1.5) == 3
    assert await _roundtrips(bed, 5) == []
    for sock in idle + later:
        sock.close()
    failed = sum(metric(bed.app, "shoal_proxy_rejected_total", reason=r)
                 for r in ("tls_handshake", "untrusted_certificate"))
    assert failed == 30
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="untrusted_certificate") >= 1
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="handshake_failures") == 5
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="abuser_penalty") == 3
    # 38 refusals, a warning a second per reason at most (each used to be one).
    lines = [r for r in caplog.records if r.getMessage().startswith("hbone: refused")]
    assert 1 <= len(lines) <= 12, [r.getMessage() for r in lines]


async def test_past_the_workers_handshake_total_the_largest_holder_makes_room(pod_netns, state, ca, tmp_path):
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, max_connections_in_setup=40,
                             handshake_limits=HandshakeLimits(per_source=30, total=30, timeout=30.0)) as (h, _):
        flood = await _open_idle(h, 30)   # every handshake slot of the worker
        try:
            gate = h.app.ctx.gatekeeper.gate
            await until(lambda: len(gate) == 30, "the flood accepted")
            assert await _roundtrips(h, 5, timeout=10) == []   # the client pod's dial took a slot
            cut = metric(h.app, "shoal_proxy_rejected_total", reason="handshake_capacity")
            assert cut >= 1 and await _ended_within(flood, 1.0) == cut
        finally:
            for sock in flood:
                sock.close()


async def test_the_perf_handshake_flood_scaled_down_costs_another_pod_nothing(bed, tmp_path):
    """perf's h2flood ``handshake`` attacker (never-finished ClientHellos, garbage, an
    untrusted certificate, all at once) from one pod, scaled down: the other pod's requests
    all succeed, the attacker is capped and boxed, and its summary is what perf reads."""
    from shoal.perf.connscripts import HANDSHAKE_FLOOD_CLIENT
    from shoal.perf.scenarios.h2flood import attacker_note, untrusted_credentials

    # Its garbage and untrusted handshakes compete with the idle holders for the source's 50
    # slots, which free only as holders time out (2 s here): with 2 of each against 200
    # holders, a 4 s flood failed none in some runs (two CI runs red), so 16 of each, and one
    # failure boxes the source. Even so, a holder cut at the timeout used to reconnect at
    # once and win its slot back every time (session 11's CI: 317 capped, none failed), so the
    # flood's loops now all pause between attempts and each freed slot is a fair race.
    # Boxing for the loop at the cap (cap_refusals) is out of the way here: this test is
    # about the failures; test_gatekeeper covers the loop.
    bed.app.ctx.gatekeeper.gate = HandshakeGate(per_source=50, failures=1, cap_refusals=1_000_000)
    attacker = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", bed.netns["other"], sys.executable, "-c", HANDSHAKE_FLOOD_CLIENT, SERVER_IP,
        "15008", "4", "200", "16", *untrusted_credentials(), stdout=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(1.0)
        assert await _during(bed, asyncio.sleep(0)) == []
        out, _ = await asyncio.wait_for(attacker.communicate(), 60)
    finally:
        if attacker.returncode is None:
            attacker.kill()
            await attacker.wait()
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["idle_opened"] >= 200 and summary["garbage"] >= 1 and summary["untrusted_accepted"] == 0
    assert "never-finished handshakes" in attacker_note(summary)
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="handshake_source_cap") >= 150
    assert metric(bed.app, "shoal_proxy_rejected_total", reason="handshake_failures") >= 1   # boxed

"""Hostile and broken clients get 400 / 408 / 431 and never disturb anyone else."""
import asyncio
import time

import aiohttp
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from shoal.waypoint.http import Limits

pytestmark = pytest.mark.timeout(60)

TIGHT = Limits(max_header_bytes=4096, max_headers=20, header_timeout=0.3, body_idle_timeout=0.3, keepalive_timeout=2)


async def raw(bed, payload: bytes, wait: float = 3.0, close_write: bool = False) -> bytes:
    """Send ``payload``; everything the waypoint answers until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.port)
    writer.write(payload)
    await writer.drain()
    if close_write:
        writer.write_eof()
    answer = b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), wait)
            if not data:
                return answer
            answer += data
    except (TimeoutError, ConnectionError):
        return answer
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def healthy_client_works(bed) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{bed.port}/ok", headers={"host": "web"}) as resp:
            assert resp.status == 200


@pytest.fixture
async def tight(bed):
    await bed.backend("web")
    await bed.start(limits=TIGHT)
    return bed


@pytest.mark.parametrize("payload", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: web\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
])
async def test_malformed_requests_get_400(tight, payload):
    answer = await raw(tight, payload)
    assert status_of(answer) in (400, 505), answer
    await healthy_client_works(tight)
    assert tight.metric("shoal_waypoint_rejected_requests_total") >= 1


@pytest.mark.parametrize("payload", [
    # Request smuggling: framing a proxy and a server could read differently.
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web\r\nX-Folded: a\r\n b\r\n\r\n",                          # obs-fold
    b"GET / HTTP/1.1\r\nHost: web\r\nX-Folded: a\r\n\tb\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: +5\r\n\r\nhello",
])
async def test_request_smuggling_attempts_get_400(tight, payload):
    answer = await raw(tight, payload)
    assert status_of(answer) == 400, answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer          # nothing smuggled behind it
    await healthy_client_works(tight)
    assert tight.metric("shoal_waypoint_rejected_requests_total", status="400") >= 1


async def test_oversized_and_too_many_headers_get_431(tight):
    big = b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    assert status_of(await raw(tight, big)) == 431
    many = b"GET / HTTP/1.1\r\nHost: web\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(30)) + b"\r\n"
    assert status_of(await raw(tight, many)) == 431
    assert tight.metric("shoal_waypoint_rejected_requests_total", status="431") == 2
    await healthy_client_works(tight)


async def test_slowloris_gets_408_while_others_are_served(tight):
    reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
    start = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n")
    await healthy_client_works(tight)  # served while the slow client dribbles
    answer = b""
    for _ in range(20):
        writer.write(b"X-Slow: 1\r\n")  # one header line every 100 ms, never the end of the head
        try:
            answer = await asyncio.wait_for(reader.read(65536), 0.1)
            break
        except TimeoutError:
            continue
    writer.close()
    assert status_of(answer) == 408 and time.monotonic() - start < 1.5


async def test_body_shorter_than_content_length_gets_408(tight):
    answer = await raw(tight, b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\nonly-ten!!")
    assert status_of(answer) == 408
    assert tight.metric("shoal_waypoint_rejected_requests_total", reason="bad_body", status="408") == 1


async def test_body_cut_short_by_close_is_rejected(tight):
    answer = await raw(tight, b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\nshort", close_write=True)
    assert status_of(answer) == 400
    await healthy_client_works(tight)


async def test_body_longer_than_content_length_is_a_bad_next_request(tight):
    answer = await raw(tight, b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\nokEXTRA-GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in answer


async def test_idle_keepalive_connection_is_closed_quietly(bed):
    await bed.backend("web")
    await bed.start(limits=Limits(keepalive_timeout=0.2))
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.port)
    assert await asyncio.wait_for(reader.read(100), 2) == b""
    writer.close()


async def response_statuses(reader, writer, conn, count: int) -> dict[int, str]:
    """Sends what ``conn`` has queued, then reads until ``count`` streams have a response
    head; returns their :status by stream id, and closes the connection."""
    writer.write(conn.data_to_send())
    statuses: dict[int, str] = {}
    while len(statuses) < count:
        data = await asyncio.wait_for(reader.read(65536), 3)
        assert data
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                statuses[ev.stream_id] = dict(ev.headers)[":status"]
        writer.write(conn.data_to_send())
    writer.close()
    return statuses


async def test_http2_protocol_error_gets_goaway_and_others_live_on(tight):
    reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
    # The preface, then a DATA frame on stream 0: a connection error (PROTOCOL_ERROR).
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                 + b"\x00\x00\x04\x00\x01\x00\x00\x00\x00" + b"abcd")
    got = b""
    while True:
        data = await asyncio.wait_for(reader.read(65536), 3)
        if not data:
            break
        got += data
    writer.close()
    # Frame type 0x7 = GOAWAY, with error code PROTOCOL_ERROR (1)
    assert b"\x07\x00\x00\x00\x00\x00" in got
    assert tight.metric("shoal_waypoint_rejected_requests_total", reason="h2_protocol_error") == 1
    await healthy_client_works(tight)


def goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY frame in ``data`` (a server's frames)."""
    at = 0
    while at + 9 <= len(data):
        length, kind = int.from_bytes(data[at:at + 3], "big"), data[at + 3]
        if kind == 0x7:
            return int.from_bytes(data[at + 9 + 4:at + 9 + 8], "big")
        at += 9 + length
    return None


async def read_all(reader, wait: float = 3.0) -> bytes:
    got = b""
    try:
        while data := await asyncio.wait_for(reader.read(65536), wait):
            got += data
    except (TimeoutError, ConnectionError):
        pass
    return got


def rapid_resets(count: int) -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for i in range(count):
        client.send_headers(1 + 2 * i, [(":method", "GET"), (":path", "/ok"), (":scheme", "http"),
                                        (":authority", "web")], end_stream=True)
        client.reset_stream(1 + 2 * i)
    return client.data_to_send()


def continuation_flood(frames: int) -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    head = client.data_to_send()
    # HEADERS without END_HEADERS on stream 1, then CONTINUATION frames that never end it.
    payload = b"\x40\x01x\x01y" * 3000                   # literal "x: y" fields, over and over
    frames_out = [len(payload).to_bytes(3, "big") + b"\x01\x00\x00\x00\x00\x01" + payload]
    frames_out += [len(payload).to_bytes(3, "big") + b"\x09\x00\x00\x00\x00\x01" + payload] * frames
    return head + b"".join(frames_out)


def ping_flood(count: int) -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for i in range(count):
        client.ping(i.to_bytes(8, "big"))
    return client.data_to_send()


@pytest.mark.parametrize("attack,reason", [(rapid_resets(400), "h2_premature_reset_flood"),
                                           (continuation_flood(200), "h2_header_block_too_large"),
                                           (ping_flood(400), "h2_ping_flood")])
async def test_http2_floods_get_goaway_enhance_your_calm_and_others_live_on(tight, attack, reason):
    reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
    writer.write(attack)
    try:
        await writer.drain()
    except ConnectionError:
        pass   # the waypoint may close before it read everything
    got = await read_all(reader)
    writer.close()
    assert goaway_code(got) == 0xB, got[:200]      # ENHANCE_YOUR_CALM
    assert tight.metric("shoal_waypoint_rejected_requests_total", reason=reason) == 1
    assert tight.metric("shoal_waypoint_rejected_requests_total") == 1
    await healthy_client_works(tight)


# -- Rapid Reset judged as the HBONE side judges it (in memory: no socket) -------------------

class MemoryTunnel:
    """A downstream connection as bytes in and bytes out, for ``serve_connection``."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent = bytearray()
        self.wrote = asyncio.Event()

    async def read(self, n: int) -> bytes:
        return await self.incoming.get()

    def write(self, data: bytes) -> None:
        self.sent += data
        self.wrote.set()

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.incoming.put_nowait(b"")


class H2Client:
    """A raw h2 client on a ``MemoryTunnel`` served by the waypoint's HTTP/2 server, whose
    handler answers at once and then streams until cancelled (a watch, a download)."""

    def __init__(self) -> None:
        from shoal.waypoint.downstream import serve_connection
        from shoal.waypoint.http import PeerInfo

        self.tunnel = MemoryTunnel()
        self.rejected: list[tuple[str, int]] = []
        self.handled = 0
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.events: list = []
        self.server = asyncio.ensure_future(serve_connection(
            self.tunnel, PeerInfo("10.244.1.7", 40000), self.answer_then_stream, Limits(),
            lambda reason, status: self.rejected.append((reason, status))))
        self.push()

    async def answer_then_stream(self, request, body, sink) -> None:
        self.handled += 1
        await sink.start(200, [("content-type", "text/plain")], None)
        await asyncio.sleep(3600)

    def push(self) -> None:
        self.tunnel.incoming.put_nowait(self.conn.data_to_send())

    async def receive(self) -> None:
        await asyncio.wait_for(self.tunnel.wrote.wait(), 5)
        self.tunnel.wrote.clear()
        data, self.tunnel.sent = bytes(self.tunnel.sent), bytearray()
        self.events += self.conn.receive_data(data)

    def request(self) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "GET"), (":path", "/watch"), (":scheme", "http"),
                                           (":authority", "web")], end_stream=True)
        return stream_id

    def answered(self, stream_id: int) -> bool:
        return any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id for e in self.events)

    def goaway(self) -> int | None:
        return next((int(e.error_code) for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    async def close(self) -> None:
        self.tunnel.close()
        await asyncio.wait_for(self.server, 5)


async def test_a_client_cancelling_answered_streams_is_never_cut_but_a_rapid_reset_is():
    """Both proxies judge resets by ``PrematureResets`` (Envoy's ratio): a client that
    cancels every stream after its answer (300 here; counting every RST_STREAM cut it at
    201) keeps its connection, while HEADERS + RST_STREAM pairs are cut after 50, before
    the 200 that counting allowed, with GOAWAY ENHANCE_YOUR_CALM."""
    patient = H2Client()
    for _ in range(300):
        stream_id = patient.request()
        patient.push()
        while not patient.answered(stream_id):
            await patient.receive()
        patient.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        patient.push()
    stream_id = patient.request()   # and it is served as before
    patient.push()
    while not patient.answered(stream_id):
        await patient.receive()
    assert patient.goaway() is None and patient.rejected == [] and patient.handled == 301
    await patient.close()

    attacker = H2Client()
    for _ in range(60):
        stream_id = attacker.request()
        attacker.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    attacker.push()
    while attacker.goaway() is None:
        await attacker.receive()
    assert attacker.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert attacker.rejected == [("h2_premature_reset_flood", 400)]
    assert attacker.handled == 0   # reset in the same read: no handler ran
    await asyncio.wait_for(attacker.server, 5)   # the server ended the connection itself


async def test_http2_oversized_headers_get_431_on_that_stream(tight):
    reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    base = [(":method", "GET"), (":scheme", "http"), (":authority", "web.demo")]
    conn.send_headers(1, base + [(":path", "/big"), ("x-big", "a" * 5000)], end_stream=True)
    conn.send_headers(3, base + [(":path", "/fine")], end_stream=True)
    statuses = await response_statuses(reader, writer, conn, 2)
    assert statuses == {1: "431", 3: "200"}


async def test_http2_stalled_body_resets_only_that_stream(tight):
    reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    base = [(":scheme", "http"), (":authority", "web.demo")]
    conn.send_headers(1, base + [(":method", "POST"), (":path", "/stall"), ("content-length", "100")])
    conn.send_data(1, b"x" * 10)
    conn.send_headers(3, base + [(":method", "GET"), (":path", "/fine")], end_stream=True)
    statuses = await response_statuses(reader, writer, conn, 2)
    assert statuses == {1: "408", 3: "200"}


@pytest.mark.parametrize("rest, outcome", [(b"lo", [b"hel", b"lo"]), (b"", "BodyError")])
async def test_a_request_body_yields_nothing_more_after_its_end_or_an_error(rest, outcome):
    """The pipeline's request body ends as an async generator would: once it has ended, or
    raised for a body cut short, iterating it again yields nothing (it is a class: mypyc
    compiles no async generator)."""
    from shoal.waypoint.downstream import serve_connection
    from shoal.waypoint.http import BodyError, PeerInfo

    seen = []

    async def handler(request, body, sink, handoff=None):
        try:
            seen.append([chunk async for chunk in body])
        except BodyError as err:
            seen.append(type(err).__name__)
            seen.append([chunk async for chunk in body])
            raise
        seen.append([chunk async for chunk in body])
        await sink.start(200, [("content-length", "0")], 0)
        await sink.end()

    tunnel = MemoryTunnel()
    for data in (b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhel", rest, b""):
        tunnel.incoming.put_nowait(data)
    await asyncio.wait_for(serve_connection(tunnel, PeerInfo("10.0.0.1", 1234), handler, Limits(),
                                            lambda reason, status: None), 10)
    assert seen == [outcome, []]
    assert bytes(tunnel.sent).startswith(b"HTTP/1.1 200 " if rest else b"HTTP/1.1 400 ")

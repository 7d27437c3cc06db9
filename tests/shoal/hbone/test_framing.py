"""The pure HBONE layer: two HboneConnections wired back to back, no sockets."""
from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import pytest

from shoal.h2guard import CLOSED_STREAMS_PER_OPEN, PrematureResets
from shoal.hbone import framing as hbone
from shoal.hbone.framing import (
    ConnectionEnded,
    HboneConnection,
    PeerGoingAway,
    RequestRejected,
    TunnelData,
    TunnelEnded,
    TunnelRequested,
    TunnelReset,
    TunnelResponse,
    WindowOpened,
    parse_authority,
)


def pump(src: HboneConnection, dst: HboneConnection) -> list:
    return dst.receive(src.data_to_send())


@pytest.fixture
def pair():
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)
    client.initiate(), server.initiate()
    pump(client, server), pump(server, client), pump(client, server)
    return client, server


def test_connect_accept_and_carry_bytes_both_ways(pair):
    client, server = pair
    sid = client.connect("10.244.2.5", 8080, forwarded_for="10.244.1.7", traceparent=hbone.new_traceparent())
    (req,) = pump(client, server)
    assert isinstance(req, TunnelRequested)
    assert (req.host, req.port, req.forwarded_for) == ("10.244.2.5", 8080, "10.244.1.7")
    assert req.traceparent.startswith("00-")
    server.respond(sid, 200)
    assert pump(server, client) == [TunnelResponse(sid, 200)]
    assert client.send(sid, memoryview(b"ping")) == 4
    client.end(sid)
    events = pump(client, server)
    assert events[0] == TunnelData(sid, b"ping", 4) and events[1] == TunnelEnded(sid)
    server.consumed(sid, 4)
    server.send(sid, memoryview(b"pong"))
    server.end(sid)
    events = pump(server, client)
    assert [type(e) for e in events][-2:] == [TunnelData, TunnelEnded]


def test_large_windows_and_frames(pair):
    client, server = pair
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    pump(client, server)
    server.respond(sid, 200)
    pump(server, client)
    payload = memoryview(bytes(8 * 1024 * 1024))
    sent = client.send(sid, payload)
    assert sent == hbone.STREAM_WINDOW  # 4 MiB in flight before any credit
    data = [e for e in pump(client, server) if isinstance(e, TunnelData)]
    assert len(data) == 4  # 1 MiB frames: Python work per frame, not per byte
    assert client.send(sid, payload[sent:]) == 0  # window exhausted: backpressure
    server.consumed(sid, sum(e.flow_controlled_length for e in data))
    assert any(isinstance(e, WindowOpened) for e in pump(server, client))
    assert client.send(sid, payload[sent:]) == 4 * 1024 * 1024


@pytest.mark.parametrize("headers,reason", [
    ([(":method", "CONNECT"), (":authority", "web.demo:80")], "not"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.1:99999")], "range"),
    ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.1:80")], "not CONNECT"),
])
def test_malformed_connect_gets_400(headers, reason):
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server = HboneConnection(client_side=False)
    server.initiate()
    server.receive(raw.data_to_send())
    raw.send_headers(1, headers)
    (event,) = server.receive(raw.data_to_send())
    assert isinstance(event, RequestRejected) and event.status == 400 and reason in event.reason
    answer = raw.receive_data(server.data_to_send())
    assert any(getattr(e, "headers", None) and dict(e.headers)[b":status"] == b"400" for e in answer)


def test_connect_without_authority_is_rejected():
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    raw.initiate_connection()
    server = HboneConnection(client_side=False)
    server.initiate()
    server.receive(raw.data_to_send())
    raw.send_headers(1, [(":method", "CONNECT")])
    events = server.receive(raw.data_to_send())
    assert len(events) == 1 and isinstance(events[0], (RequestRejected, ConnectionEnded))


def test_garbage_is_a_protocol_violation_with_goaway():
    server = HboneConnection(client_side=False)
    server.initiate()
    server.data_to_send()
    (event,) = server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(event, ConnectionEnded) and event.error
    assert server.closed and server.data_to_send()  # GOAWAY queued


@pytest.mark.parametrize("text,expected", [("10.0.0.1:80", ("10.0.0.1", 80)), ("[fd00::1]:8080", ("fd00::1", 8080))])
def test_parse_authority(text, expected):
    assert parse_authority(text) == expected


@pytest.mark.parametrize("header,expected", [
    ('for="10.0.0.7:40123"', ("10.0.0.7", 40123)), ("for=10.0.0.7", ("10.0.0.7", 0)),
    ('for="[fd00::7]:443";proto=https', ("fd00::7", 443)), ('by=x; For="fd00::7"', ("fd00::7", 0)),
    ("for=unknown", (None, 0)), ("for=_hidden", (None, 0)), (None, (None, 0)),
])
def test_forwarded_for_parsing(header, expected):
    assert hbone._forwarded_for(header) == expected


def test_forwarded_carries_client_ip_and_port(pair):
    client, server = pair
    client.connect("10.0.0.1", 80, "10.244.1.7", hbone.new_traceparent(), forwarded_port=40123)
    (req,) = pump(client, server)
    assert (req.forwarded_for, req.forwarded_port) == ("10.244.1.7", 40123)


def test_stream_limit_is_the_peers_capped_at_100_and_release_frees_refused_streams(pair):
    client, server = pair
    assert client.stream_limit == hbone.MAX_STREAMS  # O(1): settings, not h2's stream table
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    pump(client, server)
    server.respond(sid, hbone.STATUS_UNAUTHORIZED)  # refused: END_STREAM from the server only
    pump(server, client)
    assert client._h2.open_outbound_streams == 1   # half-closed: h2 would count it forever
    assert client.release(sid)                     # closed now...
    assert client._h2.open_outbound_streams == 0
    assert [type(e) for e in pump(client, server)] == [TunnelEnded]  # ...with END_STREAM, not a reset
    assert server._h2.open_inbound_streams == 0
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    client.end(sid)                                # our side done, the peer's not yet:
    assert not client.release(sid)                 # it closes with the peer's END_STREAM
    pump(client, server)
    server.respond(sid, 200)
    server.end(sid)
    pump(server, client)
    assert client._h2.open_outbound_streams == 0


# -- abuse and bad input (issue 18) -----------------------------------------------------------

def _attacker(server: HboneConnection) -> h2.connection.H2Connection:
    """A raw h2 client that has done the handshake with ``server``."""
    attacker = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    attacker.initiate_connection()
    server.receive(attacker.data_to_send())
    attacker.receive_data(server.data_to_send())
    server.receive(attacker.data_to_send())
    server.data_to_send()
    return attacker


def _goaway_code(data: bytes) -> int | None:
    attacker = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    attacker.initiate_connection()
    for event in attacker.receive_data(data):
        if isinstance(event, h2.events.ConnectionTerminated):
            return int(event.error_code)
    return None


@pytest.fixture
def server():
    server = HboneConnection(client_side=False)
    server.initiate()
    return server


def test_header_block_is_capped_across_continuation_frames(server):
    _attacker(server)
    block = bytes(16 * 1024)
    headers = hyperframe.frame.HeadersFrame(1, data=block)  # no END_HEADERS: CONTINUATION follows
    fed, events = 0, []
    frames = [headers] + [hyperframe.frame.ContinuationFrame(1, data=block) for _ in range(200)]
    for frame in frames:  # 3.2 MiB offered; h2 alone would buffer 64 frames of up to 1 MiB
        events = server.receive(frame.serialize())
        fed += len(frame.data)
        if events:
            break
    assert [e.reason for e in events] == ["header_block_too_large"]
    assert fed <= hbone.MAX_HEADER_BLOCK + len(block)
    assert server.closed
    assert _goaway_code(server.data_to_send()) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("kind, frame", [
    ("ping", lambda i: hyperframe.frame.PingFrame(0, opaque_data=i.to_bytes(8, "big"))),
    ("settings", lambda i: hyperframe.frame.SettingsFrame(0, settings={4: 65535 + i})),
    ("priority", lambda i: hyperframe.frame.PriorityFrame(2 * i + 1, depends_on=0, stream_weight=16)),
])
def test_control_frame_floods_end_with_enhance_your_calm(server, kind, frame):
    _attacker(server)
    flood = b"".join(frame(i).serialize() for i in range(5000))
    events = server.receive(flood)
    assert [e.reason for e in events if isinstance(e, ConnectionEnded)] == [f"{kind}_flood"]
    out = server.data_to_send()
    assert _goaway_code(out) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    # Answers stop at the budget: not 5,000 PING/SETTINGS ACKs queued (17 / 9 bytes each).
    assert len(out) < 200 * 17
    assert server.receive(flood) == []  # after GOAWAY nothing more is acted on


def test_budget_refills_so_a_steady_polite_peer_is_never_cut():
    now = [0.0]
    server = HboneConnection(client_side=False, clock=lambda: now[0])
    server.initiate()
    attacker = _attacker(server)
    for second in range(60):  # 5 PINGs a second for a minute: under the 10/s refill
        now[0] = float(second)
        for _ in range(5):
            attacker.ping(bytes(8))
        assert not any(isinstance(e, ConnectionEnded) for e in server.receive(attacker.data_to_send()))
    assert not server.closed


@pytest.mark.parametrize("same_read", [True, False])
def test_rapid_reset_ends_the_connection_once_half_its_streams_were_reset_unanswered(same_read):
    server = HboneConnection(client_side=False, clock=lambda: 0.0)
    server.initiate()
    attacker = _attacker(server)
    ended, requested, resets, pairs, stream_id = [], 0, 0, 0, 1
    while not ended and stream_id < 20000:
        attacker.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        events = [] if same_read else server.receive(attacker.data_to_send())
        attacker.reset_stream(stream_id)
        events += server.receive(attacker.data_to_send())
        requested += sum(isinstance(e, TunnelRequested) for e in events)
        resets += sum(isinstance(e, TunnelReset) for e in events)
        ended = [e for e in events if isinstance(e, ConnectionEnded)]
        stream_id += 2
        pairs += 1
    assert ended and ended[0].reason == "premature_reset_flood"
    assert pairs == PrematureResets().min_streams // 2   # counted either way; 201 before the ratio
    if same_read:   # opened and reset in the same read: the driver never hears of it, nothing is dialled
        assert requested == resets == 0
    else:           # each one could have cost a dial: the driver hears of the reset
        assert requested == pairs and resets == pairs - 1
    assert _goaway_code(server.data_to_send()) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_a_slow_trickle_of_rapid_resets_is_cut_too():
    """Two resets a second never emptied the old budget (200, then 20 a second); half of
    the streams is half of them, at any pace."""
    now = [0.0]
    server = HboneConnection(client_side=False, clock=lambda: now[0])
    server.initiate()
    attacker = _attacker(server)
    ended = []
    for n in range(200):
        now[0] = n * 0.5
        sid = 1 + 2 * n
        attacker.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        attacker.reset_stream(sid)
        ended = [e for e in server.receive(attacker.data_to_send()) if isinstance(e, ConnectionEnded)]
        if ended:
            break
    assert ended and ended[0].reason == "premature_reset_flood" and n + 1 == 50


def test_answered_streams_reset_by_the_client_are_not_premature(pair):
    client, server = pair
    for _ in range(1000):
        sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
        pump(client, server)
        server.respond(sid, 200)
        pump(server, client)
        client.reset(sid)
        assert not any(isinstance(e, ConnectionEnded) for e in pump(client, server))


def test_streams_the_client_gave_up_on_after_a_long_wait_are_not_premature():
    """A slow answer (a dial waiting its turn) that the client stops waiting for is our
    slowness, not an attack: the node proxy's own answer deadline is seconds."""
    now = [0.0]
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False, clock=lambda: now[0])
    client.initiate(), server.initiate()
    pump(client, server), pump(server, client), pump(client, server)
    for _ in range(300):
        sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
        pump(client, server)
        now[0] += 5.0
        client.reset(sid)
        assert not any(isinstance(e, ConnectionEnded) for e in pump(client, server))


@pytest.mark.parametrize("name, value", [(b":authority", b"10.0.0.1:8\xff"), (b"forwarded", b"for=\xc3\x28"),
                                         (b"traceparent", b"\x80\x81")])
def test_non_ascii_header_bytes_are_a_400_for_that_stream_only(server, name, value):
    attacker = _attacker(server)
    headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"forwarded", b"for=10.0.0.2")]
    headers = [(n, value if n == name else v) for n, v in headers] + ([(name, value)] if name == b"traceparent" else [])
    attacker.send_headers(1, headers)
    (event,) = server.receive(attacker.data_to_send())
    assert isinstance(event, RequestRejected) and event.status == 400 and "non-ASCII" in event.reason
    attacker.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    (event,) = server.receive(attacker.data_to_send())
    assert isinstance(event, TunnelRequested) and not server.closed  # the connection lives on


# -- the per-read budget: one peer's read is parsed a slice per loop turn ----------------------

PING_SIZE = 9 + 8
H2_FRAMES_PER_CALL = hbone.READ_BUDGET // hbone.H2_FRAME_COST


def _pings(count: int) -> memoryview:
    return memoryview(b"".join(hyperframe.frame.PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize()
                               for i in range(count)))


def _acks(data: bytes) -> int:
    attacker = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    attacker.initiate_connection()
    return sum(isinstance(e, h2.events.PingAckReceived) for e in attacker.receive_data(data))


def test_a_read_is_parsed_a_budget_at_a_time_and_the_rest_on_later_calls(server):
    _attacker(server)
    data = _pings(90)   # under the PING burst: a polite peer, only many frames in one read
    events, used = server.receive_buffer(data)
    assert server.budget_spent and used == H2_FRAMES_PER_CALL * PING_SIZE   # stopped at a frame boundary
    assert _acks(server.data_to_send()) == H2_FRAMES_PER_CALL               # the rest not even split yet
    calls, answered = 1, H2_FRAMES_PER_CALL
    while server.budget_spent:
        events, step = server.receive_buffer(data[used:])
        used += step
        calls += 1
        answered += _acks(server.data_to_send())
    assert used == len(data) and answered == 90 and not server.closed
    assert calls == -(-90 // H2_FRAMES_PER_CALL)


def test_a_partial_frame_left_at_the_end_is_not_a_spent_budget(server):
    _attacker(server)
    data = _pings(3)[:-5]
    events, used = server.receive_buffer(data)
    assert used == 2 * PING_SIZE and not server.budget_spent   # the driver reads more, not parses again


def test_a_flood_in_one_read_is_cut_after_a_few_budgets_not_parsed_whole(server):
    _attacker(server)
    data = _pings(20000)   # 340 KB of PINGs in one read: h2 alone answers every one
    used, calls, ended = 0, 0, []
    while not ended:
        events, step = server.receive_buffer(data[used:])
        used += step
        calls += 1
        ended = [e for e in events if isinstance(e, ConnectionEnded)]
    assert ended[0].reason == "ping_flood" and ended[0].refused_peer
    assert calls == -(-(hbone.LIMITS["ping"].burst + 1) // H2_FRAMES_PER_CALL)
    assert used == len(data) and not server.budget_spent   # all of it dropped, never parsed
    assert server.receive_buffer(data) == ([], len(data))   # what comes after: read into the void


def test_data_frames_cost_a_fraction_of_what_h2_frames_cost(pair):
    client, server = pair
    sid = _open(client, server)
    for _ in range(hbone.READ_BUDGET + 10):
        assert client.send(sid, memoryview(b"0123456789")) == 10   # one small DATA frame each
    data = memoryview(client.data_to_send())
    events, used = server.receive_buffer(data)
    assert server.budget_spent and len(events) == hbone.READ_BUDGET
    events, rest = server.receive_buffer(data[used:])
    assert len(events) == 10 and used + rest == len(data) and not server.budget_spent
    assert all(isinstance(e, TunnelData) for e in events)


def test_a_budget_is_refused_where_the_unused_bytes_would_be_lost(server):
    with pytest.raises(ValueError):
        server.receive(bytes(_pings(1)), budget=8)


def test_commands_after_the_peer_goaway_raise_nothing(pair):
    # Streams still held by the driver are released, ended and credited while the
    # connection is already closed: none of that may raise into the data path.
    client, server = pair
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    pump(client, server)
    server.respond(sid, 200)
    server.send(sid, memoryview(b"data"))
    server.end(sid)
    server.close(h2.errors.ErrorCodes.INTERNAL_ERROR)   # an error GOAWAY ends the connection at once
    events = pump(server, client)
    assert isinstance(events[-1], ConnectionEnded) and client.closed
    assert client.release(sid)
    client.end(sid)
    client.consumed(sid, 4)
    client.reset(sid)
    assert client.send(sid, memoryview(b"more")) == 0


def _open(client: HboneConnection, server: HboneConnection) -> int:
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    pump(client, server)
    server.respond(sid, 200)
    pump(server, client)
    return sid


def test_a_graceful_goaway_lets_the_streams_up_to_its_last_id_finish(pair):
    """RFC 9113 6.8: streams up to the last-stream-id run to their end, both ways; the
    ones above were never processed: refused (retry elsewhere); no new stream here."""
    client, server = pair
    first, second = _open(client, server), _open(client, server)
    server.go_away()                      # last-stream-id: the highest it received (second)
    late = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())  # crosses the GOAWAY
    assert pump(client, server) == []     # opened after the GOAWAY: refused, never a TunnelRequested
    events = pump(server, client)
    assert events[:2] == [PeerGoingAway(second), TunnelReset(late, h2.errors.ErrorCodes.REFUSED_STREAM)]
    assert client.stream_limit == 0 and not client.closed
    # Both live streams carry on, in both directions, to a normal end.
    for sid in (first, second):
        assert client.send(sid, memoryview(b"up")) == 2
        client.end(sid)
    events = pump(client, server)
    assert [e for e in events if isinstance(e, (TunnelData, TunnelEnded))] == [
        TunnelData(first, b"up", 2), TunnelEnded(first), TunnelData(second, b"up", 2), TunnelEnded(second)]
    for sid in (first, second):
        server.consumed(sid, 2)
        assert server.send(sid, memoryview(b"down")) == 4
        server.end(sid)
    events = pump(server, client)
    assert [e for e in events if isinstance(e, (TunnelData, TunnelEnded))] == [
        TunnelData(first, b"down", 4), TunnelEnded(first), TunnelData(second, b"down", 4), TunnelEnded(second)]
    assert not any(isinstance(e, ConnectionEnded) for e in events)


def test_a_later_goaway_never_raises_the_last_stream_id(pair):
    client, server = pair
    first, second = _open(client, server), _open(client, server)
    goaway = hyperframe.frame.GoAwayFrame(0)
    goaway.last_stream_id = first
    events = client.receive(goaway.serialize())
    assert events == [PeerGoingAway(first), TunnelReset(second, h2.errors.ErrorCodes.REFUSED_STREAM)]
    goaway.last_stream_id = second
    assert client.receive(goaway.serialize()) == [PeerGoingAway(first)]


def test_an_error_goaway_still_ends_the_connection(pair):
    client, server = pair
    _open(client, server)
    server.close(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    (event,) = pump(server, client)
    assert isinstance(event, ConnectionEnded) and event.reason == "peer_goaway" and client.closed


def test_every_command_leaves_nothing_behind_in_h2():
    """The fast path's flush does not ask h2 for bytes (a call per flush on the
    request/response path): every command that makes h2 write moves its bytes into the
    one outbound buffer at once. Checked after every command and every receive."""
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)

    def settled(*conns: HboneConnection) -> None:
        for conn in conns:
            assert conn._h2.data_to_send() == b"", "bytes left in h2"

    client.initiate(), server.initiate()
    settled(client, server)
    for _ in range(2):
        pump(client, server), pump(server, client)
        settled(client, server)
    first = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    second = client.connect("10.0.0.1", 81, "10.0.0.2", hbone.new_traceparent())
    settled(client)
    pump(client, server)
    settled(server)
    server.respond(first, 200), server.respond(second, 503)
    settled(server)
    pump(server, client)
    settled(client)
    client.send(first, memoryview(b"x" * 70_000)), client.end(first)
    settled(client)
    pump(client, server)
    server.consumed(first, 70_000), server.send(first, memoryview(b"y")), server.reset(first)
    settled(server)
    pump(server, client)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.ping(b"12345678")
    raw.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    fresh = HboneConnection(client_side=False)
    fresh.initiate()
    fresh.receive(raw.data_to_send())   # SETTINGS, PING: h2 answers with ACKs
    settled(fresh)
    assert fresh.buffers_to_send(), "the ACKs are in the outbound buffer"
    client.drain(), server.go_away(), client.ping(b"12345678")
    settled(client, server)
    pump(client, server), pump(server, client)
    settled(client, server)
    client.close(), fresh.receive(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")   # a DATA frame on stream 0
    settled(client, fresh)


def _exchange(client: HboneConnection, server: HboneConnection) -> int:
    """One complete tunnel: CONNECT, 200, a byte each way, both ends closed and released."""
    sid = _open(client, server)
    client.send(sid, memoryview(b"q")), client.end(sid)
    pump(client, server)
    server.consumed(sid, 1), server.send(sid, memoryview(b"a")), server.end(sid)
    server.release(sid)
    pump(server, client)
    client.consumed(sid, 1)
    client.release(sid)
    pump(client, server), pump(server, client)
    return sid


def test_a_long_lived_connection_remembers_a_bounded_number_of_closed_streams():
    """h2 remembers 65,536 closed streams per connection, ~176 bytes each, for the
    connection's life: a pooled HBONE connection carrying a stream per proxied connection
    grew by 11.5 MB in a soak (issue 18). Both ends now keep CLOSED_STREAMS_PER_OPEN per
    stream they allow open at once; the per-stream tables of the fast path stay empty."""
    client = HboneConnection(client_side=True, max_streams=4)
    server = HboneConnection(client_side=False, max_streams=4)
    client.initiate(), server.initiate()
    pump(client, server), pump(server, client), pump(client, server)
    bound = CLOSED_STREAMS_PER_OPEN * 4
    for _ in range(3 * bound):
        _exchange(client, server)
    for end in (client, server):
        sizes = end.table_sizes()
        assert 0 < sizes["h2_closed_streams"] <= bound, sizes
        assert sizes["flow_streams"] == 0 and sizes["unanswered"] == 0, sizes
        assert not end.closed


def test_late_data_on_a_stream_reset_within_the_remembered_window_is_a_stream_error(pair):
    """What h2's memory is for: DATA the peer sent before our RST_STREAM reached it is
    answered on that stream alone, even after as many other streams came and went as the
    bound allows (a forgotten one would end the connection with all its tunnels)."""
    client, server = pair
    sid = _open(client, server)
    client.reset(sid)
    client.release(sid)
    server.send(sid, memoryview(b"in flight"))
    in_flight = server.data_to_send()          # crossed our RST on the wire
    pump(client, server)
    for _ in range(CLOSED_STREAMS_PER_OPEN * hbone.MAX_STREAMS - hbone.MAX_STREAMS):
        _exchange(client, server)
    events = client.receive(in_flight)
    assert not any(isinstance(e, ConnectionEnded) for e in events) and not client.closed
    assert _open(client, server)               # the connection carries on


class _TraceLines:
    """An h2 logger that keeps the trace lines, formatted as logging would."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def debug(self, *vargs, **kwargs) -> None:
        pass

    def trace(self, fmtstr, *args) -> None:
        self.lines.append(fmtstr % args)


def test_h2_formats_no_frame_repr_unless_its_trace_line_is_written(monkeypatch):
    """h2 calls repr(frame) for its trace line on every frame it handles; with tracing off
    (h2's default logger) no frame is formatted, with it on the line is as before."""
    formatted: list[str] = []
    real_repr = hyperframe.frame.Frame.__repr__

    def counting_repr(frame) -> str:
        text = real_repr(frame)
        formatted.append(text)
        return text

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", counting_repr)
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)
    client.initiate(), server.initiate()
    pump(client, server), pump(server, client), pump(client, server)
    sid = _open(client, server)
    assert formatted == [], "frames were formatted for a trace line nobody writes"
    traced = _TraceLines()
    server._h2.config.logger = traced
    client.end(sid)
    pump(client, server)
    frame_lines = [line for line in traced.lines if line.startswith("Received frame: ")]
    assert formatted and frame_lines == [f"Received frame: {text}" for text in formatted]
    assert "DataFrame(stream_id=1, flags=['END_STREAM'])" in frame_lines[0]

"""The HBONE DATA fast path, pure: its framer against frames h2 writes and accepts (both
ways), flow control in integers, the same answers as the h2 path to bad frames, and
fuzz tests (it parses untrusted bytes)."""
from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.hbone import fastpath
from shoal.hbone import framing as hbone
from shoal.hbone.fastpath import FlowControl, FrameSplitter, FramingError, data_header, window_update
from shoal.hbone.framing import (
    ConnectionEnded,
    HboneConnection,
    TunnelData,
    TunnelEnded,
    TunnelReset,
    TunnelResponse,
    WindowOpened,
)


def _frames(wire: bytes, max_frame: int = 1 << 20):
    return [(t, f, s, bytes(frame)) for t, f, s, _, frame in FrameSplitter(max_frame).split(wire)]


# -- the framer against h2 ----------------------------------------------------------------------

def _h2_pair():
    """A client and server h2 connection with stream 1 open both ways."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    client.receive_data(server.data_to_send())
    server.data_to_send()
    return client, server


def test_reads_what_h2_writes_data_padding_end_stream_and_window_updates():
    client, _ = _h2_pair()
    client.send_data(1, b"hello", pad_length=7)
    client.send_data(1, b" world", end_stream=True)
    client.increment_flow_control_window(1000)
    client.ping(b"12345678")
    wire = client.data_to_send()
    frames = list(FrameSplitter().split(wire))
    assert [t for t, *_ in frames] == [0, 0, 8, 6]
    (_, flags0, sid0, len0, f0), (_, flags1, sid1, len1, f1) = frames[:2]
    assert bytes(fastpath.data_payload(f0, len0, flags0)) == b"hello" and len0 == 5 + 7 + 1
    assert bytes(fastpath.data_payload(f1, len1, flags1)) == b" world" and flags1 & fastpath.FLAG_END_STREAM
    assert fastpath.window_increment(frames[2][4]) == 1000 and frames[2][2] == 0
    assert b"".join(bytes(f) for *_, f in frames) == wire  # nothing lost or reordered


def test_h2_accepts_what_we_write():
    _, server = _h2_pair()
    payload = bytes(range(256)) * 40
    wire = data_header(1, len(payload)) + payload + window_update(1, 5000) + window_update(0, 7000) \
        + data_header(1, 3, end_stream=True) + b"end" + fastpath.empty_data(1, 0xff)
    events = server.receive_data(wire[:-9])
    received = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert received == payload + b"end"
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    updates = sorted((e.stream_id, e.delta) for e in events if isinstance(e, h2.events.WindowUpdated))
    assert updates == [(0, 7000), (1, 5000)]
    frame, _ = hyperframe.frame.Frame.parse_frame_header(memoryview(wire[-9:]))
    assert isinstance(frame, hyperframe.frame.DataFrame) and frame.flags == {"END_STREAM"}  # only that flag kept


def test_split_anywhere_gives_the_same_frames():
    wire = data_header(1, 10) + b"0123456789" + window_update(1, 9) + data_header(1, 2, True) + b"ab"
    whole = _frames(wire)
    for cut in range(len(wire) + 1):
        splitter = FrameSplitter()
        got = [(t, f, s, bytes(fr)) for t, f, s, _, fr in splitter.split(wire[:cut])]
        got += [(t, f, s, bytes(fr)) for t, f, s, _, fr in splitter.split(wire[cut:])]
        assert got == whole


def test_oversized_frame_is_refused_from_its_header_before_buffering():
    splitter = FrameSplitter(max_frame=16_384)
    with pytest.raises(FramingError) as err:
        list(splitter.split(fastpath.frame_header(20_000, 0, 0, 1)))  # the header alone suffices
    assert (err.value.code, err.value.stream_id) == (fastpath.FRAME_SIZE_ERROR, 0)


def test_flow_control_in_integers_batched_credit_and_a_peer_ignoring_it():
    flow = FlowControl(stream_window=100, connection_window=1000)
    flow.own_receive(1)
    flow.received(1, 100, owned=True)
    with pytest.raises(FramingError) as err:  # past the stream's window: refused, not buffered
        flow.received(1, 1, owned=True)
    assert err.value.code == fastpath.FLOW_CONTROL_ERROR
    assert flow.credit(1, 10) == b""                        # under a quarter: no frame yet
    assert flow.credit(1, 20) == window_update(1, 30)       # the stream's quarter reached
    assert flow.credit(1, 220) == window_update(0, 250) + window_update(1, 220)  # the connection's too
    assert flow.receive[1] == 250 and flow.receive_connection == 1000 - 101 + 250
    flow.own_send(1, 50)
    assert flow.grant(1, 80) == 50 and flow.grant(1, 1) == 0
    flow.window_updated(1, 10)
    assert flow.grant(1, 80) == 10
    flow.send_connection = 5
    flow.window_updated(1, 100)
    assert flow.grant(1, 80) == 5                           # the connection window binds too
    with pytest.raises(FramingError) as err:
        flow.window_updated(1, fastpath.MAX_WINDOW)
    assert (err.value.code, err.value.stream_id) == (fastpath.FLOW_CONTROL_ERROR, 1)
    flow.send_ended.add(1)
    flow.window_updated(0, 1000)
    assert flow.grant(1, 10) == 0                            # nothing after our END_STREAM


# -- the fast path in HboneConnection, against the h2 path ------------------------------------------

def _connected(fast: bool):
    """A fast-path (or h2-path) server HboneConnection with stream 1 answered, and the
    raw h2 client talking to it."""
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.increment_flow_control_window(1 << 20)
    server = HboneConnection(client_side=False, fast_path=fast)
    server.initiate()
    server.receive(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    server.receive(raw.data_to_send())
    assert server.respond(1, 200)
    raw.receive_data(server.data_to_send())
    return raw, server


@pytest.mark.parametrize("fast", [True, False])
def test_interop_with_a_plain_h2_peer_both_ways(fast):
    raw, server = _connected(fast)
    raw.send_data(1, b"x" * 70_000)  # more than h2's default window: SETTINGS raised it
    raw.send_data(1, b"tail", pad_length=20, end_stream=True)
    events = server.receive(raw.data_to_send())
    data = b"".join(bytes(e.data) for e in events if isinstance(e, TunnelData))
    assert data == b"x" * 70_000 + b"tail" and isinstance(events[-1], TunnelEnded)
    server.consumed(1, sum(e.flow_controlled_length for e in events if isinstance(e, TunnelData)))
    payload, sent, got, ended = bytes(range(256)) * 5000, 0, b"", False
    while not ended:  # the h2 peer's 64 KiB windows: it credits, we send on
        sent += server.send(1, memoryview(payload)[sent:])
        if sent == len(payload):
            server.end(1)
        for event in raw.receive_data(server.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                got += event.data
                raw.acknowledge_received_data(event.flow_controlled_length, 1)
            ended = ended or isinstance(event, h2.events.StreamEnded)
        server.receive(raw.data_to_send())
    assert got == payload
    assert server.release(1)


def _bad_inputs():
    hdr = fastpath.frame_header
    return {
        "oversized frame": hdr(2 << 20, 0, 0, 1) + bytes(2 << 20),  # whole: h2 waits for it
        "padding as long as the frame": hdr(4, 0, fastpath.FLAG_PADDED, 1) + bytes([9, 0, 0, 0]),
        "padded DATA without its pad length": hdr(0, 0, fastpath.FLAG_PADDED, 1),
        "oversized DATA on stream 0": hdr(2 << 20, 0, 0, 0) + bytes(16),
        "DATA on stream 0": data_header(0, 1) + b"x",
        "DATA on an idle stream": data_header(7, 1) + b"x",
        "DATA past the stream window": data_header(1, 1 << 20) + bytes(1 << 20)
        + data_header(1, 1 << 20) + bytes(1 << 20) + data_header(1, 1 << 20) + bytes(1 << 20)
        + data_header(1, 1 << 20) + bytes(1 << 20) + data_header(1, 1) + b"x",
        "zero window increment, stream": hdr(4, 8, 0, 1) + bytes(4),
        "zero window increment, connection": hdr(4, 8, 0, 0) + bytes(4),
        "WINDOW_UPDATE of 5 bytes": hdr(5, 8, 0, 1) + bytes(5),
        "stream window past 2^31-1": window_update(1, fastpath.MAX_WINDOW),
        "connection window past 2^31-1": window_update(0, fastpath.MAX_WINDOW),
        "DATA after END_STREAM": data_header(1, 1, end_stream=True) + b"x" + data_header(1, 1) + b"y",
        "empty DATA flood": data_header(1, 0) * 300,
        "DATA inside a header block": hdr(4, 1, 0, 1) + bytes(4) + data_header(1, 1) + b"x",
        "WINDOW_UPDATE inside a header block": hdr(4, 1, 0, 1) + bytes(4) + window_update(1, 10),
    }


def _answer(fast: bool, wire: bytes):
    """What the connection made of ``wire``: its events (data joined) and the frames it
    answered with (type, stream, error code), without SETTINGS/WINDOW_UPDATE noise."""
    _, server = _connected(fast)
    server.data_to_send()
    events = server.receive(wire)
    summary = []
    for event in events:
        if isinstance(event, TunnelData):
            if summary and summary[-1][0] == "data":
                summary[-1] = ("data", summary[-1][1] + len(event.data))
            else:
                summary.append(("data", len(event.data)))
        elif isinstance(event, ConnectionEnded):
            summary.append(("ended", event.reason, event.error is not None))
        elif not isinstance(event, WindowOpened):
            summary.append(event)
    frames = []
    for frame_type, _flags, stream_id, _length, frame in FrameSplitter(1 << 24).split(server.data_to_send()):
        if frame_type in (3, 7):  # RST_STREAM, GOAWAY: their error codes
            code = int.from_bytes(frame[9:13] if frame_type == 3 else frame[13:17], "big")
            frames.append((frame_type, stream_id, code))
    return summary, frames


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_gets_the_same_answer_on_both_paths(case):
    wire = _bad_inputs()[case]
    fast, slow = _answer(True, wire), _answer(False, wire)
    assert fast == slow
    assert fast[1] or any(isinstance(e, TunnelReset) for e in fast[0]), "every case is answered"


def test_the_answers_name_rfc_9113_codes():
    codes = {case: _answer(True, wire)[1] for case, wire in _bad_inputs().items()}
    assert codes["oversized frame"] == [(7, 0, fastpath.FRAME_SIZE_ERROR)]
    assert codes["DATA past the stream window"] == [(7, 0, fastpath.FLOW_CONTROL_ERROR)]
    assert codes["stream window past 2^31-1"] == [(3, 1, fastpath.FLOW_CONTROL_ERROR)]
    assert codes["empty DATA flood"] == [(7, 0, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)]
    assert codes["DATA on stream 0"] == [(7, 0, fastpath.PROTOCOL_ERROR)]


def test_a_reset_stream_keeps_the_connection_window_whole():
    """DATA in flight after our RST is counted and credited at once: the connection's
    window does not leak, and the other streams go on."""
    raw, server = _connected(True)
    server.reset(1)
    raw.receive_data(server.data_to_send())
    for _ in range(20):  # 20 MiB after the reset, more than the 16 MiB connection window
        server.receive(data_header(1, 1 << 20) + bytes(1 << 20))
    assert not server.closed
    assert server._flow.receive_connection >= hbone.CONNECTION_WINDOW - (1 << 22)


def test_client_owns_the_stream_from_its_200_and_data_before_it_is_refused_as_h2_does():
    for fast in (True, False):
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        client = HboneConnection(client_side=True, fast_path=fast)
        client.initiate()
        server.receive_data(client.data_to_send())
        client.receive(server.data_to_send())
        sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
        server.receive_data(client.data_to_send())
        early = data_header(sid, 5) + b"early"
        events = client.receive(early)
        assert [type(e) for e in events] == [ConnectionEnded], fast


def test_a_200_and_its_first_bytes_in_one_read():
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    client = HboneConnection(client_side=True)
    client.initiate()
    server.receive_data(client.data_to_send())
    client.receive(server.data_to_send())
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", hbone.new_traceparent())
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(":status", "200")])
    server.send_data(sid, b"greeting")
    events = client.receive(server.data_to_send())
    assert events[-2:] == [TunnelResponse(sid, 200), TunnelData(sid, b"greeting", 8)]


# -- fuzz -----------------------------------------------------------------------------------------

frames = st.lists(st.tuples(st.sampled_from(["data", "update", "ping"]), st.binary(max_size=300),
                            st.booleans(), st.integers(1, 2 ** 20)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(frames, st.lists(st.integers(0, 4000), max_size=6))
def test_fuzz_round_trip_split_at_random_points(spec, cuts):
    wire, expected = b"", []
    for kind, payload, _end, increment in spec:
        if kind == "data":
            wire += data_header(1, len(payload)) + payload
            expected.append((0, payload))
        elif kind == "update":
            wire += window_update(1, increment)
            expected.append((8, increment.to_bytes(4, "big")))
        else:
            ping = payload[:8].ljust(8, b"\0")
            wire += fastpath.frame_header(8, 6, 0, 0) + ping
            expected.append((6, ping))
    splitter, got, start = FrameSplitter(), [], 0
    for cut in sorted(c for c in cuts if c <= len(wire)) + [len(wire)]:
        got += [(t, bytes(frame[9:])) for t, _, _, _, frame in splitter.split(wire[start:cut])]
        start = cut
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 64))
def test_fuzz_arbitrary_bytes_on_a_live_connection_both_paths_agree(garbage, step):
    """Whatever follows the handshake, the fast path ends in the same state as the h2
    path (same events, same answers) and raises nothing."""
    results, errors = [], []
    for fast in (True, False):
        _, server = _connected(fast)
        server.data_to_send()
        events = []
        for start in range(0, len(garbage), step):
            events += server.receive(garbage[start:start + step])
        results.append(([type(e).__name__ for e in events if not isinstance(e, (TunnelData, WindowOpened))],
                         b"".join(bytes(e.data) for e in events if isinstance(e, TunnelData)), server.closed))
        errors.append([e.error for e in events if isinstance(e, ConnectionEnded)])
    if results[0] != results[1]:
        # The one difference: an oversized frame is refused from its header, where h2
        # would buffer up to its whole body before answering the same FRAME_SIZE_ERROR.
        assert not results[1][2] and "maximum" in errors[0][-1]


def test_seeded_fuzz_of_valid_frames_with_mutations():
    """A seeded random walk: valid DATA/WINDOW_UPDATE/PING streams with single-byte
    mutations; both paths agree on every one (reproducible without hypothesis's DB)."""
    rng = random.Random(1313)
    for _ in range(200):
        wire = bytearray()
        for _ in range(rng.randint(1, 8)):
            kind = rng.choice(["data", "update", "ping", "rst"])
            if kind == "data":
                wire += data_header(1, n := rng.randint(0, 40), rng.random() < 0.1) + bytes(n)
            elif kind == "update":
                wire += window_update(rng.choice([0, 1, 3]), rng.randint(1, 1 << 20))
            elif kind == "ping":
                wire += fastpath.frame_header(8, 6, 0, 0) + bytes(8)
            else:
                wire += fastpath.frame_header(4, 3, 0, 1) + bytes(4)
        if wire and rng.random() < 0.7:
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        answers = [_answer(fast, bytes(wire)) for fast in (True, False)]
        if answers[0] != answers[1]:  # only an oversized frame refused from its header
            assert answers[0][1] == [(7, 0, fastpath.FRAME_SIZE_ERROR)] and not answers[1][1], bytes(wire).hex()


# -- buffered reads with the driver's sinks (the request/response loop) -----------------------------

class _Sink:
    """A stream peer as the driver has it: takes each payload as it is parsed (and gives
    no credit back, as the h2 path's reference reader here)."""

    def __init__(self) -> None:
        self.data = b""

    def on_stream_data(self, data, length: int) -> None:
        self.data += bytes(data)   # a view of the read buffer: copied before the buffer moves


def _buffered_answer(wire: bytes, step: int, sink: bool):
    """As ``_answer``, for a fast-path server read as the driver reads (``receive_buffer``,
    ``step`` bytes at a time, unparsed bytes kept and passed again) with stream 1 taken by
    a sink (or, ``sink`` False, by nobody: its payloads come out as events)."""
    _, server = _connected(True)
    server.data_to_send()
    taker = _Sink()
    server.data_sinks = {1: taker} if sink else {}
    pending, events = b"", []
    for start in range(0, len(wire), step):
        pending += wire[start:start + step]
        new, used = server.receive_buffer(memoryview(pending))
        for event in new:
            if isinstance(event, TunnelData):
                event = TunnelData(event.stream_id, bytes(event.data), event.flow_controlled_length)
            events.append(event)
        pending = pending[used:]
    summary, received = [], taker.data + b"".join(e.data for e in events if isinstance(e, TunnelData))
    for event in events:
        if isinstance(event, ConnectionEnded):
            summary.append(("ended", event.reason, event.error is not None))
        elif not isinstance(event, (TunnelData, WindowOpened)):
            summary.append(event)
    frames = [(t, s, int.from_bytes(f[9:13] if t == 3 else f[13:17], "big"))
              for t, _, s, _, f in FrameSplitter(1 << 24).split(server.data_to_send()) if t in (3, 7)]
    return summary, received, frames, server.closed


def _h2_path_answer(wire: bytes, step: int):
    """The reference: the h2 path, fed the same reads."""
    _, server = _connected(False)
    server.data_to_send()
    events = [e for start in range(0, len(wire), step) for e in server.receive(wire[start:start + step])]
    summary = [("ended", e.reason, e.error is not None) if isinstance(e, ConnectionEnded) else e
               for e in events if not isinstance(e, (TunnelData, WindowOpened))]
    frames = [(t, s, int.from_bytes(f[9:13] if t == 3 else f[13:17], "big"))
              for t, _, s, _, f in FrameSplitter(1 << 24).split(server.data_to_send()) if t in (3, 7)]
    return summary, b"".join(bytes(e.data) for e in events if isinstance(e, TunnelData)), frames, server.closed


def _agree(buffered, reference) -> bool:
    """The same events, answers and state; the same bytes delivered, except that payloads
    handed to a sink before a connection error later in the same read stay delivered
    (the h2 path drops every event of that read): then the reference's are a prefix."""
    (summary, received, frames, closed), (ref_summary, ref_received, ref_frames, ref_closed) = buffered, reference
    same_bytes = received == ref_received or (closed and received.startswith(ref_received))
    return same_bytes and (summary, frames, closed) == (ref_summary, ref_frames, ref_closed)


def test_request_response_reads_go_to_the_sink_and_leave_a_partial_frame_in_place():
    _, server = _connected(True)
    server.data_to_send()
    taker = _Sink()
    server.data_sinks = {1: taker}
    wire = data_header(1, 5) + b"hello" + data_header(1, 6) + b" world" + data_header(1, 4) + b"ta"
    events, used = server.receive_buffer(memoryview(wire))
    assert events == [] and taker.data == b"hello world" and used == len(wire) - 11
    events, used = server.receive_buffer(memoryview(wire[used:] + b"il"))
    assert events == [] and taker.data == b"hello worldtail" and used == 13


@pytest.mark.parametrize("sink", [True, False])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_read_as_the_driver_reads_gets_the_h2_paths_answer(case, sink):
    wire = _bad_inputs()[case]
    for step in (1, 7, len(wire)) if len(wire) < 10_000 else (65_536, len(wire)):
        assert _agree(_buffered_answer(wire, step, sink), _h2_path_answer(wire, step)), (case, step)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data", "end", "padded", "update", "ping", "other stream"]),
                          st.binary(max_size=200)), max_size=10),
       st.integers(1, 400), st.booleans(), st.one_of(st.none(), st.tuples(st.integers(0, 4000), st.integers(0, 255))))
def test_fuzz_buffered_reads_with_sinks_agree_with_the_h2_path(spec, step, sink, mutation):
    """Frames the sink loop takes, frames it must leave to the general path (flags,
    other types, other streams), and single-byte mutations of them: the same bytes
    delivered, the same events and answers as the h2 path."""
    wire = bytearray()
    for kind, payload in spec:
        if kind == "data":
            wire += data_header(1, len(payload)) + payload
        elif kind == "end":
            wire += data_header(1, len(payload), end_stream=True) + payload
        elif kind == "padded":
            wire += fastpath.frame_header(len(payload) + 3, 0, fastpath.FLAG_PADDED, 1) + b"\x02" + payload + b"\0\0"
        elif kind == "update":
            wire += window_update(1, len(payload) + 1)
        elif kind == "ping":
            wire += fastpath.frame_header(8, 6, 0, 0) + payload[:8].ljust(8, b"\0")
        else:
            wire += data_header(3, len(payload)) + payload
    if mutation is not None and wire:
        wire[mutation[0] % len(wire)] = mutation[1]
    buffered, reference = _buffered_answer(bytes(wire), step, sink), _h2_path_answer(bytes(wire), step)
    if not _agree(buffered, reference):
        # As the unbuffered fast path: an oversized frame is refused from its header (h2
        # waits for its body), and what came before it may already have been delivered.
        assert buffered[2][-1:] == [(7, 0, fastpath.FRAME_SIZE_ERROR)] and not reference[3], bytes(wire).hex()


def test_the_sink_loop_keeps_to_the_read_budget():
    """A read of many small DATA frames (a flood, or a burst of requests) is parsed at
    most READ_BUDGET frames at a time by the sink loop too: the rest waits, whole."""
    _, server = _connected(True)
    server.data_to_send()
    taker = _Sink()
    server.data_sinks = {1: taker}
    frame = data_header(1, 3) + b"abc"
    wire = frame * (hbone.READ_BUDGET + 44)
    events, used = server.receive_buffer(memoryview(wire))
    assert events == [] and server.budget_spent
    assert used == hbone.READ_BUDGET * len(frame) and taker.data == b"abc" * hbone.READ_BUDGET
    events, used = server.receive_buffer(memoryview(wire[used:]))
    assert events == [] and not server.budget_spent and used == 44 * len(frame)
    assert taker.data == b"abc" * (hbone.READ_BUDGET + 44)

"""The HBONE DATA fast path's framer, pure: interop both ways with the frames h2 writes
and accepts, RFC 9113's answers to bad frames, flow control in integers, and a fuzz test
(it parses untrusted bytes)."""
from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.hbone import fastpath
from shoal.hbone.fastpath import (
    Data,
    FrameReader,
    FramingError,
    Passthrough,
    Window,
    WindowUpdate,
    data_header,
    window_update,
)


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
    client, server = _h2_pair()
    client.send_data(1, b"hello", pad_length=7)
    client.send_data(1, b" world", end_stream=True)
    client.increment_flow_control_window(1000, stream_id=1)
    reader = FrameReader()
    reader.own(1, 65_535)
    events = reader.feed(client.data_to_send())
    data = [e for e in events if isinstance(e, Data)]
    assert [bytes(e.payload) for e in data] == [b"hello", b" world"]
    assert [e.end_stream for e in data] == [False, True]
    assert data[0].flow_length == 5 + 7 + 1  # padding and its length byte count too
    # h2 wrote END_STREAM before our WINDOW_UPDATE: the stream is h2's again afterwards.
    assert [e for e in events if isinstance(e, Passthrough)]


def test_h2_accepts_what_we_write():
    client, server = _h2_pair()
    reader = FrameReader()
    payload = bytes(range(256)) * 40
    wire = data_header(1, len(payload)) + payload + window_update(1, 5000) + window_update(0, 7000) \
        + data_header(1, 3, end_stream=True) + b"end"
    events = server.receive_data(wire)
    received = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert received == payload + b"end"
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    updates = sorted((e.stream_id, e.delta) for e in events if isinstance(e, h2.events.WindowUpdated))
    assert updates == [(0, 7000), (1, 5000)]
    assert reader.credit(1, 0) == b""


def test_other_frames_and_unowned_streams_pass_through_whole_and_in_order():
    client, _ = _h2_pair()
    client.ping(b"12345678")
    client.send_data(1, b"not owned")
    reader = FrameReader()
    wire = client.data_to_send()
    events = reader.feed(wire)
    assert all(isinstance(e, Passthrough) for e in events)
    assert b"".join(bytes(e.frame) for e in events) == wire


def test_split_anywhere_gives_the_same_frames():
    wire = data_header(1, 10) + b"0123456789" + window_update(1, 9) + data_header(1, 2, True) + b"ab"
    for cut in range(len(wire) + 1):
        reader = FrameReader()
        reader.own(1, 65_535)
        events = reader.feed(wire[:cut]) + reader.feed(wire[cut:])
        assert [type(e) for e in events] == [Data, WindowUpdate, Data]
        assert bytes(events[0].payload) + bytes(events[2].payload) == b"0123456789ab"


@pytest.mark.parametrize("wire, code, stream", [
    (fastpath.frame_header(20_000, 0, 0, 1) + bytes(20_000), fastpath.FRAME_SIZE_ERROR, 0),
    (fastpath.frame_header(4, 0, fastpath.FLAG_PADDED, 1) + bytes([9, 0, 0, 0]), fastpath.PROTOCOL_ERROR, 0),
    (data_header(0, 1) + b"x", fastpath.PROTOCOL_ERROR, 0),
    (fastpath.frame_header(4, 8, 0, 1) + bytes(4), fastpath.PROTOCOL_ERROR, 1),
    (fastpath.frame_header(5, 8, 0, 1) + bytes(5), fastpath.FRAME_SIZE_ERROR, 0),
    (data_header(1, 100) + bytes(100), fastpath.FLOW_CONTROL_ERROR, 1),
])
def test_bad_frames_get_rfc_9113_answers(wire, code, stream):
    reader = FrameReader(connection_window=1 << 20)
    reader.own(1, 50)
    with pytest.raises(FramingError) as err:
        reader.feed(wire)
    assert (err.value.code, err.value.stream_id) == (code, stream)


def test_flow_control_in_integers_and_credit_back():
    window = Window(10)
    assert window.take(4) == 4 and window.take(100) == 6 and window.take(1) == 0
    window.grow(5, stream_id=1)
    assert window.size == 5
    with pytest.raises(FramingError) as err:
        window.grow(fastpath.MAX_WINDOW, stream_id=1)
    assert err.value.code == fastpath.FLOW_CONTROL_ERROR
    reader = FrameReader(connection_window=100)
    reader.own(1, 100)
    reader.feed(data_header(1, 100) + bytes(100))
    with pytest.raises(FramingError):  # a peer ignoring flow control is refused, not buffered
        reader.feed(data_header(1, 1) + b"x")
    reader = FrameReader(connection_window=100)
    reader.own(1, 100)
    reader.feed(data_header(1, 100) + bytes(100))
    updates = reader.feed(reader.credit(1, 60))  # what we send back parses as two updates
    assert updates == [WindowUpdate(0, 60), WindowUpdate(1, 60)]
    assert [type(e) for e in reader.feed(data_header(1, 60) + bytes(60))] == [Data]


frames = st.lists(st.tuples(st.sampled_from(["data", "update", "ping"]), st.binary(max_size=300),
                            st.booleans(), st.integers(1, 2 ** 20)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(frames, st.lists(st.integers(0, 4000), max_size=6))
def test_fuzz_round_trip_split_at_random_points(spec, cuts):
    wire, expected = b"", []
    for kind, payload, _end, increment in spec:
        if kind == "data":
            wire += data_header(1, len(payload)) + payload
            expected.append(("data", payload))
        elif kind == "update":
            wire += window_update(1, increment)
            expected.append(("update", increment))
        else:
            wire += fastpath.frame_header(8, 6, 0, 0) + payload[:8].ljust(8, b"\0")
            expected.append(("ping", None))
    reader = FrameReader(connection_window=1 << 30)
    reader.own(1, 1 << 30)
    events, start = [], 0
    for cut in sorted(c for c in cuts if c <= len(wire)) + [len(wire)]:
        events += reader.feed(wire[start:cut])
        start = cut
    got = [("data", bytes(e.payload)) if isinstance(e, Data) else ("update", e.increment)
           if isinstance(e, WindowUpdate) else ("ping", None) for e in events]
    assert got == expected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_fuzz_arbitrary_bytes_only_ever_raise_framing_errors(wire, step):
    reader = FrameReader()
    reader.own(1, 65_535)
    reader.own(3, 10)
    try:
        for start in range(0, len(wire), step):
            for event in reader.feed(wire[start:start + step]):
                if isinstance(event, Data):
                    assert len(event.payload) <= event.flow_length <= reader.max_frame
    except FramingError as exc:
        assert exc.code in (fastpath.PROTOCOL_ERROR, fastpath.FLOW_CONTROL_ERROR, fastpath.FRAME_SIZE_ERROR)

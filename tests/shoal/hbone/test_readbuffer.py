"""The HBONE read buffer is sized to its connection's traffic: an idle or
request/response connection costs SMALL, a bulk one grows to hold whole 1 MiB frames and
shrinks back once quiet. Bytes are the parser's at every size (no frame is split or lost)."""
from __future__ import annotations

import random

from shoal.hbone import framing
from shoal.hbone.readbuffer import LARGE, MEDIUM, SHRINK_AFTER_SMALL_READS, SMALL, SessionReadBuffer, size_for
from shoal.hbone.session import HboneSession


def _connected_pair():
    """A client ``HboneConnection`` with one CONNECT answered by a server fed through a SessionReadBuffer."""
    client = framing.HboneConnection(client_side=True)
    server = framing.HboneConnection(client_side=False)
    client.initiate()
    server.initiate()
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", framing.new_traceparent())
    buffer = SessionReadBuffer()
    events = _feed(server, buffer, client.data_to_send(), step=1000)
    request = next(e for e in events if isinstance(e, framing.TunnelRequested))
    server.respond(request.stream_id, framing.STATUS_OK)
    client.receive(server.data_to_send())
    server.data_to_send()
    return client, server, buffer, sid


def _feed(server, buffer: SessionReadBuffer, data: bytes, step: int, sizehint: int | None = None) -> list:
    """What the TLS layer does: ask for room, decrypt into it (possibly less than asked), say how much."""
    events: list = []
    position = 0
    while position < len(data):
        room = buffer.room(step if sizehint is None else sizehint)
        chunk = data[position:position + min(step, len(room))]
        room[:len(chunk)] = chunk
        position += len(chunk)
        new, used = server.receive_buffer(buffer.filled(len(chunk)))
        for event in new:
            if isinstance(event, framing.TunnelData):   # a view of the buffer: taken before it moves
                event = framing.TunnelData(event.stream_id, bytes(event.data), event.flow_controlled_length)
                server.consumed(event.stream_id, event.flow_controlled_length)
            events.append(event)
        buffer.used(used)
    return events


def _payload(events) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, framing.TunnelData))


def test_a_new_or_idle_connection_costs_small():
    buffer = SessionReadBuffer()
    assert len(buffer.data) == SMALL
    assert len(buffer.room(0)) == SMALL and len(buffer.room(-1)) == SMALL
    session = HboneSession(client_side=False, idle_timeout=0)
    assert len(session.reads.data) == SMALL
    # 10,000 tunnels are 100 HBONE connections per side: their buffers fit in 7 MB, not 225.
    assert 100 * len(session.reads.data) <= 7 * 1024 * 1024


def test_sizes_are_a_ladder_up_to_large():
    assert size_for(1) == SMALL and size_for(SMALL) == SMALL and size_for(SMALL + 1) == MEDIUM
    assert size_for(framing.MAX_FRAME + 9) == LARGE and size_for(10 * LARGE) == LARGE
    assert LARGE >= 2 * (framing.MAX_FRAME + 9), "a partial frame and a whole one after it"


def test_room_honours_the_size_hint_up_to_large():
    buffer = SessionReadBuffer()
    assert len(buffer.room(200_000)) >= 200_000 and len(buffer.data) == MEDIUM
    assert len(buffer.room(LARGE)) == LARGE
    assert len(buffer.room(10 * LARGE)) == LARGE


def test_one_mib_frames_grow_the_buffer_and_arrive_whole():
    client, server, buffer, sid = _connected_pair()
    rng = random.Random(7)
    payload = rng.randbytes(3 * framing.MAX_FRAME + 12345)
    assert client.send(sid, memoryview(payload)) == len(payload)
    wire = client.data_to_send()
    # Small reads with no size hint: the held partial frame's header says how much room it needs.
    events = _feed(server, buffer, wire, step=16 * 1024, sizehint=0)
    assert _payload(events) == payload
    assert len(buffer.data) == LARGE


def test_small_reads_shrink_a_grown_buffer_back():
    client, server, buffer, sid = _connected_pair()
    big = bytes(framing.MAX_FRAME)
    client.send(sid, memoryview(big))
    assert _payload(_feed(server, buffer, client.data_to_send(), step=256 * 1024)) == big
    assert len(buffer.data) > SMALL
    echoed = b""
    for n in range(SHRINK_AFTER_SMALL_READS):
        line = f"request {n}\n".encode()
        client.send(sid, memoryview(line))
        echoed += _payload(_feed(server, buffer, client.data_to_send(), step=1024))
        client.receive(server.data_to_send())   # the window updates
    assert echoed == b"".join(f"request {n}\n".encode() for n in range(SHRINK_AFTER_SMALL_READS))
    assert len(buffer.data) == SMALL


def test_a_partial_frame_survives_every_resize():
    client, server, buffer, sid = _connected_pair()
    rng = random.Random(11)
    sent, got = b"", b""
    for _ in range(60):
        size = rng.choice((10, 3000, 70_000, 300_000, framing.MAX_FRAME))
        chunk = rng.randbytes(size)
        sent += chunk
        assert client.send(sid, memoryview(chunk)) == size
        got += _payload(_feed(server, buffer, client.data_to_send(), step=rng.choice((100, 5000, 65_536, 400_000))))
        client.receive(server.data_to_send())
    assert got == sent


def test_shrink_keeps_held_bytes_and_a_lent_buffer_is_not_reused():
    buffer = SessionReadBuffer()
    room = buffer.room(MEDIUM)
    room[:5] = b"abcde"
    buffer.filled(5)
    buffer.shrink()                       # something is held: no shrink
    assert bytes(buffer.data[buffer.start:buffer.end]) == b"abcde"
    lent = buffer.data
    buffer.lent = True
    buffer.used(5)
    room = buffer.room(len(buffer.data))  # needs a compaction: a fresh buffer
    assert buffer.data is not lent and not buffer.lent

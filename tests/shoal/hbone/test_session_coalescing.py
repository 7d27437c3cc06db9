"""Write coalescing in the HBONE driver (issue 13 item 2): the DATA frames of every stream
that read in one event-loop turn leave in one TLS write, in order, decodable by h2."""
from __future__ import annotations

import asyncio

import pytest

from shoal.agent.ztunnel.telemetry import ConnectionRecord
from shoal.hbone import fastpath, framing
from shoal.hbone.session import HboneSession, StreamPeer
from shoal.perf.rrmicro import StandInTransport as RecordingTransport

pytestmark = pytest.mark.timeout(20)


def feed(peer: StreamPeer, data: bytes) -> None:
    """What uvloop does for a BufferedProtocol: ask for a buffer, read into it, say how much."""
    buffer = peer.get_buffer(len(data))
    buffer[:len(data)] = data
    peer.buffer_updated(len(data))


def _tunnel(session: HboneSession, port: int) -> StreamPeer:
    peer = StreamPeer(ConnectionRecord("source", "10.0.0.1", 40000 + port, "10.0.0.2", port),
                      on_finished=lambda record: None, tcp_is_client=True)
    peer.start(RecordingTransport())
    session.open_stream(peer, "10.0.0.2", port, "10.0.0.1", framing.new_traceparent())
    peer.established()
    return peer


async def test_small_reads_of_many_streams_leave_in_one_write_per_turn():
    tls = RecordingTransport()
    session = HboneSession(client_side=True, idle_timeout=0)
    session.connection_made(tls)
    peers = [_tunnel(session, port) for port in (7001, 7002, 7003)]
    before = len(tls.writes)
    for round_ in range(4):  # 4 small reads on each of 3 streams, all in one loop turn
        for peer in peers:
            feed(peer, f"{peer.stream_id}:{round_};".encode())
    assert len(tls.writes) == before, "nothing is written before the turn ends"
    await asyncio.sleep(0)
    assert len(tls.writes) == before + 1, "one write carries every stream's DATA of the turn"

    # The coalesced bytes are valid HTTP/2 that h2 decodes, in order, per stream.
    server = framing.HboneConnection(client_side=False)
    server.initiate()
    received: dict[int, bytes] = {}
    for event in server.receive(b"".join(tls.writes)):
        if isinstance(event, framing.TunnelData):
            received[event.stream_id] = received.get(event.stream_id, b"") + bytes(event.data)
    assert received == {p.stream_id: b"".join(f"{p.stream_id}:{r};".encode() for r in range(4)) for p in peers}
    assert sum(p.record.bytes_in for p in peers) == sum(len(v) for v in received.values())


async def test_an_immediate_flush_keeps_the_order_of_scheduled_bytes():
    tls = RecordingTransport()
    session = HboneSession(client_side=True, idle_timeout=0)
    session.connection_made(tls)
    peer = _tunnel(session, 7001)
    feed(peer, b"first")
    peer.eof_received()             # END_STREAM flushes at once: the queued DATA goes before it
    await asyncio.sleep(0)
    server = framing.HboneConnection(client_side=False)
    server.initiate()
    events = [e for e in server.receive(b"".join(tls.writes))
              if isinstance(e, (framing.TunnelData, framing.TunnelEnded))]
    assert [type(e) for e in events] == [framing.TunnelData, framing.TunnelEnded]
    assert bytes(events[0].data) == b"first"


async def test_a_lone_small_read_is_one_tls_write_before_the_loop_polls_again():
    """Request/response latency: a lone 1 KiB read leaves as one TLS write holding exactly
    one DATA frame (header and payload together: one TLS record), flushed from the ready
    queue, before any callback scheduled after the read and before the next I/O poll."""
    tls = RecordingTransport()
    session = HboneSession(client_side=True, idle_timeout=0)
    session.connection_made(tls)
    peer = _tunnel(session, 7001)
    await asyncio.sleep(0)
    before = len(tls.writes)
    loop = asyncio.get_running_loop()
    feed(peer, b"q" * 1024)
    writes_seen = loop.create_future()
    loop.call_soon(lambda: writes_seen.set_result(len(tls.writes)))
    assert await writes_seen == before + 1
    assert tls.writes[-1] == fastpath.data_header(peer.stream_id, 1024) + b"q" * 1024
    await asyncio.sleep(0)
    assert len(tls.writes) == before + 1, "nothing else was written"


async def test_stream_data_reaches_the_socket_inside_the_tls_read_callback():
    """The other way: a DATA frame read from TLS is written to its TCP socket before the
    read callback returns (no event object queued for later, no task, no extra turn)."""
    client = framing.HboneConnection(client_side=True)
    client.initiate()
    upstream = RecordingTransport()

    def on_request(session, request):
        peer = StreamPeer(ConnectionRecord("destination", "10.0.0.1", 40000, "10.0.0.2", 80),
                          on_finished=lambda record: None, tcp_is_client=False)
        peer.start(upstream)
        assert session.accept_stream(peer, request.stream_id)
        peer.established()

    server = HboneSession(client_side=False, idle_timeout=0, on_request=on_request)
    server.connection_made(RecordingTransport())
    sid = client.connect("10.0.0.2", 80, "10.0.0.1", framing.new_traceparent())
    server.data_received(client.data_to_send())
    client.receive(b"".join(server.transport.writes))
    assert client.send(sid, memoryview(b"ping" * 256)) == 1024
    frames = client.data_to_send()
    buffer = server.get_buffer(len(frames))
    buffer[:len(frames)] = frames
    server.buffer_updated(len(frames))
    assert upstream.writes == [b"ping" * 256]

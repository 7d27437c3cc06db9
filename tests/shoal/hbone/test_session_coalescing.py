"""Write coalescing in the HBONE driver (issue 13 item 2): the DATA frames of every stream
that read in one event-loop turn leave in one TLS write, in order, decodable by h2."""
from __future__ import annotations

import asyncio

import pytest

from shoal.agent.ztunnel.telemetry import ConnectionRecord
from shoal.hbone import framing
from shoal.hbone.session import HboneSession, StreamPeer

pytestmark = pytest.mark.timeout(20)


class RecordingTransport(asyncio.Transport):
    """Stands in for the TLS (or TCP) transport: keeps every write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.reading = True

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        pass


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
            peer.data_received(f"{peer.stream_id}:{round_};".encode())
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
    peer.data_received(b"first")
    peer.eof_received()             # END_STREAM flushes at once: the queued DATA goes before it
    await asyncio.sleep(0)
    server = framing.HboneConnection(client_side=False)
    server.initiate()
    events = [e for e in server.receive(b"".join(tls.writes))
              if isinstance(e, (framing.TunnelData, framing.TunnelEnded))]
    assert [type(e) for e in events] == [framing.TunnelData, framing.TunnelEnded]
    assert bytes(events[0].data) == b"first"

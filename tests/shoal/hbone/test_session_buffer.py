"""The HBONE driver's read buffer (BufferedProtocol): TLS decrypts into one preallocated
buffer and payloads go to the TCP sockets as views of it. A socket that queued a view
keeps a reference to it, so that buffer must never be written over again."""
from __future__ import annotations

import asyncio

import pytest

from shoal.hbone import framing
from shoal.hbone.readbuffer import LARGE
from shoal.hbone.session import HboneSession, StreamPeer

pytestmark = pytest.mark.timeout(20)


class Record:
    bytes_in = bytes_out = 0

    def failed(self, reason: str) -> None:
        pass

    def reset(self, reason: str) -> None:
        pass


class StalledSocket(asyncio.Transport):
    """A TCP transport whose peer reads nothing: like uvloop's, it keeps what it was
    given (views included) in its queue."""

    def __init__(self, queues: bool) -> None:
        super().__init__()
        self.queues = queues
        self.kept: list[tuple[memoryview | bytes, bytes]] = []  # (what it holds, what it was when written)

    def write(self, data) -> None:
        # A socket that sent everything at once holds nothing (the kernel copied it).
        self.kept.append((data if self.queues else bytes(data), bytes(data)))

    def get_write_buffer_size(self) -> int:
        return sum(len(d) for d, _ in self.kept) if self.queues else 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


class TlsStandIn(StalledSocket):
    def __init__(self) -> None:
        super().__init__(queues=False)


def _read(session: HboneSession, data: bytes, step: int) -> None:
    """What the TLS layer does: ask for a buffer, decrypt into it, say how much."""
    for start in range(0, len(data), step):
        chunk = data[start:start + step]
        buffer = session.get_buffer(len(chunk))
        assert len(buffer) >= len(chunk)
        buffer[:len(chunk)] = chunk
        session.buffer_updated(len(chunk))


@pytest.mark.parametrize("queues", [True, False])
async def test_views_a_socket_queued_are_never_overwritten(queues):
    client = framing.HboneConnection(client_side=True)
    client.initiate()
    sockets: list[StalledSocket] = []

    def on_request(session, request):
        peer = StreamPeer(Record(), on_finished=lambda r: None, tcp_is_client=False)
        sockets.append(StalledSocket(queues))
        peer.start(sockets[-1])
        assert session.accept_stream(peer, request.stream_id)
        peer.established()

    server = HboneSession(client_side=False, idle_timeout=0, on_request=on_request)
    server.connection_made(TlsStandIn())
    sid = client.connect("10.0.0.1", 80, "10.0.0.2", framing.new_traceparent())
    _read(server, client.data_to_send(), 7)
    client.receive(b"".join(bytes(d) for d, _ in server.transport.kept))
    assert sockets, "the CONNECT was served"
    sent = b""
    for n in range(40):  # 40 frames of 100 KiB, each its own bytes, read in odd-sized pieces
        payload = bytes([n]) * 100_000
        assert client.send(sid, memoryview(payload)) == len(payload)
        sent += payload
        _read(server, client.data_to_send(), 333_333)
    kept = sockets[0].kept
    assert all(bytes(held) == original for held, original in kept), "a queued view was written over"
    assert b"".join(original for _, original in kept) == sent
    assert server.reads.lent is queues or len(sent) < LARGE


# -- the TCP side: every tunnel socket of a session reads into the session's one buffer

def _feed(peer: StreamPeer, data: bytes) -> None:
    """What uvloop does for a BufferedProtocol socket."""
    buffer = peer.get_buffer(len(data))
    assert len(buffer) >= len(data)
    buffer[:len(data)] = data
    peer.buffer_updated(len(data))


async def _client_with_streams(tls: StalledSocket, server: framing.HboneConnection, count: int
                               ) -> tuple[HboneSession, list[StreamPeer]]:
    session = HboneSession(client_side=True, idle_timeout=0)
    session.connection_made(tls)
    peers = []
    for n in range(count):
        peer = StreamPeer(Record(), on_finished=lambda r: None, tcp_is_client=True)
        session.open_stream(peer, "10.0.0.2", 8000 + n, "10.0.0.1", framing.new_traceparent())
        peer.start(StalledSocket(queues=False))
        peers.append(peer)
    _pass(tls, server)
    for peer in peers:
        assert server.respond(peer.stream_id, framing.STATUS_OK)
    session.data_received(server.data_to_send())
    for peer in peers:
        peer.established()
    return session, peers


def _pass(tls: StalledSocket, server: framing.HboneConnection) -> dict[int, bytes]:
    """Everything the client wrote so far, decoded by the server: payload per stream."""
    got: dict[int, bytes] = {}
    for event in server.receive(b"".join(bytes(held) for held, _ in tls.kept)):
        if isinstance(event, framing.TunnelData):
            got[event.stream_id] = got.get(event.stream_id, b"") + bytes(event.data)
            server.consumed(event.stream_id, event.flow_controlled_length)
    tls.kept.clear()
    return got


@pytest.mark.parametrize("queues", [True, False])
async def test_tcp_reads_share_one_buffer_and_a_view_tls_queued_is_never_overwritten(queues):
    """Large reads (16 KiB and more) go to TLS as views of the shared buffer, at once; a
    TLS transport that kept them queued makes the next read use a fresh buffer. One that
    took them reuses the one buffer: no allocation per read."""
    server = framing.HboneConnection(client_side=False)
    server.initiate()
    tls = StalledSocket(queues)
    session, (first, second) = await _client_with_streams(tls, server, 2)
    _pass(tls, server)
    buffer = session.tcp_reads.view
    fed: dict[int, bytes] = {first.stream_id: b"", second.stream_id: b""}
    for n in range(6):   # one loop turn: large and small reads of both streams interleaved
        for peer, size in ((first, 40_000 + n), (second, 700 + n), (second, 20_000 + n)):
            data = bytes([n * 3 + size % 7]) * size
            _feed(peer, data)
            fed[peer.stream_id] += data
    await asyncio.sleep(0)   # the coalesced flush of the small ones
    assert all(bytes(held) == original for held, original in tls.kept), "a queued view was written over"
    assert _pass(tls, server) == fed
    assert (session.tcp_reads.view is buffer) is not queues


async def test_bytes_waiting_for_window_are_a_copy_that_later_reads_leave_intact():
    server = framing.HboneConnection(client_side=False, stream_window=4096)
    server.initiate()
    tls = StalledSocket(queues=False)
    session, (blocked, other) = await _client_with_streams(tls, server, 2)
    _pass(tls, server)
    data = bytes(range(256)) * 40   # 10,240 bytes: 4,096 go now, the rest waits for credit
    _feed(blocked, data)
    assert blocked.transport is not None
    _feed(other, b"\xff" * 8000)    # reuses the shared buffer the waiting bytes came in
    got = b""
    for _ in range(10):
        await asyncio.sleep(0)
        got += _pass(tls, server).get(blocked.stream_id, b"")
        session.data_received(server.data_to_send())   # the credit: the waiting bytes go on
        if len(got) == len(data):
            break
    assert got == data


def test_a_tunnel_end_carries_no_instance_dict():
    """One StreamPeer per tunnel end, 10,000 at a time in a busy worker: slots, no dict, no
    set and no memoryview of its own while idle (about 0.6 KB less each)."""
    peers = [StreamPeer(Record(), on_finished=lambda r: None, tcp_is_client=True) for _ in range(2)]
    assert not hasattr(peers[0], "__dict__")
    assert peers[0]._pending is peers[1]._pending and not peers[0]._pending
    peers[0].set_paused("window", True)
    peers[0].set_paused("tls", True)
    peers[0].set_paused("window", False)
    assert peers[0]._paused and not peers[1]._paused
    peers[0].set_paused("tls", False)
    assert not peers[0]._paused

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

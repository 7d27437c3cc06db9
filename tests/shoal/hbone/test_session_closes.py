"""Tear-down in the HBONE driver (issue 18, the post-burst stall): the closes of one
event-loop turn leave in one TLS write, and a busy peer is told apart from a black-holed
one by a PING it acknowledges."""
from __future__ import annotations

import asyncio
import time

import pytest

from shoal.agent.ztunnel.outbound import await_answer
from shoal.agent.ztunnel.telemetry import ConnectionRecord
from shoal.hbone import framing
from shoal.hbone.session import HboneSession, StreamPeer
from tests.shoal.hbone.test_session_coalescing import RecordingTransport

pytestmark = pytest.mark.timeout(30)

STREAMS = 60


class UpstreamTransport(RecordingTransport):
    """A fake upstream TCP socket: takes a half-close (FIN)."""

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def abort(self) -> None:
        pass


def _server_with_streams(count: int) -> tuple[framing.HboneConnection, HboneSession, RecordingTransport,
                                              dict[int, StreamPeer]]:
    """A serving session (fake TLS transport) with ``count`` tunnels the sans-I/O client
    opened and the session answered, each joined to a fake upstream socket."""
    tls = RecordingTransport()
    peers: dict[int, StreamPeer] = {}

    def answer(session: HboneSession, request: framing.TunnelRequested) -> None:
        peer = StreamPeer(ConnectionRecord("destination", "10.0.0.1", 1, "10.0.0.2", request.port),
                          on_finished=lambda record: None, tcp_is_client=False)
        peer.start(UpstreamTransport())
        assert session.accept_stream(peer, request.stream_id)
        peer.established()
        peers[request.stream_id] = peer

    server = HboneSession(client_side=False, idle_timeout=0, on_request=answer)
    server.connection_made(tls)
    client = framing.HboneConnection(client_side=True)
    client.initiate()
    for port in range(count):
        client.connect("10.0.0.2", 7000 + port, "10.0.0.1", framing.new_traceparent())
    server.data_received(client.data_to_send())
    client.receive(b"".join(tls.writes))
    tls.writes.clear()
    assert len(peers) == count
    return client, server, tls, peers


async def test_streams_closing_in_one_turn_leave_in_one_tls_write():
    client, server, tls, peers = _server_with_streams(STREAMS)
    for stream_id in peers:
        client.end(stream_id)                 # the clients closed: END_STREAM for every tunnel
    server.data_received(client.data_to_send())
    writes_before = len(tls.writes)
    for peer in peers.values():               # then every app closes its side, each its own callback
        peer.eof_received()
    assert len(tls.writes) == writes_before, "no close writes on its own"
    await asyncio.sleep(0)
    assert len(tls.writes) == writes_before + 1, "the turn's closes leave in one write"
    ended = {e.stream_id for e in client.receive(b"".join(tls.writes)) if isinstance(e, framing.TunnelEnded)}
    assert ended == set(peers), "every stream's END_STREAM is in it"
    assert not server.streams


async def test_resets_of_a_turn_leave_in_one_tls_write():
    client, server, tls, peers = _server_with_streams(STREAMS)
    writes_before = len(tls.writes)
    for peer in peers.values():               # every upstream socket broke
        peer.connection_lost(ConnectionResetError("app gone"))
    await asyncio.sleep(0)
    assert len(tls.writes) == writes_before + 1
    reset = {e.stream_id for e in client.receive(b"".join(tls.writes)) if isinstance(e, framing.TunnelReset)}
    assert reset == set(peers)


async def test_a_connect_arriving_among_closes_is_answered_in_the_same_write():
    client, server, tls, peers = _server_with_streams(STREAMS)
    for stream_id in peers:
        client.end(stream_id)
    new_stream = client.connect("10.0.0.2", 9999, "10.0.0.1", framing.new_traceparent())
    server.data_received(client.data_to_send())   # the closes and the new CONNECT in one read
    for peer in list(peers.values()):
        peer.eof_received()
    await asyncio.sleep(0)
    events = client.receive(b"".join(tls.writes))
    answers = [e for e in events if isinstance(e, framing.TunnelResponse)]
    assert [(a.stream_id, a.status) for a in answers] == [(new_stream, framing.STATUS_OK)]
    # It is not held back behind the closes: it leaves before the turn's END_STREAMs.
    kinds = [type(e) for e in events if isinstance(e, (framing.TunnelResponse, framing.TunnelEnded))]
    assert kinds.index(framing.TunnelResponse) == 0


class Link(RecordingTransport):
    """One direction of an in-memory TLS link: writes reach the other session at the next
    loop turn, unless the link is black-holed (they vanish, as on a path with a stale MAC)."""

    def __init__(self) -> None:
        super().__init__()
        self.to: HboneSession | None = None
        self.black_holed = False

    def write(self, data) -> None:
        if not self.black_holed and self.to is not None:
            asyncio.get_running_loop().call_soon(self.to.data_received, bytes(data))


async def _linked_pair() -> tuple[HboneSession, HboneSession, Link]:
    """A client and a server session joined by two links; the server never answers a
    CONNECT (busy with other work). Returns the client's outgoing link too."""
    client = HboneSession(client_side=True, idle_timeout=0)
    server = HboneSession(client_side=False, idle_timeout=0, on_request=lambda session, request: None)
    up, down = Link(), Link()
    up.to, down.to = server, client
    client.connection_made(up)
    server.connection_made(down)
    for _ in range(5):
        await asyncio.sleep(0)                # SETTINGS both ways
    return client, server, up


def _open(client: HboneSession) -> StreamPeer:
    peer = StreamPeer(ConnectionRecord("source", "10.0.0.1", 1, "10.0.0.2", 80), on_finished=lambda r: None,
                      tcp_is_client=True)
    peer.response = asyncio.get_running_loop().create_future()
    client.open_stream(peer, "10.0.0.2", 80, "10.0.0.1", framing.new_traceparent())
    return peer


async def test_the_peers_ping_ack_is_progress():
    client, _, _ = await _linked_pair()
    before = client.last_progress
    client.probe()
    client.probe()                            # one PING at a time
    for _ in range(5):
        await asyncio.sleep(0)
    assert client.last_progress > before
    assert not client._probing


async def test_a_peer_that_reads_but_does_not_answer_is_waited_for_until_the_limit():
    client, _, _ = await _linked_pair()
    peer = _open(client)
    began = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await await_answer(client, peer.response, quiet=0.2, limit=0.8)
    assert time.monotonic() - began >= 0.75, "alive (its PING ACKs came back): waited past the quiet time"


async def test_a_black_holed_path_is_given_up_on_after_the_quiet_time():
    client, _, up = await _linked_pair()
    up.black_holed = True
    peer = _open(client)
    began = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await await_answer(client, peer.response, quiet=0.2, limit=5.0)
    assert time.monotonic() - began < 1.5, "no ACK came back: given up on at the quiet time"

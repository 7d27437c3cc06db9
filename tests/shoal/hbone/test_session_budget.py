"""The HBONE driver's per-turn budget (issue 18): a read holding more frames than one
turn's budget is parsed a slice per event-loop turn, with reading paused meanwhile, so
another connection is served between the slices; an abuser is cut off (GOAWAY
ENHANCE_YOUR_CALM, then the socket aborted), counted, and logged a line at a time."""
from __future__ import annotations

import asyncio
import logging

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest

from shoal.hbone import framing
from shoal.hbone.session import HboneSession
from shoal.perf.rrmicro import StandInTransport, _into
from shoal.ratelog import LogLimiter

pytestmark = pytest.mark.timeout(20)

PER_TURN = framing.READ_BUDGET // framing.H2_FRAME_COST


class Peer:
    """A raw h2 client against a serving session on a stand-in TLS transport."""

    def __init__(self, rejected: list[str] | None = None, limiter=None):
        self.tls = StandInTransport()
        self.session = HboneSession(client_side=False, idle_timeout=0,
                                    on_rejected=(rejected.append if rejected is not None else None),
                                    log_limiter=limiter)
        self.session.connection_made(self.tls)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.send(self.h2.data_to_send())
        self.events: list = []
        self.answers()

    def send(self, data: bytes) -> None:
        _into(self.session, data)   # one read, however many frames it holds

    def answers(self) -> list:
        data = self.tls.take()
        events = self.h2.receive_data(data) if data else []
        self.events += events
        return events

    def acks(self) -> int:
        return sum(isinstance(e, h2.events.PingAckReceived) for e in self.answers())


def pings(count: int, first: int = 0) -> bytes:
    return b"".join(hyperframe.frame.PingFrame(0, opaque_data=(first + i).to_bytes(8, "big")).serialize()
                    for i in range(count))


async def turn() -> None:
    await asyncio.sleep(0)


async def test_a_read_past_the_budget_pauses_reading_and_is_parsed_over_the_next_turns():
    peer = Peer()
    peer.send(pings(90))   # under the PING burst: only more frames than one turn's budget
    assert peer.acks() == PER_TURN and not peer.tls.reading
    answered, turns = PER_TURN, 0
    while not peer.tls.reading:
        await turn()
        turns += 1
        answered += peer.acks()
    assert answered == 90 and turns == -(-90 // PER_TURN) - 1
    assert not peer.session.closed and not peer.tls.aborted


async def test_another_connection_is_served_between_the_turns_of_a_flooding_one():
    flooder, other = Peer(), Peer()
    flooder.send(pings(20000))
    assert flooder.acks() == PER_TURN
    other.send(pings(1))   # arrives while the flood waits in the flooder's buffer
    assert other.acks() == 1
    await turn()
    assert flooder.acks() == PER_TURN   # one slice per turn, not the rest of the read at once


async def test_each_flooding_peer_is_cut_off_and_counted():
    rejected: list[str] = []
    peers = [Peer(rejected) for _ in range(5)]
    for peer in peers:
        peer.send(pings(20000))
    for _ in range(10):
        await turn()
    assert rejected == ["ping_flood"] * 5   # each one counted
    for peer in peers:
        peer.answers()
        goaway = [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [g.error_code for g in goaway] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
        acked = sum(isinstance(e, h2.events.PingAckReceived) for e in peer.events)
        assert acked < 2 * framing.LIMITS["ping"].burst   # the burst and its refill, not 20,000
        assert peer.session.closed and peer.tls.aborted   # no graceful TLS close reading on


async def test_sessions_sharing_a_limiter_log_one_line_per_reason_per_period(caplog):
    limiter = LogLimiter(period=3600)
    peers = [Peer(limiter=limiter) for _ in range(5)]
    with caplog.at_level(logging.WARNING, logger="shoal.hbone.session"):
        for peer in peers:
            peer.send(pings(20000))
        for _ in range(10):
            await turn()
    assert all(peer.session.closed for peer in peers)
    assert len([r for r in caplog.records if "ping budget exhausted" in r.getMessage()]) == 1


async def test_after_the_cut_nothing_the_abuser_sends_is_parsed():
    peer = Peer()
    peer.send(pings(20000))
    for _ in range(5):
        await turn()
    assert peer.session.closed
    peer.answers()
    peer.send(pings(20000))
    assert peer.acks() == 0 and peer.session.reads.unparsed().nbytes == 0


async def test_a_connect_whose_reset_waits_in_the_rest_of_the_read_is_never_dialled():
    dialled: list[int] = []
    tasks: list[asyncio.Task] = []

    async def dial(stream_id: int) -> None:
        dialled.append(stream_id)   # the first step of a serving task: where it would connect upstream
        await asyncio.sleep(3600)

    def on_request(session: HboneSession, request: framing.TunnelRequested) -> asyncio.Task:
        tasks.append(asyncio.ensure_future(dial(request.stream_id)))
        return tasks[-1]

    tls = StandInTransport()
    session = HboneSession(client_side=False, idle_timeout=0, on_request=on_request)
    session.connection_made(tls)
    attacker = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    attacker.initiate_connection()
    _into(session, attacker.data_to_send())
    attacker.ping(bytes(8))   # one frame ahead: every slice boundary falls between a CONNECT and its RST
    for stream_id in range(1, 2 * 3 * PER_TURN, 2):
        attacker.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        attacker.reset_stream(stream_id)
    _into(session, attacker.data_to_send())
    for _ in range(10):
        await turn()
    # Only the pairs a slice boundary split reach the driver (the others never do: framing)
    assert tls.reading and 0 < len(tasks) < 3 * PER_TURN
    assert dialled == [] and all(task.cancelled() for task in tasks)

"""Outbound's wait for a stream's answer: a busy peer is waited for, a stuck one is not."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from shoal.agent.ztunnel.outbound import answer_deadline, await_answer


def test_answer_deadline_follows_the_peers_answers_up_to_the_limit():
    # Nothing answered since the stream opened: quiet seconds after opening.
    assert answer_deadline(opened=100.0, last_progress=90.0, quiet=5.0, limit=30.0) == 105.0
    # The peer answered another stream at 108: still alive, wait on.
    assert answer_deadline(opened=100.0, last_progress=108.0, quiet=5.0, limit=30.0) == 113.0
    # However busy, never past the limit.
    assert answer_deadline(opened=100.0, last_progress=128.0, quiet=5.0, limit=30.0) == 130.0
    # A PING sent late (our own loop stalled until 107) gets half the quiet time for its ACK.
    assert answer_deadline(opened=100.0, last_progress=90.0, quiet=5.0, limit=30.0, probed=107.0) == 109.5


async def test_a_busy_peer_is_waited_for_past_the_quiet_time():
    session = SimpleNamespace(last_progress=time.monotonic(), probe=lambda: None)
    response = asyncio.get_running_loop().create_future()

    async def busy_peer():  # answers other streams every 50 ms, ours after 1.2 s
        for _ in range(24):
            await asyncio.sleep(0.05)
            session.last_progress = time.monotonic()
        response.set_result(200)

    # A quiet time many times the peer's 50 ms: its progress must not look like silence
    # because our loop ran its timer late (a loaded machine; 0.15 s was within reach).
    answering = asyncio.ensure_future(busy_peer())
    assert await await_answer(session, response, quiet=0.5, limit=5.0) == 200
    await answering


async def test_a_peer_that_answers_nothing_times_out_after_the_quiet_time():
    session = SimpleNamespace(last_progress=time.monotonic() - 60, probe=lambda: None)
    response = asyncio.get_running_loop().create_future()
    began = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await await_answer(session, response, quiet=0.2, limit=5.0)
    assert 0.15 <= time.monotonic() - began < 2.0
    assert not response.done()   # shielded: the caller resets the stream itself


async def test_a_peer_answering_only_others_times_out_at_the_limit():
    session = SimpleNamespace(last_progress=time.monotonic(), probe=lambda: None)
    response = asyncio.get_running_loop().create_future()

    async def answers_others():
        while True:
            await asyncio.sleep(0.05)
            session.last_progress = time.monotonic()

    chatter = asyncio.ensure_future(answers_others())
    began = time.monotonic()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await await_answer(session, response, quiet=0.2, limit=0.6)
    finally:
        chatter.cancel()
    assert 0.55 <= time.monotonic() - began < 3.0


class ProbedPeer:
    """A session whose peer answers no CONNECT but acknowledges each liveness PING
    ``ack_after`` seconds after it was sent (None: never, a black-holed path)."""

    def __init__(self, ack_after: float | None) -> None:
        self.last_progress = time.monotonic()
        self.ack_after = ack_after
        self.probes = 0
        self._outstanding = False

    def probe(self) -> None:
        if self._outstanding:
            return
        self._outstanding = True
        self.probes += 1
        if self.ack_after is not None:
            asyncio.get_running_loop().call_later(self.ack_after, self._ack)

    def _ack(self) -> None:
        self._outstanding = False
        self.last_progress = time.monotonic()


async def test_a_peer_that_acknowledges_pings_is_waited_for_until_it_answers():
    # Busy tearing down tunnels: no answer to anyone for 6 quiet times, but PINGs come back.
    # (A quiet time ten times the ACK's 50 ms, so a late timer of ours is not the peer's silence.)
    session = ProbedPeer(ack_after=0.05)
    response = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(3.0, response.set_result, 200)
    assert await await_answer(session, response, quiet=0.5, limit=5.0) == 200
    assert session.probes >= 3   # it kept asking, once per half quiet time


async def test_a_black_holed_peer_is_probed_once_and_given_up_on_after_the_quiet_time():
    session = ProbedPeer(ack_after=None)
    response = asyncio.get_running_loop().create_future()
    began = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await await_answer(session, response, quiet=0.2, limit=5.0)
    assert 0.15 <= time.monotonic() - began < 2.0
    assert session.probes == 1


async def test_a_peer_too_slow_to_acknowledge_within_the_quiet_time_is_given_up_on():
    session = ProbedPeer(ack_after=0.5)
    response = asyncio.get_running_loop().create_future()
    with pytest.raises(asyncio.TimeoutError):
        await await_answer(session, response, quiet=0.2, limit=5.0)


async def test_a_sender_whose_own_loop_stalled_past_the_deadline_still_lets_the_peer_acknowledge():
    # Our loop is blocked for 2.5 quiet times right after the stream opens (a burst of
    # accepts on a loaded node): the PING leaves late, and its ACK must still count.
    session = ProbedPeer(ack_after=0.05)
    loop = asyncio.get_running_loop()
    response = loop.create_future()
    loop.call_later(0.01, time.sleep, 0.5)
    loop.call_later(0.8, response.set_result, 200)
    assert await await_answer(session, response, quiet=0.2, limit=5.0) == 200

"""The supervisor's end of a worker's feed (``supervisor.WorkerFeed``) over a real socketpair:
frames arrive whole and in order, and a worker that reads nothing is not buffered for
without bound (it is declared stuck once its unread backlog passes the limit)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from shoal.agent.ztunnel import feed, supervisor

pytestmark = pytest.mark.timeout(30)


async def test_frames_arrive_in_order_and_a_worker_that_reads_nothing_is_stuck(monkeypatch):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck = []
    worker_feed = supervisor.WorkerFeed(ours, on_stuck=lambda: stuck.append(True))
    await worker_feed.open()
    try:
        messages = [feed.SvidPending(f"spiffe://cluster.local/ns/demo/sa/s{i}") for i in range(100)]
        for message in messages:
            worker_feed.send(message)
        theirs.setblocking(False)
        decoder, got = feed.FeedDecoder(), []
        loop = asyncio.get_running_loop()
        while len(got) < len(messages):
            got += decoder.feed(await loop.sock_recv(theirs, 65536))
        assert got == messages and stuck == []

        monkeypatch.setattr(supervisor, "FEED_BACKLOG", 1 << 20)
        big = feed.SvidGrant("spiffe://cluster.local/ns/demo/sa/web", b"c" * 65536, b"k", b"r", 0.0, 1.0)
        for _ in range(200):   # ~13 MB that nobody reads
            worker_feed.send(big)
            if stuck:
                break
        assert stuck == [True]
        worker_feed.send(big)   # once stuck, nothing more is queued
        assert stuck == [True]
    finally:
        worker_feed.close()
        theirs.close()

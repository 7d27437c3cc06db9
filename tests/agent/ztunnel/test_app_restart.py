"""Graceful restart (issue 11 item 6): established connections survive the handover for
the grace period, new ones are never refused, and the old proxy reports what it drained."""
from __future__ import annotations

import asyncio
import logging

import pytest

from tests.agent.ztunnel.proxybed import SERVER_IP
from tests.agent.ztunnel.test_proxy import APP_PORT, Harness, _make_app, metric, running_proxy

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]
LIVE = 50
# Far longer than the test's four rounds of pings and new connections, which took more than
# 6 s (the grace this was) on a loaded machine: the drain then cut live connections. The
# drain ends as soon as they all do, so a long grace costs nothing when the test passes.
GRACE = 30.0


async def _ping_all(live: list, tag: bytes) -> list:
    """One echo exchange on every held connection; the ones that failed."""
    async def one(i, reader, writer):
        try:
            writer.write(tag + b"%03d" % i)
            data = await asyncio.wait_for(reader.readexactly(len(tag) + 3), 5)
            return None if data == tag + b"%03d" % i else data
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            return f"{i}: {exc!r}"
    results = await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(live)))
    return [r for r in results if r is not None]


async def _stopped_accepting(app) -> None:
    while any(pod.describe()["listening"] for pod in app.pods.pods.values()):
        await asyncio.sleep(0.05)


async def test_restart_keeps_50_live_connections_through_the_grace_period(pod_netns, state, ca, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, drain_grace=GRACE) as (h, synced):
        old = h.app
        live = [await h.connect_via_proxy(SERVER_IP, APP_PORT) for _ in range(LIVE)]
        assert await _ping_all(live, b"before") == []
        synced.clear()
        new = await _make_app(tmp_path, state, ca.sign, h.origdst, drain_grace=GRACE)  # the successor...
        try:
            retiring = asyncio.ensure_future(old.retire())                            # ...and the retiring one
            await asyncio.wait_for(synced.wait(), 20)
            # Until the retiring proxy sees its successor ready it still accepts (both listen on
            # the pod's ports: nothing is refused meanwhile). A connection it took in that window is
            # one it must also carry (it showed up as 101 of 101 under load), so the new connections
            # below, meant for the successor, start once the old one stopped accepting.
            await asyncio.wait_for(_stopped_accepting(old), 20)
            h_new = Harness(h.netns, new, h.origdst, h.echo)
            lost, refused = [], []
            for second in range(4):  # well inside the grace
                lost += await _ping_all(live, b"during%d" % second)
                for _ in range(10):  # new connections meanwhile: to the successor, none refused
                    try:
                        if await h_new.echo_roundtrip() != b"hello":
                            refused.append("bad echo")
                    except (OSError, asyncio.TimeoutError) as exc:
                        refused.append(repr(exc))
                await asyncio.sleep(0.5)
            assert lost == [] and refused == []
            assert not retiring.done()  # still serving them: the grace is not cut short
            # The drain said GOAWAY (graceful) once its zero stream limit was acknowledged: the
            # old proxy's own pooled connections (its client side) got it and, as HTTP/2 says,
            # carried every stream up to its last-stream-id on (before: all 50 were reset).
            carrying = [session for sessions in old.ctx.pool._sessions.values() for session in sessions
                        if session.streams]
            assert carrying and all(session.h2.peer_going_away for session in carrying)
            for _, writer in live:
                writer.close()
            await asyncio.wait_for(retiring, GRACE / 2)  # all ended: the drain finishes early
        finally:
            await new.stop()
    # Both ends of each connection were on the old proxy: two proxied legs per connection.
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain: carried")]
    assert report and report[-1].startswith(f"drain: carried {2 * LIVE} of {2 * LIVE} connections"), report
    assert metric(old, "shoal_proxy_drained_connections_total", outcome="completed") == 2 * LIVE
    assert metric(old, "shoal_proxy_drained_connections_total", outcome="cut") == 0


async def test_grace_deadline_cuts_what_is_left_and_says_so(pod_netns, state, ca, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_proxy(pod_netns, state, ca.sign, tmp_path, drain_grace=1.0) as (h, _):
        live = [await h.connect_via_proxy(SERVER_IP, APP_PORT) for _ in range(3)]
        assert await _ping_all(live, b"x") == []
        await asyncio.wait_for(h.app.retire(), 10)  # no successor: a plain graceful stop
        assert metric(h.app, "shoal_proxy_drained_connections_total", outcome="cut") == 6
        report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain: carried")]
        assert report == ["drain: carried 0 of 6 connections to their end in " + report[0].split(" in ")[1]]
        assert "6 cut at the 1s grace deadline" in report[0]

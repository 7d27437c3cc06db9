"""The outbound HBONE pool under concurrency, without sockets: sessions are stand-ins
that keep the same room contract as HboneSession (own stream count against a limit)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shoal.hbone.pool import HbonePool, PoolKey

pytestmark = pytest.mark.timeout(20)
KEY = PoolKey("spiffe://a", "spiffe://b", "10.0.0.2", 15008)


class FakeSession:
    def __init__(self, limit: int = 100):
        self.limit, self.streams, self.closed, self.draining = limit, {}, False, False
        self.on_room, self._had_room = None, False
        self.room_checks = 0

    @property
    def has_room(self) -> bool:
        self.room_checks += 1
        return not self.closed and not self.draining and len(self.streams) < self.limit

    def report_room(self) -> None:
        if self.on_room is not None and self.has_room != self._had_room:
            self._had_room = not self._had_room
            self.on_room(self)

    def open_stream(self) -> int:
        stream_id = len(self.streams) * 2 + 1
        self.streams[stream_id] = object()
        self.report_room()
        return stream_id

    def stream_done(self, stream_id: int) -> None:
        self.streams.pop(stream_id)
        self.report_room()

    def close(self) -> None:
        self.closed = True
        self.report_room()


class Dialer:
    def __init__(self, limit: int = 100):
        self.limit, self.dials, self.sessions = limit, 0, []
        self.gate = asyncio.Event()

    async def __call__(self, key):
        self.dials += 1
        await self.gate.wait()
        session = FakeSession(self.limit)
        self.sessions.append(session)
        return session


async def _take(pool: HbonePool, dial) -> FakeSession:
    session = await pool.session(KEY, dial)
    session.open_stream()  # before any await, as outbound._tunnel does
    return session


async def test_a_caller_arriving_as_a_dial_completes_does_not_spin():
    # The livelock of issue 18: a dial done but not yet registered, and a caller that
    # awaited the finished future in a loop without ever yielding (100 % CPU, forever).
    pool, dial = HbonePool(), Dialer()
    first = asyncio.ensure_future(_take(pool, dial))
    await asyncio.sleep(0)
    dial.gate.set()                                   # the dial's last step runs next...
    late = asyncio.ensure_future(_take(pool, dial))   # ...and this caller right after it
    sessions = await asyncio.wait_for(asyncio.gather(first, late), 5)
    assert sessions[0] is sessions[1] and dial.dials == 1


async def test_a_burst_dials_one_connection_per_100_streams_at_once():
    pool, dial = HbonePool(), Dialer()
    takers = [asyncio.ensure_future(_take(pool, dial)) for _ in range(1000)]
    await asyncio.sleep(0.01)
    assert dial.dials == 10          # all started together, not one after another
    dial.gate.set()
    sessions = await asyncio.wait_for(asyncio.gather(*takers), 5)
    assert len(pool) == 10 and all(len(s.streams) == 100 for s in dial.sessions)
    assert len(set(map(id, sessions))) == 10


async def test_lookup_cost_does_not_grow_with_the_pool():
    pool, dial = HbonePool(), Dialer()
    dial.gate.set()
    await asyncio.gather(*(_take(pool, dial) for _ in range(5000)))  # 50 full connections
    for session in dial.sessions:
        session.room_checks = 0
    last = dial.sessions[-1]
    last.stream_done(next(iter(last.streams)))       # one slot frees up somewhere
    assert await _take(pool, dial) is last
    assert sum(s.room_checks for s in dial.sessions) <= 4  # no scan over the 50 sessions
    assert dial.dials == 50


async def test_peer_limit_below_100_opens_more_connections():
    pool, dial = HbonePool(), Dialer(limit=10)
    dial.gate.set()
    await asyncio.gather(*(_take(pool, dial) for _ in range(35)))
    assert len(pool) == 4 and sorted(len(s.streams) for s in dial.sessions) == [5, 10, 10, 10]


async def test_closed_and_draining_sessions_leave_the_room_set():
    pool, dial = HbonePool(), Dialer()
    dial.gate.set()
    first = await _take(pool, dial)
    first.draining = True
    first.report_room()
    second = await _take(pool, dial)
    assert second is not first and dial.dials == 2
    second.close()
    pool.discard(second)
    assert len(pool) == 1
    assert await _take(pool, dial) not in (first, second)


async def test_a_failed_dial_reaches_every_waiter_and_is_not_retried_in_a_loop():
    pool = HbonePool()
    attempts = 0

    async def failing(key):
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        raise ConnectionRefusedError("no")

    results = await asyncio.gather(*(pool.session(KEY, failing) for _ in range(150)), return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    assert attempts == 2 and len(pool) == 0


def test_the_session_driver_does_not_import_the_pool():
    """The pool drives sessions and keeps its own keys: session.py names nothing of it,
    not even for type checking (the import cycle pool -> session -> pool is gone)."""
    import ast

    import shoal.hbone.session as session_module
    tree = ast.parse((Path(session_module.__file__).parent / "session.py").read_text())   # also when compiled
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name and name.startswith("shoal.hbone.pool") for name in imported), imported


def test_a_discarded_session_leaves_no_key_behind():
    """The pool's own table of keys empties with its sessions (no growth per connection)."""
    async def scenario():
        pool = HbonePool()
        sessions = [FakeSession() for _ in range(3)]
        made = iter(sessions)

        async def dial(key):
            await asyncio.sleep(0)
            return next(made)

        for n, _ in enumerate(sessions):
            got = await pool.session(KEY._replace(dst_port=n), dial)
            got.open_stream()
        assert len(pool) == 3 and len(pool._keys) == 3
        for session in sessions:
            session.closed = True
            pool.discard(session)
            pool.discard(session)   # twice: a no-op
        assert len(pool) == 0 and not pool._keys and not pool.sessions()
    asyncio.run(scenario())

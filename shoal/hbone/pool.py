"""Outbound HBONE connection pool, keyed by (source identity, destination identity,
destination address).

Many streams share one connection, up to ``min(peer's MAX_CONCURRENT_STREAMS, 100)``
(ztunnel's cap); beyond it the pool opens more connections. Idle ones close themselves
(HboneSession).

Why it is shaped like this (issue 18): the first pool scanned every session's h2 stream
table on each lookup and could spin without yielding on a dial that had completed but
not yet been registered, which took a node's proxy to 100 % CPU at 1,000 concurrent
connections. Now:

- a lookup is O(1): each key keeps an insertion-ordered set of the sessions that have
  room, which the sessions update themselves as streams open and end;
- every wait yields: a waiter only ever awaits a dial that is still running, and a
  dial registers its session before it completes;
- a burst of N waiters starts ceil(N / 100) dials, not one dial per waiter nor one
  at a time.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, NamedTuple

from shoal.hbone.framing import MAX_STREAMS
from shoal.hbone.session import HboneSession


class PoolKey(NamedTuple):
    src_identity: str
    dst_identity: str
    dst_ip: str
    dst_port: int


Dialer = Callable[[PoolKey], Awaitable[HboneSession]]


class _Dial:
    """A connection being opened, and how many waiters counted on its streams."""
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.waiters = 0


class HbonePool:
    def __init__(self, on_change: Callable[[int], None] | None = None, streams_per_connection: int = MAX_STREAMS):
        self._sessions: dict[PoolKey, set[HboneSession]] = {}
        self._with_room: dict[PoolKey, dict[HboneSession, None]] = {}  # ordered set
        self._dialing: dict[PoolKey, _Dial] = {}  # the newest dial still running, per key
        # Each pooled session's key: the pool's own table, so a session knows nothing of
        # the pool (no import back from session.py) and a discard is still O(1).
        self._keys: dict[HboneSession, PoolKey] = {}
        self._count = 0
        self._streams_per_connection = streams_per_connection
        self._on_change = on_change or (lambda count: None)

    def __len__(self) -> int:
        return self._count

    async def session(self, key: PoolKey, dial: Dialer) -> HboneSession:
        """A connection with room for one more stream. Open the stream before awaiting
        anything else, so the room seen here is still there."""
        while True:
            room = self._with_room.get(key)
            if room:
                return next(iter(room))
            pending = self._dialing.get(key)
            if pending is None or pending.waiters >= self._streams_per_connection:
                pending = _Dial(asyncio.ensure_future(self._dial(key, dial)))
                # Retrieved even when every waiter was cancelled: no "never retrieved".
                pending.task.add_done_callback(lambda task: task.cancelled() or task.exception())
                self._dialing[key] = pending
            pending.waiters += 1
            # Never done here (a finished dial leaves _dialing in its last step), so
            # this always yields; a dial error reaches every waiter.
            session = await asyncio.shield(pending.task)
            if session.has_room:
                return session

    async def _dial(self, key: PoolKey, dial: Dialer) -> HboneSession:
        try:
            session = await dial(key)
        finally:
            if self._dialing.get(key) is not None and self._dialing[key].task is asyncio.current_task():
                del self._dialing[key]
        if not session.closed:
            self._keys[session] = key
            self._sessions.setdefault(key, set()).add(session)
            self._count += 1
            session.on_room = lambda s, key=key: self._room_changed(key, s)
            session.report_room()
            self._on_change(self._count)
        return session

    def _room_changed(self, key: PoolKey, session: HboneSession) -> None:
        room = self._with_room.get(key)
        if session.has_room:
            if room is None:
                room = self._with_room[key] = {}
            room[session] = None
        elif room is not None:
            room.pop(session, None)
            if not room:
                del self._with_room[key]

    def discard(self, session: HboneSession) -> None:
        """A session closed (its on_closed): forget it. O(1) by its own key."""
        key = self._keys.pop(session, None)
        if key is None:
            return   # never pooled, or forgotten already
        sessions = self._sessions[key]
        sessions.discard(session)
        if not sessions:
            del self._sessions[key]
        room = self._with_room.get(key)
        if room is not None:
            room.pop(session, None)
            if not room:
                del self._with_room[key]
        self._count -= 1
        self._on_change(self._count)

    def sessions(self) -> list[HboneSession]:
        """Every pooled connection."""
        return [session for sessions in self._sessions.values() for session in sessions]

    def close_all(self) -> None:
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                session.close()

    def describe(self) -> list[dict]:
        return [{"src": k.src_identity, "dst": k.dst_identity, "address": f"{k.dst_ip}:{k.dst_port}",
                 "streams": len(s.streams)} for k, ss in self._sessions.items() for s in ss]

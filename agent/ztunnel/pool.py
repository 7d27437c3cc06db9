"""Outbound HBONE connection pool, keyed by (source identity, destination identity,
destination address). Many streams share one connection (up to the peer's limit); a
full connection makes the pool open another; idle ones close themselves (HboneSession)."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, NamedTuple

from shoal.agent.ztunnel.tunnel import HboneSession


class PoolKey(NamedTuple):
    src_identity: str
    dst_identity: str
    dst_ip: str
    dst_port: int


Dialer = Callable[[PoolKey], Awaitable[HboneSession]]


class HbonePool:
    def __init__(self, on_change: Callable[[int], None] | None = None):
        self._sessions: dict[PoolKey, list[HboneSession]] = {}
        self._dialing: dict[PoolKey, asyncio.Future] = {}
        self._on_change = on_change or (lambda count: None)

    def __len__(self) -> int:
        return sum(len(v) for v in self._sessions.values())

    async def session(self, key: PoolKey, dial: Dialer) -> HboneSession:
        """A connection with room for one more stream. Open the stream before awaiting
        anything else, so the capacity seen here is still there."""
        while True:
            for session in self._sessions.get(key, ()):
                if session.usable:
                    return session
            pending = self._dialing.get(key)
            if pending is None:
                pending = asyncio.ensure_future(dial(key))
                self._dialing[key] = pending
                pending.add_done_callback(lambda fut, key=key: self._dialed(key, fut))
            await asyncio.shield(pending)  # a dial error propagates to every waiter

    def _dialed(self, key: PoolKey, fut: asyncio.Future) -> None:
        self._dialing.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            session = fut.result()
            if not session.closed:
                self._sessions.setdefault(key, []).append(session)
                self._on_change(len(self))

    def discard(self, session: HboneSession) -> None:
        for key, sessions in list(self._sessions.items()):
            if session in sessions:
                sessions.remove(session)
                if not sessions:
                    del self._sessions[key]
        self._on_change(len(self))

    def close_all(self) -> None:
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                session.close()

    def describe(self) -> list[dict]:
        return [{"src": k.src_identity, "dst": k.dst_identity, "address": f"{k.dst_ip}:{k.dst_port}",
                 "streams": len(s.streams)} for k, ss in self._sessions.items() for s in ss]

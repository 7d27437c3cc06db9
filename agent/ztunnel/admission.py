"""Admission control: what keeps the node proxy answering under load and abuse (issue 18).

- :class:`Admission`: a proxy-wide cap on connections being set up and on live
  connections. Past either, a NEW connection is refused at once (TCP RST, counted as
  ``shoal_proxy_rejected_total{reason="overloaded"}``, logged at most once a second),
  so established connections keep their share of the single event loop and the proxy
  never goes silent.
- :class:`DialLimits`: a cap on concurrent upstream dials per peer identity, so one
  HBONE peer (say, one replaying Rapid Reset) cannot hold every dial of the node.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from typing import AsyncIterator, Callable

log = logging.getLogger(__name__)


FD_RESERVE = 512  # listeners, HBONE connections, pod namespaces, logs, the agent link


def raise_open_file_limit() -> int:
    """Lift the soft open-file limit to the hard one (10,000 connections need ~20,000
    sockets); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays %d: %s", soft, exc)
    return soft


def default_max_connections() -> int:
    """Live connections the fd limit allows: each proxied leg holds one socket (the
    app's accepted one, or the upstream one; HBONE connections are shared and in the
    reserve), and connections in setup count too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, soft - FD_RESERVE)


class Admission:
    """Counts connections in setup; says whether a new one may be accepted."""

    def __init__(self, max_in_setup: int, max_live: int, live: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic):
        self.max_in_setup = max_in_setup
        self.max_live = max_live
        self._live = live
        self._clock = clock
        self.in_setup = 0
        self.shed = 0
        self._last_log = float("-inf")

    def admit(self) -> str | None:
        """None to accept, else why not (``in_setup`` or ``live``)."""
        if self.in_setup >= self.max_in_setup:
            why = "in_setup"
        elif self._live() + self.in_setup >= self.max_live:
            why = "live"
        else:
            return None
        self.shed += 1
        now = self._clock()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.warning("overloaded: refusing new connections (%d in setup, max %d; %d live, max %d; %d refused "
                        "so far)", self.in_setup, self.max_in_setup, self._live(), self.max_live, self.shed)
        return why


class DialLimits:
    """At most ``per_identity`` upstream dials at once per peer identity; the rest queue
    (a queued dial whose stream is reset is cancelled before it starts)."""

    def __init__(self, per_identity: int):
        self.per_identity = per_identity
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}   # holding or waiting for a slot
        self._active: dict[str, int] = {}  # holding one

    @contextlib.asynccontextmanager
    async def slot(self, identity: str | None) -> AsyncIterator[None]:
        key = identity or ""
        semaphore = self._slots.get(key)
        if semaphore is None:
            semaphore = self._slots[key] = asyncio.Semaphore(self.per_identity)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with semaphore:
                self._active[key] = self._active.get(key, 0) + 1
                try:
                    yield
                finally:
                    self._active[key] -= 1
                    if not self._active[key]:
                        del self._active[key]
        finally:
            self._users[key] -= 1
            if not self._users[key]:  # no module-lifetime growth: one entry per active peer
                del self._users[key]
                del self._slots[key]

    def active(self, identity: str | None) -> int:
        return self._active.get(identity or "", 0)

"""Admission control: what keeps the node proxy answering under load and abuse (issue 18).

- :class:`Admission`: two caps, two answers.
  - Connections being set up (accepted, not wired yet): past ``max_in_setup`` the
    listeners stop accepting (Envoy's ``stop_accepting_connections``) until the setups
    in flight fall to three quarters of it. A burst then waits in the kernel's accept
    queue (its handshake already done) instead of being refused: every setup is bounded
    by the connect and handshake timeouts, so the pause always ends. Counted as
    ``shoal_proxy_accept_paused_total``. (Refusing here made a 10,000-connection burst
    lose 1,408 connections that a moment later would have gone through.)
  - Live connections (the open-file budget): past ``max_live`` a NEW connection is
    refused at once (TCP RST, counted as ``shoal_proxy_rejected_total{reason="overloaded"}``,
    logged at most once a second): true overload, a socket more would starve the
    established ones, which keep being served; the proxy never goes silent.
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
    """Counts connections in setup per listener kind; says whether a new one may be
    accepted now. The setup cap is per kind (outbound, plaintext, hbone) so a burst on one
    never stops another: outbound setups wait for HBONE handshakes on 15008, which must
    go on being accepted (same-node traffic crosses this very proxy's 15008)."""

    def __init__(self, max_in_setup: int, max_live: int, live: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic):
        self.max_in_setup = max_in_setup
        self.resume_below = max(1, max_in_setup * 3 // 4)
        self.max_live = max_live
        self._live = live
        self._clock = clock
        self._in_setup: dict[str, int] = {}
        self.shed = 0
        self.pauses = 0
        self._waiting: dict[str, list[Callable[[], None]]] = {}  # listeners paused until setups drain
        self._last_log = {"pause": float("-inf"), "shed": float("-inf")}

    @property
    def in_setup(self) -> int:
        """Connections in setup, every kind together."""
        return sum(self._in_setup.values())

    def full(self, kind: str) -> bool:
        """Setups of this kind at the cap: accept nothing more of it for now (between
        the cap and the resume mark, a paused kind stays paused)."""
        count = self._in_setup.get(kind, 0)
        return count >= self.max_in_setup or kind in self._waiting and count >= self.resume_below

    def wait_for_room(self, kind: str, resume: Callable[[], None]) -> None:
        """A listener stops accepting; ``resume`` is called once its kind's setups have drained."""
        self.pauses += 1
        self._waiting.setdefault(kind, []).append(resume)
        if self._should_log("pause"):
            log.warning("busy: %d %s connections in setup (max %d): their listeners pause accepting until %d; "
                        "new connections wait in the kernel's accept queue (%d pauses so far)",
                        self._in_setup.get(kind, 0), kind, self.max_in_setup, self.resume_below, self.pauses)

    def setup_started(self, kind: str) -> None:
        self._in_setup[kind] = self._in_setup.get(kind, 0) + 1

    def setup_done(self, kind: str) -> None:
        count = self._in_setup[kind] - 1
        if count:
            self._in_setup[kind] = count
        else:
            del self._in_setup[kind]
        if kind in self._waiting and count < self.resume_below:
            for resume in self._waiting.pop(kind):
                resume()

    def admit(self) -> str | None:
        """For a connection just accepted: None to set it up, else why it must be refused
        (``live``: the open-file budget is spent)."""
        if self._live() + self.in_setup < self.max_live:
            return None
        self.shed += 1
        if self._should_log("shed"):
            log.warning("overloaded: refusing new connections (%d live + %d in setup, max %d; %d refused so far)",
                        self._live(), self.in_setup, self.max_live, self.shed)
        return "live"

    def _should_log(self, what: str) -> bool:
        now = self._clock()
        if now - self._last_log[what] < 1.0:
            return False
        self._last_log[what] = now
        return True


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

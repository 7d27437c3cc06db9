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
  - Queueing delay (``shedding.py``, CoDel-like, per listener kind): once connections
    have stood waiting longer than a target for an interval and the backlog is not
    draining, those that already waited past the target in the accept queue are reset
    when accepted (``reason="queue_delay"``, logged at most once a second) and setups in
    flight are capped at what the proxy completes within the target, so the connections
    served are ones whose client still waits. A burst that drains is never shed. The
    wait is this proxy's own (:class:`Setup`): what a setup spends waiting on its peer
    (the HBONE handshake and answer, an upstream connect) is left out.
  - Inbound HBONE streams in setup (``STREAM_KIND``): past ``max_streams_in_setup`` a
    NEW stream is reset with REFUSED_STREAM at once (``reason="stream_overloaded"``,
    logged at most once a second), established streams untouched. The peer learns that
    nothing of it was processed and may retry it.
- :class:`DialLimits`: a cap on concurrent upstream dials per peer identity, so one
  HBONE peer (say, one replaying Rapid Reset) cannot hold every dial of the node.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

from shoal.agent.ztunnel.shedding import DelayShedder, ShedPolicy
from shoal.ratelog import LogLimiter

log = logging.getLogger(__name__)


QUEUE_READ_PERIOD = 0.1   # seconds between two reads of a kind's accept-queue lengths
# The "kind" of inbound HBONE streams (CONNECTs on an established 15008 connection):
# counted in setup like a listener's connections, but past their cap refused at once (no
# kernel queue to wait in), with REFUSED_STREAM so the peer knows nothing was done. Not
# shed on delay: that refused 5,061 streams of a 10,000 burst on a machine at load 10,
# and each refusal came straight back as the source's retry.
STREAM_KIND = "hbone_stream"
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


@dataclass
class Setup:
    """One connection (or inbound stream) being set up. Its *own* wait is what the delay
    controller judges: from ``arrived`` (its handshake completed; a stream: its CONNECT was
    read) until its setup ended, less ``peer_wait``, the time spent waiting for another
    party (the HBONE peer's handshake and answer, an upstream's connect). A slow peer is
    the peer's overload, shed by the peer itself and bounded by our timeouts: counted as
    ours, it made a proxy refuse everything after a burst that had only slowed its peer."""
    kind: str
    arrived: float
    peer_wait: float = 0.0
    peer_since: float | None = None   # waiting on a peer now, since then

    def own_wait(self, now: float) -> float:
        return now - self.arrived - self.peer_wait - (now - self.peer_since if self.peer_since is not None else 0.0)


class Admission:
    """Counts connections in setup per listener kind; says whether a new one may be
    accepted now. The setup cap is per kind (outbound, plaintext, hbone) so a burst on one
    never stops another: outbound setups wait for HBONE handshakes on 15008, which must
    go on being accepted (same-node traffic crosses this very proxy's 15008). So is the
    delay controller: a kind whose setups stand in a queue is shed, not the others."""

    def __init__(self, max_in_setup: int, max_live: int, live: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic, shed_policy: ShedPolicy = ShedPolicy(),
                 observe_wait: Callable[[str, float], None] = lambda kind, waited: None,
                 max_streams_in_setup: int | None = None):
        self.max_in_setup = max_in_setup
        self.max_streams_in_setup = max_in_setup if max_streams_in_setup is None else max_streams_in_setup
        self.max_live = max_live
        self._live = live
        self.clock = clock
        self.shed_policy = shed_policy
        self._observe_wait = observe_wait
        self._in_setup: dict[str, int] = {}
        self._with_peer: dict[str, int] = {}      # of those, waiting on a peer now
        self._setups: dict[asyncio.Future, Setup] = {}   # by the task that sets it up
        self.shed = 0
        self.pauses = 0
        self._waiting: dict[str, list[Callable[[], None]]] = {}  # listeners paused until setups drain
        self._queues: dict[str, set[Callable[[], int]]] = {}      # each listener's accept-queue length
        self._queued_cache: dict[str, tuple[float, int]] = {}     # kind -> (read at, connections queued)
        self._shedders: dict[str, DelayShedder] = {}
        self._shed_since_log: dict[str, int] = {}
        self._log_limiter = LogLimiter(clock=clock)

    @property
    def in_setup(self) -> int:
        """Connections in setup, every listener kind together (not inbound streams)."""
        return sum(count for kind, count in self._in_setup.items() if kind != STREAM_KIND)

    def overloaded(self, kind: str) -> bool:
        """Whether this kind is shedding on queueing delay now."""
        shedder = self._shedders.get(kind)
        return shedder is not None and shedder.overloaded

    def setup_cap(self, kind: str) -> int:
        """Setups of this kind doing this proxy's own work (not waiting on a peer) allowed
        now: all of them when calm, throughput x target while it is overloaded."""
        shedder = self._shedders.get(kind)
        return self.max_in_setup if shedder is None else shedder.setup_cap(self.max_in_setup)

    def full(self, kind: str) -> bool:
        """Setups of this kind at a cap: accept nothing more of it for now (between a cap
        and its resume mark, three quarters of it, a paused kind stays paused). Two caps:
        all setups (memory and sockets), and while overloaded those not waiting on a peer
        (a setup waiting for a slow peer's answer costs this proxy nothing meanwhile)."""
        total = self._in_setup.get(kind, 0)
        own = total - self._with_peer.get(kind, 0)
        paused = kind in self._waiting
        return any(count >= cap or paused and count >= max(1, cap * 3 // 4)
                   for count, cap in ((total, self.max_in_setup), (own, self.setup_cap(kind))))

    def wait_for_room(self, kind: str, resume: Callable[[], None]) -> None:
        """A listener stops accepting; ``resume`` is called once its kind's setups have drained."""
        self.pauses += 1
        self._waiting.setdefault(kind, []).append(resume)
        cap = min(self.max_in_setup, self.setup_cap(kind))
        if self._should_log(f"pause {kind}"):
            log.warning("busy: %d %s connections in setup (max %d): their listeners pause accepting until %d; "
                        "new connections wait in the kernel's accept queue (%d pauses so far)",
                        self._in_setup.get(kind, 0), kind, cap, max(1, cap * 3 // 4), self.pauses)

    def add_queue(self, kind: str, queued: Callable[[], int]) -> None:
        """A listener of ``kind``: ``queued`` says how many connections wait in its accept queue."""
        self._queues.setdefault(kind, set()).add(queued)

    def remove_queue(self, kind: str, queued: Callable[[], int]) -> None:
        self._queues.get(kind, set()).discard(queued)

    def backlog(self, kind: str) -> int:
        """Connections of ``kind`` waiting: in setup, and in its listeners' accept queues.
        The queues' lengths (one getsockopt per listener, so per pod) are read at most
        every ``QUEUE_READ_PERIOD``: waits that hover around the target would otherwise ask
        at every setup."""
        now = self.clock()
        read_at, queued = self._queued_cache.get(kind, (float("-inf"), 0))
        if now - read_at >= QUEUE_READ_PERIOD:
            queued = sum(length() for length in self._queues.get(kind, ()))
            self._queued_cache[kind] = (now, queued)
        return self._in_setup.get(kind, 0) + queued

    def admit(self, kind: str = "", age: float = 0.0) -> str | None:
        """For a connection of ``kind`` just accepted after ``age`` seconds in the accept
        queue: None to set it up, else the reason to refuse it: ``overloaded`` (the
        open-file budget is spent) or ``queue_delay`` (it waited too long, see shedding.py)."""
        if self._live() + self.in_setup >= self.max_live:
            self.shed += 1
            if self._should_log("live"):
                log.warning("overloaded: refusing new connections (%d live + %d in setup, max %d; %d refused so far)",
                            self._live(), self.in_setup, self.max_live, self.shed)
            return "overloaded"
        shedder = self._shedders.get(kind)
        if shedder is None or not shedder.should_shed(age):
            return None
        self.shed += 1
        self._shed_since_log[kind] = self._shed_since_log.get(kind, 0) + 1
        if self._should_log(f"delay {kind}"):
            log.warning("overloaded: %s: refused %d connection(s) that waited over %.1f s in the accept queue "
                        "(%d in all; %d in setup, capped at %d)", kind, self._shed_since_log.pop(kind),
                        shedder.policy.target, shedder.shed, self._in_setup.get(kind, 0),
                        self.setup_cap(kind))
        return "queue_delay"

    def admit_stream(self) -> str | None:
        """For an inbound HBONE stream (a CONNECT) just read: None to set it up, else the
        reason to refuse it at once: ``stream_overloaded`` (streams in setup at the cap).
        Refusals are logged at most once a second."""
        count = self._in_setup.get(STREAM_KIND, 0)
        if count < self.max_streams_in_setup:
            return None
        self._note_refusal(STREAM_KIND, f"streams in setup at the cap ({count}, max {self.max_streams_in_setup})")
        return "stream_overloaded"

    def _note_refusal(self, kind: str, why: str) -> None:
        self.shed += 1
        self._shed_since_log[kind] = self._shed_since_log.get(kind, 0) + 1
        if self._should_log(f"refuse {kind}"):
            log.warning("overloaded: %s: refused %d new one(s): %s (%d refused in all)",
                        kind, self._shed_since_log.pop(kind), why, self.shed)

    def setup_started(self, kind: str, age: float = 0.0, task: asyncio.Future | None = None) -> Setup:
        """A connection of ``kind`` goes into setup after ``age`` seconds in the accept
        queue (an inbound stream: 0); ``task`` sets it up (it may say when it waits on a
        peer, :meth:`waiting_on_peer`). Returns the setup, for :meth:`setup_done`."""
        self._in_setup[kind] = self._in_setup.get(kind, 0) + 1
        setup = Setup(kind, self.clock() - age)
        if task is not None:
            self._setups[task] = setup
        return setup

    @contextlib.contextmanager
    def waiting_on_peer(self) -> Iterator[None]:
        """Around what the current setup waits for from another party (a dial, the HBONE
        peer's answer): that time is not this proxy's delay. Outside a tracked setup
        (a test calling a handler directly) it does nothing."""
        setup = self._setups.get(asyncio.current_task())   # type: ignore[arg-type]
        if setup is None or setup.peer_since is not None:
            yield
            return
        setup.peer_since = self.clock()
        self._with_peer[setup.kind] = self._with_peer.get(setup.kind, 0) + 1
        self._resume_if_room(setup.kind)   # one fewer doing our own work
        try:
            yield
        finally:
            setup.peer_wait += self.clock() - setup.peer_since
            setup.peer_since = None
            self._with_peer[setup.kind] -= 1
            if not self._with_peer[setup.kind]:
                del self._with_peer[setup.kind]

    def setup_done(self, kind: str, setup: Setup | None = None, task: asyncio.Future | None = None) -> None:
        """A setup of ``kind`` ended (wired or refused); ``setup`` as setup_started returned it."""
        if task is not None:
            self._setups.pop(task, None)
        count = self._in_setup[kind] - 1
        if count:
            self._in_setup[kind] = count
        else:
            del self._in_setup[kind]
        if setup is not None:
            waited = setup.own_wait(self.clock())
            self._observe_wait(kind, waited)
            if self.shed_policy.enabled and kind != STREAM_KIND:
                shedder = self._shedders.get(kind)
                if shedder is None:
                    shedder = self._shedders[kind] = DelayShedder(self.shed_policy,
                                                                  lambda: self.backlog(kind), self.clock)
                self._changed(kind, shedder.completed(waited))
                if not count and shedder.overloaded and not self.backlog(kind):
                    self._changed(kind, shedder.idle())   # the last one of the queue: it is gone
        self._resume_if_room(kind)

    def _resume_if_room(self, kind: str) -> None:
        if kind in self._waiting and not self.full(kind):
            for resume in self._waiting.pop(kind):
                resume()

    def queue_empty(self, kind: str) -> None:
        """A listener of ``kind`` found its accept queue empty."""
        shedder = self._shedders.get(kind)
        if shedder is not None and not self._in_setup.get(kind):
            self._changed(kind, shedder.idle())

    def _changed(self, kind: str, change: str | None) -> None:
        if change == "overloaded":
            shedder = self._shedders[kind]
            log.warning("overloaded: %s connections have waited over %.1f s for %.1f s and their backlog (%d) "
                        "is not draining: refusing those that waited past %.1f s in the accept queue, "
                        "setups capped at %d", kind, shedder.policy.target, shedder.policy.interval,
                        self.backlog(kind), shedder.policy.target, self.setup_cap(kind))
        elif change == "recovered":
            log.warning("recovered: %s connections wait less than %.1f s again (%d refused for their wait so far)",
                        kind, self.shed_policy.target, self._shedders[kind].shed)

    def _should_log(self, what: str) -> bool:
        return self._log_limiter.allow(what) is not None


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

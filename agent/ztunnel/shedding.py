"""Shedding on queueing delay (issue 18), sans-I/O: CoDel's idea applied to connection setup.

Why: connections are served first-in first-out. Under sustained overload the backlog grows
until it is older than the clients' patience, and from then on every connection the proxy
sets up has already been given up by its client (congestion collapse: a 1 h soak at
200 connections/s on a loaded machine failed 705,788 of 720,000). The answer is to keep
the wait bounded, so the connections served are ones whose client is still there, and to
refuse the rest at once (an RST costs microseconds; a setup nobody waits for costs a
tunnel at both ends).

What is measured: each connection's *own wait*, from the moment the kernel completed its
handshake (the accepted socket's age, ``TCP_INFO``) until its setup ended (wired, or
refused for its own reasons), less the time it spent waiting for another party: the HBONE
peer's handshake and its answer to the CONNECT, an upstream's connect (``admission.Setup``).
That is the delay this proxy added: its accept queue, its loop, its admission. The peer's
share is left out on purpose: counted, a peer slowed down for a few seconds (tearing down
a 10,000-connection burst) made this proxy stand "overloaded", cap its setups at a
throughput that the slow answers had lowered, and refuse 2,613 of the 12,000 connections
of the soak that followed while its own loop was idle. A slow peer refuses new streams
past its own cap (``admission.STREAM_KIND``), and our timeouts bound the wait for it.

When it is overload (:meth:`DelayShedder.completed`), per listener kind:

- **standing delay**: every wait that ended during one ``interval`` was above ``target``
  (CoDel: the minimum over an interval; one quick setup says the queue drains and resets it);
- **and not draining**: the backlog (setups in flight plus the kernel's accept queues) is
  still at its peak, or its peak is recent (less than half an interval ago), or since the
  peak it shrank by less than half of what completed, i.e. new arrivals kept up with the
  service. A burst (10,000 connections opened within a few seconds, then nothing) shrinks
  its backlog from the moment its arrivals end: it is left alone however long it takes to
  drain, and looked at again one interval later. Sustained overload keeps its backlog
  (or grows it): that is shed. So the interval must outlast a burst's arrivals (seconds
  on a loaded node), which is why it is 10 s by default.

What overload does, until every wait for a whole interval was within target again (or
the kind went idle), refused connections' included:

- a connection that already waited longer than ``target`` in the accept queue is refused
  when it is accepted (:meth:`DelayShedder.should_shed`): the oldest ones, whose client
  is the likeliest to have gone;
- setups doing the proxy's own work (not waiting on a peer) are capped at what it
  completes in ``target`` (Little's law: throughput × target;
  :meth:`DelayShedder.setup_cap`, at least ``min_cap``), so a setup admitted now gets
  through its own part within about target; the rest wait in the accept queue, where
  refusing costs nothing.

Established connections are never touched, and refusals are counted and logged by the
caller (``admission.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ShedPolicy:
    """``target``: the wait served connections should stay under (seconds); 0 disables
    shedding on delay. ``interval``: how long a standing delay must last before shedding,
    and how long waits must stay within target before it stops. ``min_cap``: setups in
    flight are never capped below this."""
    target: float = 1.0
    interval: float = 10.0
    min_cap: int = 16

    @property
    def enabled(self) -> bool:
        return self.target > 0


class DelayShedder:
    """The delay controller of one listener kind. ``backlog`` answers how many connections
    of the kind are waiting (in setup plus queued in the kernel); it is asked only when a
    standing delay is being judged, at most once an interval."""

    def __init__(self, policy: ShedPolicy, backlog: Callable[[], int], clock: Callable[[], float]):
        self.policy = policy
        self._backlog = backlog
        self._clock = clock
        self.overloaded = False
        self.shed = 0                                # refused for their wait, all episodes
        self._first_above: float | None = None      # calm: since when every wait was above target
        self._peak = 0                              # ... the largest backlog since,
        self._peak_at = 0.0                         # ... when it was seen,
        self._done_since_peak = 0                   # ... and setups ended after it
        self._first_below: float | None = None      # overloaded: since when every wait was within target
        self._bucket_start = clock()                # throughput: completions per interval
        self._bucket_done = 0
        self._last_bucket_done = 0

    def completed(self, waited: float) -> str | None:
        """A setup ended after the connection waited ``waited`` seconds in all. Returns
        ``"overloaded"`` or ``"recovered"`` when the state changes, else None."""
        now = self._clock()
        self._roll(now)
        self._bucket_done += 1
        target, interval = self.policy.target, self.policy.interval
        if self.overloaded:
            if waited > target:
                self._first_below = None
            elif self._first_below is None:
                self._first_below = now
            elif now - self._first_below >= interval:
                self._recover()
                return "recovered"
            return None
        if waited <= target:
            self._first_above = None
            return None
        backlog = self._backlog()
        if self._first_above is None:
            self._first_above, self._peak, self._peak_at, self._done_since_peak = now, backlog, now, 0
            return None
        if backlog >= self._peak:
            self._peak, self._peak_at, self._done_since_peak = backlog, now, 0
        else:
            self._done_since_peak += 1
        if now - self._first_above < interval:
            return None
        if backlog <= self.policy.min_cap or self._draining(now, backlog):
            # A queue that drains (or hardly exists) is transient: judge it again in an interval.
            self._first_above, self._peak, self._peak_at, self._done_since_peak = now, backlog, now, 0
            return None
        self.overloaded, self._first_below = True, None
        return "overloaded"

    def _draining(self, now: float, backlog: int) -> bool:
        """Since its peak, at least half an interval ago, the backlog shrank by at least
        half of what completed: arrivals stopped or fell well below the service (a burst
        that is over). A backlog still growing, or flat, is not draining."""
        return (backlog < self._peak and now - self._peak_at >= self.policy.interval / 2
                and (self._peak - backlog) * 2 >= self._done_since_peak)

    def should_shed(self, age: float) -> bool:
        """For a connection just accepted after ``age`` seconds in the accept queue: refuse it?
        A refused one's wait was above target too: it keeps the overload standing (CoDel
        stays in its dropping state while what it dequeues is old). Counting only the
        fresh ones admitted meanwhile, the state ended after an interval whatever the
        queue, and the next episode served connections seconds old."""
        if self.overloaded and age > self.policy.target:
            self.shed += 1
            self._first_below = None
            return True
        return False

    def setup_cap(self, max_in_setup: int) -> int:
        """Setups in flight allowed now: ``max_in_setup`` when calm, throughput × target
        when overloaded."""
        if not self.overloaded:
            return max_in_setup
        self._roll(self._clock())
        per_second = max(self._last_bucket_done, self._bucket_done) / self.policy.interval
        return min(max_in_setup, max(self.policy.min_cap, int(per_second * self.policy.target)))

    def idle(self) -> str | None:
        """Nothing of the kind in setup and its accept queue found empty: whatever queue
        there was is gone (CoDel leaves its dropping state on an empty queue)."""
        self._first_above = None
        if self.overloaded:
            self._recover()
            return "recovered"
        return None

    def _recover(self) -> None:
        self.overloaded, self._first_above, self._first_below = False, None, None

    def _roll(self, now: float) -> None:
        """Start a new throughput bucket once an interval has passed (an older one counts as none)."""
        elapsed = now - self._bucket_start
        if elapsed >= self.policy.interval:
            self._last_bucket_done = self._bucket_done if elapsed < 2 * self.policy.interval else 0
            self._bucket_start, self._bucket_done = now, 0

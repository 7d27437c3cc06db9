"""Shedding on queueing delay, pure (a fake clock, backlogs given by hand): sustained
overload is shed, a burst that drains is not, and the state ends when waits are short."""
from __future__ import annotations

from shoal.agent.ztunnel.shedding import DelayShedder, ShedPolicy

POLICY = ShedPolicy(target=1.0, interval=3.0, min_cap=4)


class Bed:
    """A fake clock and backlog around one controller."""

    def __init__(self, policy: ShedPolicy = POLICY):
        self.now, self.backlog = 0.0, 0
        self.shedder = DelayShedder(policy, lambda: self.backlog, lambda: self.now)

    def complete(self, waited: float, at: float | None = None) -> str | None:
        if at is not None:
            self.now = at
        return self.shedder.completed(waited)


def _sustained(bed: Bed, until: float, rate: int = 10, waited: float = 2.0, growth: int = 5) -> list:
    """``rate`` completions a second, each after ``waited``, while the backlog grows by
    ``growth`` a second (arrivals outrun the service); the state changes seen."""
    changes = []
    steps = int(until * rate)
    for step in range(1, steps + 1):
        bed.now = step / rate
        bed.backlog = 100 + int(bed.now * growth)
        change = bed.complete(waited)
        if change:
            changes.append((round(bed.now, 1), change))
    return changes


def test_a_standing_delay_whose_backlog_keeps_up_is_overload_after_one_interval():
    bed = Bed()
    assert _sustained(bed, until=5.0) == [(3.1, "overloaded")]
    assert bed.shedder.overloaded


def test_overload_refuses_only_connections_that_waited_past_the_target():
    bed = Bed()
    assert not bed.shedder.should_shed(30.0)   # calm: nobody is refused for waiting
    _sustained(bed, until=4.0)
    assert bed.shedder.should_shed(1.5) and bed.shedder.should_shed(30.0)
    assert not bed.shedder.should_shed(0.2)   # a fresh one is still served
    assert bed.shedder.shed == 2


def test_one_quick_setup_in_the_interval_means_the_queue_drains():
    """CoDel's minimum over the interval: a wait within target resets the clock."""
    bed = Bed()
    for step in range(1, 60):
        bed.now, bed.backlog = step / 10, 100 + step
        waited = 0.5 if step % 25 == 0 else 2.0   # one quick setup every 2.5 s
        assert bed.complete(waited) is None
    assert not bed.shedder.overloaded


def test_a_draining_burst_is_never_shed_however_long_it_stands():
    """10,000 connections opened at once, served at 500 a second: every wait is above
    target for 20 s, but the backlog shrinks all along (no new arrivals)."""
    bed = Bed()
    bed.backlog = 10_000
    for served in range(1, 10_001):
        bed.now = served / 500
        bed.backlog = 10_000 - served
        assert bed.complete(waited=bed.now) is None
        assert not bed.shedder.should_shed(bed.now)
    assert not bed.shedder.overloaded


def test_a_burst_still_arriving_for_part_of_the_interval_is_not_shed():
    """A loaded client opens 6,000 connections over 1.2 s while the first are served: the
    backlog peaks, then falls; judged after an interval, it drains."""
    bed = Bed()
    for ms in range(1, 6_000):
        bed.now = ms / 1000
        arrived = min(6_000, ms * 5)
        bed.backlog = arrived - ms
        assert bed.complete(waited=1.5) is None
    assert not bed.shedder.overloaded


def test_a_flat_backlog_with_jitter_is_overload():
    """The accept queue full (arrivals dropped at its door), setups at their cap: the
    backlog hovers below an early peak while thousands complete."""
    bed = Bed()
    changes = []
    for step in range(1, 500):
        bed.now = step / 100
        bed.backlog = 12_000 - step % 7
        changes.append(bed.complete(waited=3.0))
    assert "overloaded" in changes


def test_a_burst_on_top_of_arrivals_that_keep_up_is_overload():
    """The same backlog, but new connections arrive as fast as they are served: not draining."""
    bed = Bed()
    bed.backlog = 10_000
    changes = []
    for served in range(1, 3_000):
        bed.now = served / 500
        changes.append(bed.complete(waited=bed.now))
    assert "overloaded" in changes


def test_a_tiny_backlog_is_not_overload():
    """Slow setups with hardly anything waiting (a slow upstream, no queue) shed nothing."""
    bed = Bed()
    bed.backlog = 2
    for step in range(1, 100):
        assert bed.complete(5.0, at=step * 0.5) is None


def test_recovers_once_waits_stay_within_target_for_an_interval():
    bed = Bed()
    _sustained(bed, until=4.0)
    assert bed.shedder.overloaded
    assert bed.complete(0.3, at=4.5) is None
    assert bed.complete(1.8, at=5.0) is None      # one long wait: the interval starts again
    assert bed.complete(0.3, at=5.5) is None
    assert bed.complete(0.3, at=8.0) is None
    assert bed.complete(0.3, at=8.6) == "recovered"
    assert not bed.shedder.overloaded and not bed.shedder.should_shed(5.0)


def test_an_idle_kind_leaves_overload_at_once():
    bed = Bed()
    _sustained(bed, until=4.0)
    assert bed.shedder.idle() == "recovered"
    assert bed.shedder.idle() is None


def test_overload_caps_setups_at_what_completes_within_the_target():
    """Little's law: at 10 completions a second and a 1 s target, 10 in flight end within
    about a second; calm, the configured cap applies; never below min_cap."""
    bed = Bed()
    assert bed.shedder.setup_cap(8192) == 8192
    _sustained(bed, until=7.0, rate=10)
    assert bed.shedder.setup_cap(8192) == 10
    assert bed.shedder.setup_cap(6) == 6            # never above the configured cap
    slow = Bed()
    _sustained(slow, until=7.0, rate=2)
    assert slow.shedder.setup_cap(8192) == POLICY.min_cap
    slow.now += 10 * POLICY.interval                 # long silence: no throughput known
    assert slow.shedder.setup_cap(8192) == POLICY.min_cap


def test_target_zero_disables():
    assert not ShedPolicy(target=0).enabled and ShedPolicy().enabled


def test_refusing_old_connections_keeps_the_overload_standing():
    """While old connections are still being refused, the fresh ones admitted meanwhile
    (all within target) do not end the state: the queue is still old."""
    bed = Bed()
    _sustained(bed, until=4.0)
    assert bed.shedder.overloaded
    for step in range(1, 80):
        bed.now = 4.0 + step / 10
        assert bed.complete(0.2) is None               # an admitted one, quick
        assert bed.shedder.should_shed(2.5)             # and an old one refused
    assert bed.shedder.overloaded
    for step in range(1, 40):                           # nothing old any more: it ends
        change = bed.complete(0.2, at=12.0 + step / 10)
    assert change is None and not bed.shedder.overloaded

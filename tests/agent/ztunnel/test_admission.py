"""Admission control, pure: overload shedding decisions and the per-identity dial cap."""
from __future__ import annotations

import asyncio
import logging

from shoal.agent.ztunnel.admission import STREAM_KIND, Admission, DialLimits
from shoal.agent.ztunnel.shedding import ShedPolicy


def test_sheds_past_the_live_budget_and_logs_at_most_once_a_second(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.agent.ztunnel.admission")
    now, live = [0.0], [0]
    admission = Admission(max_in_setup=3, max_live=10, live=lambda: live[0], clock=lambda: now[0])
    assert admission.admit() is None
    admission.setup_started("outbound")
    admission.setup_started("hbone")
    live[0] = 8
    assert admission.admit() == "overloaded"    # live + in setup reach the cap
    live[0] = 7
    assert admission.admit() is None
    live[0] = 10
    for _ in range(100):
        admission.admit()
    now[0] = 1.5
    admission.admit()
    assert admission.shed == 102
    # 102 refusals, two log lines: the first (t=0) and the first after a second (t=1.5).
    assert sum("overloaded" in r.getMessage() for r in caplog.records) == 2


def test_too_many_in_setup_pauses_accepting_until_three_quarters_drained():
    """A burst past the setup cap waits (listeners pause) instead of being refused, and
    accepting resumes with hysteresis, not at every single setup that ends."""
    admission = Admission(max_in_setup=8, max_live=1000, live=lambda: 0)
    resumed: list[str] = []
    for _ in range(8):
        assert not admission.full("outbound")
        admission.setup_started("outbound")
    assert admission.full("outbound") and admission.admit() is None   # full means wait, never refuse
    admission.wait_for_room("outbound", lambda: resumed.append("pod-a"))
    admission.wait_for_room("outbound", lambda: resumed.append("pod-b"))
    admission.setup_done("outbound")                       # 7 in setup: still paused
    assert admission.full("outbound") and resumed == []
    admission.setup_done("outbound")                       # 6 = three quarters: still paused
    assert admission.full("outbound") and resumed == []
    admission.setup_done("outbound")                       # 5: every paused listener resumes once
    assert resumed == ["pod-a", "pod-b"] and not admission.full("outbound")
    admission.setup_done("outbound")
    assert resumed == ["pod-a", "pod-b"] and admission.in_setup == 4
    assert admission.pauses == 2 and admission.shed == 0


def test_a_burst_of_one_kind_never_pauses_another():
    """Outbound setups wait for HBONE handshakes on 15008 (same-node traffic crosses this
    proxy's own 15008): pausing those too would stall every setup until its timeout."""
    admission = Admission(max_in_setup=4, max_live=1000, live=lambda: 0)
    for _ in range(4):
        admission.setup_started("outbound")
    assert admission.full("outbound")
    assert not admission.full("hbone") and not admission.full("plaintext")
    admission.setup_started("hbone")
    assert admission.in_setup == 5 and admission.admit() is None


async def test_dials_are_capped_per_identity_and_one_peer_cannot_take_another_s():
    limits = DialLimits(per_identity=2)
    release = asyncio.Event()
    peak = {"a": 0, "b": 0}

    async def dial(identity):
        async with limits.slot(identity):
            peak[identity[-1]] = max(peak[identity[-1]], limits.active(identity))
            await release.wait()

    abusive = [asyncio.ensure_future(dial("spiffe://x/a")) for _ in range(50)]
    polite = asyncio.ensure_future(dial("spiffe://x/b"))
    await asyncio.sleep(0.01)
    assert limits.active("spiffe://x/a") == 2 and limits.active("spiffe://x/b") == 1
    for task in abusive[10:]:  # streams reset while waiting: dropped before dialling
        task.cancel()
    release.set()
    await asyncio.gather(*abusive, polite, return_exceptions=True)
    assert peak == {"a": 2, "b": 1}
    assert limits._slots == {} and limits._users == {}  # nothing kept per past peer


def _overloaded_admission(now: list, queued: list) -> Admission:
    """An admission whose outbound kind went through 4 s of 2 s waits with a growing backlog."""
    admission = Admission(max_in_setup=100, max_live=10_000, live=lambda: 0, clock=lambda: now[0],
                          shed_policy=ShedPolicy(target=1.0, interval=3.0, min_cap=4))
    admission.add_queue("outbound", lambda: queued[0])
    for step in range(40):
        now[0] = step / 10
        queued[0] = 50 + step                    # arrivals outrun the service
        arrived = admission.setup_started("outbound", age=1.5)
        now[0] += 0.5
        admission.setup_done("outbound", arrived)
    return admission


def test_waits_that_stand_shed_old_connections_with_a_rate_limited_log(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.agent.ztunnel.admission")
    now, queued = [0.0], [0]
    admission = _overloaded_admission(now, queued)
    assert admission.overloaded("outbound") and not admission.overloaded("hbone")
    assert sum("not draining" in r.getMessage() for r in caplog.records) == 1
    assert admission.admit("outbound", age=0.2) is None       # fresh: served
    assert admission.admit("hbone", age=5.0) is None          # another kind: not overloaded
    for _ in range(50):
        assert admission.admit("outbound", age=2.5) == "queue_delay"
    now[0] += 1.5
    assert admission.admit("outbound", age=2.5) == "queue_delay"
    assert admission.shed == 51
    shed_lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # 51 refusals, two lines: the first at once, then the 50 since, a second later.
    assert len(shed_lines) == 2 and "refused 1 connection(s)" in shed_lines[0]
    assert "refused 50 connection(s)" in shed_lines[1] and "51 in all" in shed_lines[1]


def test_overload_lowers_the_setup_cap_and_an_idle_kind_recovers(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.agent.ztunnel.admission")
    now, queued = [0.0], [0]
    admission = _overloaded_admission(now, queued)
    cap = admission.setup_cap("outbound")
    assert 4 <= cap < 100                      # throughput x target, not the configured 100
    for _ in range(cap):
        admission.setup_started("outbound")
    assert admission.full("outbound")
    admission.queue_empty("outbound")          # setups still in flight: not idle
    assert admission.overloaded("outbound")
    for _ in range(cap):
        admission.setup_done("outbound")
    admission.queue_empty("outbound")
    assert not admission.overloaded("outbound") and admission.setup_cap("outbound") == 100
    assert any("recovered" in r.getMessage() for r in caplog.records)


def test_waits_are_observed_per_kind_and_shedding_can_be_off():
    seen: list = []
    now = [0.0]
    admission = Admission(max_in_setup=10, max_live=100, live=lambda: 0, clock=lambda: now[0],
                          shed_policy=ShedPolicy(target=0), observe_wait=lambda kind, w: seen.append((kind, w)))
    arrived = admission.setup_started("plaintext", age=0.25)
    now[0] = 0.5
    admission.setup_done("plaintext", arrived)
    assert seen == [("plaintext", 0.75)]
    assert admission.admit("plaintext", age=100.0) is None and not admission.overloaded("plaintext")


def test_accept_queue_lengths_are_read_at_most_every_tenth_of_a_second():
    """One getsockopt per listener (so per pod): waits hovering around the target must not
    make every setup read them all."""
    now, reads = [0.0], []
    admission = Admission(max_in_setup=10, max_live=100, live=lambda: 0, clock=lambda: now[0])
    admission.add_queue("outbound", lambda: reads.append(1) or 7)
    admission.setup_started("outbound")
    assert [admission.backlog("outbound") for _ in range(100)] == [8] * 100
    now[0] = 0.1
    assert admission.backlog("outbound") == 8 and len(reads) == 2


# -- own delay only: what a peer makes a setup wait is the peer's (issue 18's soak after a burst)

async def _setup(admission: Admission, now: list, kind: str, age: float, own: float, peer: float) -> None:
    """One setup in its own task, on the fake clock: ``age`` in the accept queue, ``own``
    seconds of our work, ``peer`` seconds waiting for the peer's answer."""
    task = asyncio.current_task()
    setup = admission.setup_started(kind, age=age, task=task)
    now[0] += own
    with admission.waiting_on_peer():
        now[0] += peer
        await asyncio.sleep(0)
    admission.setup_done(kind, setup, task)


async def _sustained_setups(own: float, peer: float) -> tuple[Admission, list]:
    """Five setups a second for 8 s, the backlog growing all along (a steady stream of
    arrivals: after a burst, the peer is still busy tearing it down); the waits observed."""
    now, queued, seen = [0.0], [0], []
    admission = Admission(max_in_setup=100, max_live=10_000, live=lambda: 0, clock=lambda: now[0],
                          shed_policy=ShedPolicy(target=1.0, interval=3.0, min_cap=4),
                          observe_wait=lambda kind, waited: seen.append(round(waited, 3)))
    admission.add_queue("outbound", lambda: queued[0])
    for step in range(40):
        now[0], queued[0] = step / 5, 50 + step
        await asyncio.ensure_future(_setup(admission, now, "outbound", age=0.1, own=own, peer=peer))
    return admission, seen


async def test_a_slow_peer_answer_is_not_counted_as_this_proxys_queueing_delay():
    admission, seen = await _sustained_setups(own=0.05, peer=2.0)
    assert seen == [0.15] * 40                       # accept queue + own work, not the 2 s answer
    assert not admission.overloaded("outbound") and admission.admit("outbound", age=0.5) is None
    # The same waits spent in this proxy are overload: the accounting is what differs.
    admission, seen = await _sustained_setups(own=2.0, peer=0.05)
    assert seen == [2.1] * 40 and admission.overloaded("outbound")


async def test_setups_waiting_on_a_peer_do_not_count_against_the_overloaded_cap():
    now, queued = [0.0], [0]
    admission = _overloaded_admission(now, queued)
    cap = admission.setup_cap("outbound")
    assert cap < 100
    answers = asyncio.Event()

    async def waiting_for_answer():
        setup = admission.setup_started("outbound", task=asyncio.current_task())
        with admission.waiting_on_peer():
            await answers.wait()
        admission.setup_done("outbound", setup, asyncio.current_task())

    waiting = [asyncio.ensure_future(waiting_for_answer()) for _ in range(cap * 2)]
    await asyncio.sleep(0)
    assert admission.in_setup == cap * 2 and not admission.full("outbound")   # all with the peer
    for _ in range(cap):
        admission.setup_started("outbound")          # our own work: these count
    assert admission.full("outbound")
    resumed: list = []
    admission.wait_for_room("outbound", lambda: resumed.append(True))
    answers.set()                                    # answers in: those go, ours still stand
    await asyncio.gather(*waiting)
    assert admission.in_setup == cap and admission.full("outbound") and not resumed
    for _ in range(cap):
        admission.setup_done("outbound")
    assert resumed == [True]


def test_inbound_streams_past_their_cap_are_refused_with_a_rate_limited_log(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.agent.ztunnel.admission")
    now = [0.0]
    admission = Admission(max_in_setup=100, max_live=10_000, live=lambda: 0, clock=lambda: now[0],
                          max_streams_in_setup=2)
    for _ in range(2):
        assert admission.admit_stream() is None
        admission.setup_started(STREAM_KIND)
    assert admission.in_setup == 0                   # streams are not connections in setup
    assert admission.full("outbound") is False       # nor do they stop the listeners
    assert [admission.admit_stream() for _ in range(30)] == ["stream_overloaded"] * 30
    now[0] = 1.5
    assert admission.admit_stream() == "stream_overloaded" and admission.shed == 31
    assert not admission.overloaded(STREAM_KIND)     # a cap, never shed on delay
    lines = [r.getMessage() for r in caplog.records if STREAM_KIND in r.getMessage()]
    assert len(lines) == 2 and "refused 30 new one(s)" in lines[1] and "max 2" in lines[1]
    admission.setup_done(STREAM_KIND)
    assert admission.admit_stream() is None

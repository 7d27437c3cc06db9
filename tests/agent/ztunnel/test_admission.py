"""Admission control, pure: overload shedding decisions and the per-identity dial cap."""
from __future__ import annotations

import asyncio
import logging

from shoal.agent.ztunnel.admission import Admission, DialLimits


def test_sheds_past_the_live_budget_and_logs_at_most_once_a_second(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.agent.ztunnel.admission")
    now, live = [0.0], [0]
    admission = Admission(max_in_setup=3, max_live=10, live=lambda: live[0], clock=lambda: now[0])
    assert admission.admit() is None
    admission.setup_started("outbound")
    admission.setup_started("hbone")
    live[0] = 8
    assert admission.admit() == "live"          # live + in setup reach the cap
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

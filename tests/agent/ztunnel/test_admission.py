"""Admission control, pure: overload shedding decisions and the per-identity dial cap."""
from __future__ import annotations

import asyncio
import logging

from shoal.agent.ztunnel.admission import Admission, DialLimits


def test_sheds_past_either_cap_and_logs_at_most_once_a_second(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.agent.ztunnel.admission")
    now, live = [0.0], [0]
    admission = Admission(max_in_setup=3, max_live=10, live=lambda: live[0], clock=lambda: now[0])
    assert admission.admit() is None
    admission.in_setup = 3
    assert admission.admit() == "in_setup"
    admission.in_setup, live[0] = 2, 8
    assert admission.admit() == "live"          # live + in setup reach the cap
    live[0] = 7
    assert admission.admit() is None
    admission.in_setup = 3
    for _ in range(100):
        admission.admit()
    now[0] = 1.5
    admission.admit()
    assert admission.shed == 103
    # 103 refusals, two log lines: the first (t=0) and the first after a second (t=1.5).
    assert sum("overloaded" in r.getMessage() for r in caplog.records) == 2


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

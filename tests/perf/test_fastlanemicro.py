"""The plain fast path's in-process bench drives the real waypoint: every request answered
with the origin's answer, every one on the fast path (what an A/B with it compares)."""
from __future__ import annotations

import pytest

from shoal.perf import fastlanemicro

pytestmark = pytest.mark.timeout(60)


async def test_every_request_goes_through_the_fast_path_and_gets_the_origins_answer():
    cpu = await fastlanemicro.run(requests=400, connections=4)    # raises unless all 400 took the fast path
    assert 0 < cpu < 0.05


async def test_an_answer_that_is_not_the_origins_fails_the_run(monkeypatch):
    monkeypatch.setattr(fastlanemicro, "ANSWER", fastlanemicro.ANSWER.replace(b"200 OK", b"201 Created"))
    with pytest.raises(RuntimeError, match="not the origin's answer"):
        await fastlanemicro.run(requests=40, connections=2)

"""Rate-limited warnings, pure (fake clock)."""
from __future__ import annotations

from shoal.ratelog import LogLimiter, held_note


def test_one_line_per_key_and_period_and_the_next_says_how_many_were_held():
    now = [0.0]
    limiter = LogLimiter(period=1.0, clock=lambda: now[0])
    assert limiter.allow("a") == 0
    assert [limiter.allow("a") for _ in range(5)] == [None] * 5
    assert limiter.allow("b") == 0                 # keys are independent
    now[0] = 1.0
    assert limiter.allow("a") == 5
    assert limiter.allow("a") is None
    now[0] = 5.0
    assert limiter.allow("a") == 1
    assert held_note(0) == "" and "3 more" in held_note(3)

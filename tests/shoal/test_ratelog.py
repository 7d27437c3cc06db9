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


def test_log_limited_writes_a_line_per_period_with_the_count_and_the_traceback_it_is_given(caplog):
    import logging

    from shoal.ratelog import log_limited

    now = [0.0]
    limiter = LogLimiter(period=1.0, clock=lambda: now[0])
    logger = logging.getLogger("tests.ratelog")
    try:
        raise FileExistsError(17, "File exists")
    except FileExistsError as exc:
        error = exc
    with caplog.at_level(logging.INFO, logger="tests.ratelog"):
        for _ in range(50):
            log_limited(logger, limiter, "k", logging.ERROR, "conn %s failed", "x", exc_info=error)
        now[0] = 1.5
        log_limited(logger, limiter, "k", logging.ERROR, "conn %s failed", "y", exc_info=error)
    assert [r.getMessage() for r in caplog.records] == [
        "conn x failed", "conn y failed (49 more like it in the last seconds, not logged)"]
    assert all(r.levelno == logging.ERROR and r.exc_info and r.exc_info[1] is error for r in caplog.records)
    assert "FileExistsError" in caplog.text and "Traceback" in caplog.text

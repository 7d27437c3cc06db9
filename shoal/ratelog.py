"""Rate-limited warnings: a flood of bad input must not become a flood of log lines.

One line per key per period at most; the lines held back are counted and the next line
that gets through says how many (the exact count belongs in a metric, which the caller
keeps). Keys are a small fixed set chosen by the caller (a method, a reason), never a
peer address, so the table cannot grow with the traffic."""
from __future__ import annotations

import logging
import time
from typing import Callable, Hashable


class LogLimiter:
    """Says when a line keyed ``key`` may be logged: at most once per ``period`` seconds."""

    def __init__(self, period: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.period = period
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        """None: stay quiet (the line is counted as held back). Otherwise log now; the
        value is how many lines of this key were held back since the last one."""
        now = self._clock()
        if now - self._last.get(key, float("-inf")) < self.period:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def held_note(held: int) -> str:
    """The tail of a line that follows ``held`` silent ones."""
    return f" ({held} more like it in the last seconds, not logged)" if held else ""


def log_limited(logger: logging.Logger, limiter: LogLimiter, key: Hashable, level: int, msg: str, *args: object,
                exc_info: BaseException | None = None) -> None:
    """``logger.log(level, msg, *args)`` if ``limiter`` lets ``key`` through now, saying how
    many were held back; ``exc_info`` adds its traceback (one per period, not one per
    connection: an unknown error is diagnosable without a flood)."""
    held = limiter.allow(key)
    if held is not None:
        logger.log(level, msg + "%s", *args, held_note(held), exc_info=exc_info, stacklevel=2)

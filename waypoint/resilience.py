"""Resilience mechanisms as small state machines with an injected clock.

Nothing here sleeps or touches a socket: the driver asks "may I?", "should I
retry?", "how long to wait?", and tells the outcome back.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .grpc import RETRY_ON_CODES
from .model import ConnectionPoolPolicy, OutlierPolicy, RateLimitPolicy, RetryPolicy

Clock = Callable[[], float]

# Outcomes of one upstream attempt that are not an HTTP status.
CONNECT_FAILURE = "connect-failure"
RESET = "reset"
TIMEOUT = "timeout"


def is_retriable(policy: RetryPolicy, outcome: int | str, grpc_status: int | None = None) -> bool:
    """Envoy's retry_on semantics: '5xx' covers every 5xx plus reset and connect failure;
    the gRPC names (``unavailable``...) match the grpc-status of a trailers-only answer,
    which gRPC servers send with HTTP 200."""
    on = policy.retry_on
    if grpc_status:
        return any(RETRY_ON_CODES.get(name) == grpc_status for name in on)
    if isinstance(outcome, int):
        if outcome >= 500 and "5xx" in on:
            return True
        return outcome in (502, 503, 504) and "gateway-error" in on
    if outcome == TIMEOUT:
        return "5xx" in on or "gateway-error" in on
    if outcome == CONNECT_FAILURE:
        return bool({"5xx", "gateway-error", "connect-failure"} & on)
    if outcome == RESET:
        return bool({"5xx", "reset"} & on)
    return False


def backoff_delay(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Fully jittered exponential backoff (Envoy's): uniform in [0, min(max, base * 2^(n-1))]."""
    ceiling = min(policy.backoff_max, policy.backoff_base * (2 ** max(0, retry_number - 1)))
    return rng.uniform(0, ceiling)


class PercentSampler:
    """Picks exactly ``percent`` % of calls, spread evenly (error diffusion, not dice).

    Fault injection uses this so that "abort 50 %" aborts every other attempt:
    the observed rate equals the configured one over any window, and a retry right
    after an injected abort is not itself aborted by bad luck.
    """

    def __init__(self, percent: float) -> None:
        self.percent = percent
        self._credit = 0.0

    def sample(self) -> bool:
        self._credit += self.percent
        if self._credit >= 100.0:
            self._credit -= 100.0
            return True
        return False


class TokenBucket:
    """Local rate limit: ``tokens_per_fill`` tokens every ``fill_interval`` s, at most ``max_tokens``."""

    def __init__(self, policy: RateLimitPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._tokens = float(policy.max_tokens)
        self._last_fill = clock()

    def take(self) -> bool:
        now = self._clock()
        fills = int((now - self._last_fill) / self.policy.fill_interval)
        if fills:
            self._tokens = min(self.policy.max_tokens, self._tokens + fills * self.policy.tokens_per_fill)
            self._last_fill += fills * self.policy.fill_interval
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class CircuitBreaker:
    """Caps in-flight requests to one backend Service (Envoy's max_requests)."""

    def __init__(self, policy: ConnectionPoolPolicy) -> None:
        self.policy = policy
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.policy.max_requests:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


@dataclass
class _EndpointHealth:
    consecutive_5xx: int = 0
    ejections: int = 0
    ejected_until: float = 0.0


class OutlierDetector:
    """Ejects an endpoint after N consecutive 5xx for base_ejection_time x (times ejected).

    Never ejects more than max_ejection_percent of a Service's endpoints (but always
    allows one), so a Service whose every endpoint fails still gets traffic.
    """

    def __init__(self, policy: OutlierPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._health: dict[str, _EndpointHealth] = {}

    def is_ejected(self, endpoint: str) -> bool:
        health = self._health.get(endpoint)
        return health is not None and health.ejected_until > self._clock()

    def record(self, endpoint: str, outcome: int | str, peers: int) -> bool:
        """Note one attempt's outcome; returns True when this call ejected the endpoint."""
        health = self._health.setdefault(endpoint, _EndpointHealth())
        failed = (isinstance(outcome, int) and outcome >= 500) or outcome in (CONNECT_FAILURE, RESET, TIMEOUT)
        if not failed:
            health.consecutive_5xx = 0
            return False
        health.consecutive_5xx += 1
        if health.consecutive_5xx < self.policy.consecutive_5xx or self.is_ejected(endpoint):
            return False
        now = self._clock()
        ejected_now = sum(1 for h in self._health.values() if h.ejected_until > now)
        allowed = max(1, int(peers * self.policy.max_ejection_percent / 100))
        if ejected_now >= allowed:
            return False
        health.ejections += 1
        health.ejected_until = now + self.policy.base_ejection_time * health.ejections
        health.consecutive_5xx = 0
        return True

    def forget(self, keep: set[str]) -> None:
        """Drop state of endpoints that left the cluster."""
        for endpoint in list(self._health):
            if endpoint not in keep:
                del self._health[endpoint]

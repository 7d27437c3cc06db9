"""Retries, fault sampling, token bucket, circuit breaker, outlier detection."""
import random

from shoal.waypoint.model import ConnectionPoolPolicy, OutlierPolicy, RateLimitPolicy, RetryPolicy
from shoal.waypoint.resilience import (
    CONNECT_FAILURE,
    RESET,
    CircuitBreaker,
    OutlierDetector,
    PercentSampler,
    TokenBucket,
    backoff_delay,
    is_retriable,
)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_retry_on():
    p = RetryPolicy(attempts=3, retry_on=frozenset({"5xx"}))
    assert is_retriable(p, 503) and is_retriable(p, RESET) and is_retriable(p, CONNECT_FAILURE)
    assert not is_retriable(p, 404) and not is_retriable(p, 200)
    only_connect = RetryPolicy(retry_on=frozenset({"connect-failure"}))
    assert is_retriable(only_connect, CONNECT_FAILURE) and not is_retriable(only_connect, 503)
    gw = RetryPolicy(retry_on=frozenset({"gateway-error"}))
    assert is_retriable(gw, 502) and not is_retriable(gw, 500)


def test_backoff_is_jittered_and_capped():
    p = RetryPolicy(backoff_base=0.01, backoff_max=0.05)
    rng = random.Random(1)
    delays = [backoff_delay(p, n, rng) for n in range(1, 10) for _ in range(20)]
    assert all(0 <= d <= 0.05 for d in delays)
    assert max(backoff_delay(p, 1, rng) for _ in range(50)) <= 0.01


def test_percent_sampler_is_exact_and_even():
    half = PercentSampler(50)
    picks = [half.sample() for _ in range(10)]
    assert picks.count(True) == 5 and all(a != b for a, b in zip(picks, picks[1:]))
    tenth = PercentSampler(10)
    assert sum(tenth.sample() for _ in range(1000)) == 100
    assert not any(PercentSampler(0).sample() for _ in range(100))
    assert all(PercentSampler(100).sample() for _ in range(100))


def test_token_bucket_refills():
    clock = Clock()
    bucket = TokenBucket(RateLimitPolicy(max_tokens=3, tokens_per_fill=2, fill_interval=1.0), clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert not bucket.take()
    clock.now += 0.5
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # capped at max_tokens


def test_circuit_breaker():
    cb = CircuitBreaker(ConnectionPoolPolicy(max_requests=2))
    assert cb.try_acquire() and cb.try_acquire() and not cb.try_acquire()
    cb.release()
    assert cb.try_acquire()


def test_outlier_detection_ejects_and_returns():
    clock = Clock()
    od = OutlierDetector(OutlierPolicy(consecutive_5xx=3, base_ejection_time=10, max_ejection_percent=50), clock)
    assert not od.record("a", 503, peers=2)
    od.record("a", 200, peers=2)  # a success resets the count
    assert not od.record("a", 503, peers=2) and not od.record("a", RESET, peers=2)
    assert od.record("a", 500, peers=2)
    assert od.is_ejected("a") and not od.is_ejected("b")
    # max 50 % of 2 endpoints: b cannot be ejected while a is out
    for _ in range(5):
        assert not od.record("b", 503, peers=2)
    clock.now += 10.1
    assert not od.is_ejected("a") and not od.is_ejected("b")
    for _ in range(3):
        od.record("a", 503, peers=2)
    clock.now += 15  # second ejection lasts twice as long
    assert od.is_ejected("a")
    clock.now += 6
    assert not od.is_ejected("a")

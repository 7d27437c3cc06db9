"""Map sync cost histogram: the kernel's buckets and the quantiles read from them."""
from __future__ import annotations


def test_cost_histogram_buckets_and_quantiles():
    from shoal.agent.mapsync import cost_bucket_bounds, histogram_quantile

    def bucket_of(ns: int) -> int:   # the kernel's formula, in Python
        log2 = max(ns.bit_length() - 1, 0)
        return ns if log2 < 2 else log2 * 4 + ((ns >> (log2 - 2)) & 3)
    for ns in (0, 1, 3, 4, 7, 1000, 1023, 1024, 1300, 2047, 10**6):
        low, high = cost_bucket_bounds(bucket_of(ns))
        assert low <= ns < high, ns
    buckets = [0] * 128
    buckets[bucket_of(1100)] = 90
    buckets[bucket_of(50_000)] = 10
    assert 1024 <= histogram_quantile(buckets, 0.5) < 1280
    assert histogram_quantile(buckets, 0.99) > 40_000
    assert histogram_quantile([0] * 128, 0.5) is None

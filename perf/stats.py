"""Small statistics used by the report and the tools: medians, percentiles, ratios."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (as numpy's default), ``pct`` in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {pct}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return statistics.median(values)


def ratio(value: float, reference: float) -> float | None:
    """value / reference, or None when the reference is zero (no meaningful ratio)."""
    return None if reference == 0 else value / reference


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repetitions were (0 = identical)."""
    mid = median(values)
    return 0.0 if mid == 0 else (max(values) - min(values)) / abs(mid)

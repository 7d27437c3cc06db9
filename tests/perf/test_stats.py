"""Statistics of the benchmark samples."""
import pytest

from shoal.perf import stats


def test_percentile_interpolates_like_numpy():
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert stats.percentile(values, 50) == 5.5
    assert stats.percentile(values, 99) == pytest.approx(9.91)
    assert stats.percentile(values, 0) == 1 and stats.percentile(values, 100) == 10
    assert stats.percentile([7], 99) == 7
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile(values, 101)



def test_median_ratio_spread():
    assert stats.median([3, 1, 2]) == 2
    assert stats.ratio(5, 10) == 0.5 and stats.ratio(5, 0) is None
    assert stats.spread([9, 10, 11]) == pytest.approx(0.2)
    assert stats.spread([0, 0]) == 0.0

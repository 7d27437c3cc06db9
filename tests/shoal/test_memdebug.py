"""The /debug/memory page's parts, in this process: tracing on request, growth named by line."""
from __future__ import annotations

import gc
import tracemalloc

import pytest

from shoal.memdebug import TRACE_ENV, MemoryReport, malloc_stats, start_tracing

HELD: list[bytearray] = []


def _allocate_a_megabyte() -> None:
    HELD.extend(bytearray(1024) for _ in range(1024))   # the line the report must name


@pytest.mark.parametrize("value", ["abc", "65", "-1"])
def test_a_bad_tracing_setting_is_an_error_not_silence(value):
    with pytest.raises(ValueError):
        start_tracing({TRACE_ENV: value})


def test_tracing_is_off_unless_asked():
    assert start_tracing({}) == 0 and start_tracing({TRACE_ENV: "0"}) == 0
    assert not tracemalloc.is_tracing()
    report = MemoryReport(lambda: {"records": 3})
    page = report.page()
    assert page["structures"] == {"records": 3} and "off" in page["tracemalloc"]
    assert page["rss_kib"] > 0 and page["python_blocks"] > 0
    assert "gc" not in page   # the heap walk only when asked: it stalls the process


def test_object_counts_are_of_live_objects_only():
    class Leaked:
        pass

    class Garbage:
        pass

    held = [Leaked() for _ in range(3000)]
    gc.disable()   # the cycles below wait for the page's collection, as a closed connection's do
    try:
        for _ in range(3000):   # cycles nobody holds
            cycle = Garbage()
            cycle.me = cycle
        del cycle
        counts = MemoryReport(dict, top=1000).page(objects=True)["gc"]
    finally:
        gc.enable()
    assert counts["objects_by_type"]["test_object_counts_are_of_live_objects_only.<locals>.Leaked"] == len(held)
    assert "test_object_counts_are_of_live_objects_only.<locals>.Garbage" not in counts["objects_by_type"]
    assert counts["collected_now"] >= 3000


def test_malloc_stats_tell_bytes_in_use_from_bytes_held_free():
    stats = malloc_stats()
    assert stats is not None   # glibc (Debian)
    assert stats["in_use"] > 0 and stats["arena"] >= stats["in_use"]


def test_the_report_names_the_line_that_grew_since_the_last_request():
    assert start_tracing({TRACE_ENV: "4"}) == 4
    try:
        report = MemoryReport(dict)   # baseline: now
        _allocate_a_megabyte()
        growth = report.page()["tracemalloc"]
        top = growth["top_lines"][0]
        assert top["site"].endswith(f"test_memdebug.py:{_allocate_a_megabyte.__code__.co_firstlineno + 1}")
        assert top["size_diff"] >= 1024 * 1024 and top["count_diff"] >= 1024
        # The call path too, the allocating line last (this test calling the helper before it).
        assert any(path["traceback"][-1] == top["site"] and len(path["traceback"]) >= 2
                   for path in growth["top_paths"])
        # The next request diffs against this one: what was already there is not growth.
        later = report.page()["tracemalloc"]["top_lines"]
        assert all(line["site"] != top["site"] or line["size_diff"] < 1024 * 1024 for line in later)
    finally:
        tracemalloc.stop()
        HELD.clear()

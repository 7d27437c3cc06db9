"""What a daemon's memory is made of, for its loopback admin page ``/debug/memory``.

A soak whose RSS creeps up needs an answer to "which structure grows?", asked of the
live process without restarting it under a profiler (ztunnel answers it with
``/debug/pprof/heap`` on its admin port). The page reports, cheapest first:

- the process's RSS, the blocks Python has allocated (most objects live in pymalloc's
  own mmapped arenas, which glibc does not see), and glibc's view of the rest of the heap
  (``mallinfo2``): bytes in use against bytes held free inside arenas tell a leak from
  fragmentation;
- the sizes of the daemon's own tables (connection records, pools, metric label sets),
  named by the daemon;
- on request (``/debug/memory/objects``), Python object counts by type after a full
  collection (the top types: a growing count names a leak without any tracing), which
  walks the heap twice: the process serves nothing meanwhile (up to seconds on a
  loaded node);
- when tracing is on (``SHOAL_TRACEMALLOC=<frames>`` in the daemon's environment, read
  at start: tracing costs CPU and memory, so it is never on by default), the source lines
  whose allocations grew most since the previous request (``tracemalloc`` snapshot diff;
  the first request diffs against the snapshot taken when tracing started).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys
import tracemalloc
from collections import Counter
from typing import Callable, Mapping

TRACE_ENV = "SHOAL_TRACEMALLOC"
TOP = 25
# Frames that are the tracer's and importer's own business, never the daemon's.
IGNORED_FILES = (tracemalloc.__file__, "<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>",
                 "<unknown>")


def start_tracing(env: Mapping[str, str] = os.environ) -> int:
    """Starts tracemalloc when ``SHOAL_TRACEMALLOC`` asks for it (its value: frames kept per
    allocation, 1-64); the frames traced, 0 when off. A bad value is an error, not silence."""
    value = env.get(TRACE_ENV, "").strip()
    if not value or value == "0":
        return 0
    frames = int(value)
    if not 1 <= frames <= 64:
        raise ValueError(f"{TRACE_ENV}={value}: frames per allocation must be 1 to 64")
    if not tracemalloc.is_tracing():
        tracemalloc.start(frames)
    return frames


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def _mallinfo2() -> Callable[[], "_MallInfo2"] | None:
    function = getattr(_libc(), "mallinfo2", None)
    if function is not None:
        function.restype = _MallInfo2
    return function


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): size_t fields, no 2 GiB wrap as in mallinfo."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_stats() -> dict[str, int] | None:
    """glibc's heap accounting, in bytes (None on another libc): ``in_use`` by live
    allocations, ``free_in_arenas`` held by malloc but unused (fragmentation, or room a
    burst left), ``mmapped`` in large blocks of their own, ``trimmable`` at the top of the
    main arena (what ``malloc_trim`` could return at least). The main arena only, as
    glibc counts it: threads that allocate get arenas of their own, not counted here."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return {"arena": info.arena, "in_use": info.uordblks, "free_in_arenas": info.fordblks, "mmapped": info.hblkhd,
            "trimmable": info.keepcost}


def rss_kib(status_path: str = "/proc/self/status") -> int:
    """VmRSS of this process (KiB)."""
    with open(status_path) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def object_counts(top: int = TOP) -> dict[str, int]:
    """The ``top`` most numerous object types the collector tracks (its containers:
    instances, dicts, lists, tuples; not ints or strings), once reachable ones only are
    left: a closed connection's objects form cycles, which wait for a full collection,
    and would otherwise count as if something still held them."""
    counts = Counter(type(obj).__qualname__ for obj in gc.get_objects())
    return dict(counts.most_common(top))


def _site(trace_frame: tracemalloc.Frame) -> str:
    return f"{trace_frame.filename}:{trace_frame.lineno}"


def _diff(diff: tracemalloc.StatisticDiff) -> dict:
    frames = diff.traceback   # oldest frame first: the allocating line is the last
    return {"site": _site(frames[-1]) if len(frames) else "?", "size_diff": diff.size_diff, "size": diff.size,
            "count_diff": diff.count_diff, "count": diff.count}


class MemoryReport:
    """The ``/debug/memory`` page of one process. ``structures`` names the daemon's tables
    and their sizes (entries or bytes, as each name says)."""

    def __init__(self, structures: Callable[[], dict[str, int]], top: int = TOP):
        self._structures = structures
        self.top = top
        self._baseline: tracemalloc.Snapshot | None = None
        if tracemalloc.is_tracing():
            self._baseline = self._snapshot()

    def _snapshot(self) -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, name) for name in IGNORED_FILES])

    def growth(self) -> dict:
        """The allocation lines that grew most since the last call (or since tracing
        began), then the call paths that grew most (as many frames as tracing keeps,
        the allocating line last)."""
        snapshot = self._snapshot()
        baseline, self._baseline = self._baseline, snapshot
        traced, peak = tracemalloc.get_traced_memory()
        page: dict = {"traced_bytes": traced, "traced_peak_bytes": peak}
        if baseline is None:
            page["since"] = "no baseline yet: this snapshot is the next call's baseline"
            return page
        page["top_lines"] = [_diff(diff) for diff in snapshot.compare_to(baseline, "lineno")[:self.top]]
        page["top_paths"] = [{**_diff(diff), "traceback": [_site(frame) for frame in diff.traceback]}
                             for diff in snapshot.compare_to(baseline, "traceback")[:self.top // 2]]
        return page

    def page(self, objects: bool = False) -> dict:
        """The report; ``objects``: with object counts by type, after a full collection
        (the heap walked twice: the process does nothing else meanwhile, up to seconds on
        a loaded machine, so only when asked: ``/debug/memory/objects``)."""
        report: dict = {"rss_kib": rss_kib(), "python_blocks": sys.getallocatedblocks(), "malloc": malloc_stats(),
                        "structures": self._structures()}
        if objects:
            # Before counting: cyclic garbage would pass for live objects (see object_counts).
            report["gc"] = {"collected_now": gc.collect(), "objects_by_type": object_counts(self.top)}
        report["tracemalloc"] = self.growth() if tracemalloc.is_tracing() else \
            f"off (start the process with {TRACE_ENV}=<frames> to see which lines allocate)"
        return report

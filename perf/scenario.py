"""The scenario interface: what a ``perf/scenarios/<name>.py`` module provides and gets.

A scenario module defines one module-level ``SCENARIO = Scenario(...)``. The harness
imports every module in ``shoal.perf.scenarios``, runs the selected scenarios one after
the other in the same run (same machine, same bed, same minute), collects the
``Measurement`` objects each one yields, and reports medians and ratios against the
reference path (``direct``) of the same benchmark.

Scenarios that measure the same thing over different paths use the same ``benchmark``
and ``metric`` names and differ in ``path``: that is what lines them up in one table.
The shared pod-to-pod workload lives in ``shoal.perf.pod2pod`` so every path is measured
with the very same tools and settings.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import subprocess

# Well-known path names. Anything else is allowed ("shoal-l4", "shoal-waypoint", ...).
PATH_DIRECT = "direct"
PATH_STUNNEL = "stunnel"
PATH_HAPROXY = "haproxy"

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Measurement:
    """One figure of one path: every repetition's value; the report uses the median.

    ``benchmark`` names the workload ("pod2pod.tcp_stream"); ``path`` the way the bytes
    went ("direct", "stunnel", "shoal-l4"); ``metric`` what was read ("throughput",
    "p50", "p99", "cpu", "rss"). Parameters that change the workload belong in the
    benchmark name ("controller.full_push[pods=5000]") so rows never mix them.
    """

    benchmark: str
    path: str
    metric: str
    unit: str
    samples: tuple[float, ...]
    better: Better = "higher"
    note: str = ""

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"{self.key}: a measurement needs at least one sample")
        if any(not math.isfinite(s) for s in self.samples):
            raise ValueError(f"{self.key}: samples must be finite numbers, got {self.samples}")
        if self.better not in ("higher", "lower"):
            raise ValueError(f"{self.key}: better must be 'higher' or 'lower'")

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.metric}@{self.path}"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass(frozen=True)
class Target:
    """A goal from an issue, checked in the report (never a test failure).

    ``kind``:
      - "ratio":    median(path) / median(against) ``op`` value   (e.g. >= 1.0 x haproxy)
      - "added":    median(path) - median(against) ``op`` value   (e.g. <= 150 us over direct)
      - "absolute": median(path) ``op`` value                     (e.g. rss <= 60 MB)
    """

    benchmark: str
    metric: str
    path: str
    op: Literal["<=", ">="]
    value: float
    kind: Literal["ratio", "added", "absolute"] = "absolute"
    against: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"target op must be '<=' or '>=', got {self.op!r}")
        if self.kind in ("ratio", "added") and not self.against:
            raise ValueError(f"a {self.kind} target needs 'against'")


class Pod(Protocol):
    """A pod of the bed: processes run in its network namespace (and cgroup, on a cluster)."""

    namespace: str
    name: str
    node: str
    ip: str

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> "subprocess.CompletedProcess[str]":
        """Run to completion inside the pod; text stdout/stderr captured."""

    def spawn(self, argv: Sequence[str], *, log: Path | None = None) -> "subprocess.Popen[bytes]":
        """Start a long-running process inside the pod (a server); stop it with ``Bed.stop``."""


class Bed(Protocol):
    """Where pods live: the local Shoal cluster, or a throwaway netns topology."""

    kind: str                    # "cluster" or "netns"
    nodes: tuple[str, ...]       # ("node-1", "node-2")

    def pod(self, namespace: str, name: str, node: str, *, meshed: bool = False,
            service_account: str = "default", labels: Mapping[str, str] | None = None) -> Pod:
        """Create (or return the existing) pod; waits until it has an IP."""

    def stop(self, proc: "subprocess.Popen[bytes]") -> None:
        """Stop a process started with ``Pod.spawn`` (by its PID, with its children)."""

    def close(self) -> None:
        """Remove everything the bed made."""


class Context(Protocol):
    """What the harness hands a scenario's ``run``."""

    quick: bool
    workdir: Path                # scratch dir of this scenario (certs, configs, logs)
    repetitions: int             # how many times to repeat each figure (median is reported)

    @property
    def bed(self) -> Bed:
        """The shared bed, created on first use and removed at the end of the run."""

    def seconds(self, full: float, quick: float) -> float:
        """A duration: ``quick`` under --quick, else ``full``."""

    def log(self, message: str) -> None:
        """Progress line on stderr."""


@dataclass(frozen=True)
class Scenario:
    """What a ``perf/scenarios/<name>.py`` module exports as ``SCENARIO``.

    ``run(ctx)`` yields Measurements as it goes (a failure later keeps the earlier
    figures). ``requires`` lists what must be there, checked before running and reported
    as a skip otherwise: "root", "cluster" (the real Shoal cluster, not the netns
    fallback), and executables as "bin:iperf3". ``order`` sorts scenarios (baselines
    first, so the direct path is measured early in the run). ``timeout`` (seconds, for a
    full run; a third of it under --quick, at least 60 s) stops a scenario that hangs:
    the harness raises ``ScenarioTimeout`` inside it, so its own cleanup still runs.
    ``told_seconds(quick)``, if given, is how long the run was told to take on top (a
    soak's length, read when the run starts): added whole, never divided under --quick.
    """

    name: str
    title: str
    run: Callable[[Context], Iterable[Measurement]]
    requires: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    order: int = 50
    timeout: float = 900.0
    told_seconds: Callable[[bool], float] | None = None

    def time_limit(self, quick: bool) -> float:
        budget = max(60.0, self.timeout / 3) if quick else self.timeout
        return budget + (self.told_seconds(quick) if self.told_seconds else 0.0)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"scenario name must be [A-Za-z0-9_-]+, got {self.name!r}")
        if self.timeout <= 0:
            raise ValueError(f"scenario {self.name}: timeout must be positive")


class ScenarioTimeout(Exception):
    """Raised inside a scenario that ran past its ``timeout``."""

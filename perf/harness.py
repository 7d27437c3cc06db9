"""Discovers scenario modules, runs the selected ones on one bed, and builds the report."""
from __future__ import annotations

import datetime
import fcntl
import importlib
import os
import pkgutil
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shoal.perf import report
from shoal.perf.scenario import Bed, Measurement, Scenario, ScenarioTimeout

SCENARIO_PACKAGE = "shoal.perf.scenarios"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BED_KINDS = ("auto", "cluster", "netns")


LOCK_DIR = Path("/run/shoal")
LOCK_WAIT = 900.0
PER_CLUSTER = "per-cluster"


def bench_lock(cluster: str | None = None) -> Path:
    """The lock of one bench cluster (``SHOAL_PERF_CLUSTER``, default ``perf``): two runs on
    one cluster would tear it down under each other; runs on differently named clusters
    (an hour's soak beside a short run) may overlap, and their figures say "under load"."""
    return LOCK_DIR / f"perf-bench-{cluster or os.environ.get('SHOAL_PERF_CLUSTER', 'perf')}.lock"


class SelectionError(ValueError):
    """--only named a scenario that does not exist."""


class BusyError(RuntimeError):
    """Another benchmark run holds the machine (and the ``perf`` cluster)."""


@contextmanager
def exclusive_run(path: Path | None, say: Callable[[str], None], wait: float = LOCK_WAIT) -> Iterator[None]:
    """One benchmark run at a time on this machine.

    Two runs would share (and tear down) the same ``perf`` cluster, and would skew each
    other's figures anyway. A second run waits for the first, then fails after ``wait``.
    """
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                if time.monotonic() > deadline:
                    raise BusyError(f"another benchmark run (pid {holder}) held {path} for {wait:.0f} s") from None
                if not told:
                    say(f"waiting for another benchmark run to finish (pid {holder}, lock {path})")
                    told = True
                time.sleep(1.0)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Discovered:
    scenarios: tuple[Scenario, ...]
    broken: tuple[tuple[str, str], ...]      # (module, error) of modules that failed to load


def discover(package: str = SCENARIO_PACKAGE) -> Discovered:
    """Import every module of the package and collect its ``SCENARIO``."""
    pkg = importlib.import_module(package)
    found: list[Scenario] = []
    broken: list[tuple[str, str]] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - one broken module must not hide everyone else's figures
            broken.append((info.name, f"import failed: {type(exc).__name__}: {exc}"))
            continue
        scenario = getattr(module, "SCENARIO", None)
        if not isinstance(scenario, Scenario):
            broken.append((info.name, "module has no SCENARIO = Scenario(...)"))
            continue
        found.append(scenario)
    names = [s.name for s in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate scenario names: {', '.join(duplicates)}")
    return Discovered(tuple(sorted(found, key=lambda s: (s.order, s.name))), tuple(broken))


def select(scenarios: Sequence[Scenario], only: Sequence[str]) -> list[Scenario]:
    if not only:
        return list(scenarios)
    known = {s.name for s in scenarios}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise SelectionError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [s for s in scenarios if s.name in only]


def unmet_requirements(scenario: Scenario, bed_kind: str, is_root: bool,
                       which: Callable[[str], str | None] = shutil.which) -> list[str]:
    missing = []
    for need in scenario.requires:
        if need == "root":
            if not is_root:
                missing.append("needs root")
        elif need == "cluster":
            if bed_kind != "cluster":
                missing.append(f"needs the Shoal cluster bed (this run uses {bed_kind})")
        elif need.startswith("bin:"):
            if which(need[4:]) is None:
                missing.append(f"{need[4:]} is not installed")
        else:
            missing.append(f"unknown requirement {need!r}")
    return missing


def cluster_available() -> bool:
    """The local cluster exists once ``shoal.local.cluster`` (the lead's ``shoal up``) is installed."""
    try:
        module = importlib.import_module("shoal.local.cluster")
    except ImportError:
        return False
    return hasattr(module, "LocalCluster")


def resolve_bed_kind(requested: str) -> str:
    if requested not in BED_KINDS:
        raise ValueError(f"bed must be one of {', '.join(BED_KINDS)}")
    if requested == "auto":
        return "cluster" if cluster_available() else "netns"
    return requested


def make_bed(kind: str, log: Callable[[str], None], fallback: bool = False) -> Bed:
    """The bed of this run. With ``fallback`` (``--bed auto``), a cluster that does not come
    up is reported and replaced by the netns bed, so the peers are still measured."""
    if kind == "cluster":
        from shoal.perf.beds.cluster import BedError, ClusterBed
        try:
            return ClusterBed(log=log).up()
        except BedError as exc:
            if not fallback:
                raise
            log(f"bed: the cluster did not come up ({exc}); falling back to the netns bed, "
                "scenarios that need the cluster will be skipped")
    from shoal.perf.beds.netns import NetnsBed
    log("bed: throwaway netns topology (2 nodes)")
    return NetnsBed().up()


@dataclass
class RunContext:
    """The ``Context`` a scenario gets; the bed is created on first use."""

    quick: bool
    workdir: Path
    bed_kind: str
    _bed_holder: dict[str, Bed]
    repetitions: int = 3
    _log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))
    bed_fallback: bool = False
    _bed_failure: dict[str, Exception] = field(default_factory=dict)

    @property
    def bed(self) -> Bed:
        if "bed" not in self._bed_holder:
            failure = self._bed_failure.get("error")
            if failure is not None:
                raise RuntimeError(f"the bed could not be made earlier in this run: {failure}")
            try:
                self._bed_holder["bed"] = make_bed(self.bed_kind, self._log, self.bed_fallback)
            except Exception as exc:  # remembered so later scenarios fail fast instead of retrying
                self._bed_failure["error"] = exc
                raise
        return self._bed_holder["bed"]

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def log(self, message: str) -> None:
        self._log(message)


@contextmanager
def time_limit(seconds: float | None, name: str) -> Iterator[None]:
    """Raise ``ScenarioTimeout`` in the main thread after ``seconds`` (SIGALRM).

    Nests with an alarm already set (pytest-timeout's): a shorter outer one is left alone,
    a longer one is re-armed afterwards with what remains of it.
    """
    outer_remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    if seconds is None or (outer_remaining and outer_remaining <= seconds):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise ScenarioTimeout(f"scenario {name} ran past its {seconds:.0f} s limit")

    began = time.monotonic()
    outer_handler = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_remaining:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, outer_remaining - (time.monotonic() - began)))


@contextmanager
def closing_iterator(figures: Iterable[Measurement]) -> Iterator[Iterator[Measurement]]:
    """Iterate a scenario's figures and always close its generator, so its own cleanup
    (servers, peers) runs now, before the bed goes away, not whenever it is collected."""
    iterator = iter(figures)
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def host_info() -> dict[str, object]:
    load1, _, _ = os.getloadavg()
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load1": round(load1, 2)}


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


SCRATCH_PARENT = Path("/srv/shoal-perf")


def _scratch_dir() -> Path:
    """The run's scratch folder. Not under /tmp: pods get a private /tmp (and /run), so
    the peers' configs and certificates must live where the pod sandbox shows the
    machine's files (read-only)."""
    SCRATCH_PARENT.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=SCRATCH_PARENT))
    scratch.chmod(0o755)
    return scratch


def run(only: Sequence[str] = (), quick: bool = False, bed: str = "auto",
        results_dir: Path = RESULTS_DIR, log: Callable[[str], None] | None = None,
        package: str = SCENARIO_PACKAGE, lock: Path | str | None = PER_CLUSTER, enforce_timeouts: bool = False,
        repetitions: int | None = None) -> tuple[dict[str, object], tuple[Path, Path]]:
    """Run the selection; return the JSON document and the paths of the written report."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    discovered = discover(package)
    selected = select(discovered.scenarios, only)
    with exclusive_run(bench_lock() if lock == PER_CLUSTER else Path(lock) if lock else None, say):
        return _run(discovered, selected, only, quick, bed, results_dir, say, enforce_timeouts,
                    repetitions or (3 if quick else 5))


def _run(discovered: Discovered, selected: Sequence[Scenario], only: Sequence[str], quick: bool,
         bed: str, results_dir: Path, say: Callable[[str], None], enforce_timeouts: bool,
         repetitions: int) -> tuple[dict[str, object], tuple[Path, Path]]:
    started = datetime.datetime.now(datetime.timezone.utc)
    bed_kind = resolve_bed_kind(bed)
    is_root = os.geteuid() == 0
    holder: dict[str, Bed] = {}
    bed_failure: dict[str, Exception] = {}
    outcomes: list[report.ScenarioOutcome] = [
        report.ScenarioOutcome(name, "(broken module)", "failed", reason=error)
        for name, error in discovered.broken if not only or name in only]
    measurements: list[Measurement] = []
    scratch = _scratch_dir()
    host = host_info()
    try:
        for scenario in selected:
            if "bed" in holder:
                bed_kind = holder["bed"].kind  # after a fallback, "cluster" needs are unmet
            missing = unmet_requirements(scenario, bed_kind, is_root)
            if missing:
                say(f"skip {scenario.name}: {'; '.join(missing)}")
                outcomes.append(report.ScenarioOutcome(scenario.name, scenario.title, "skipped",
                                                       reason="; ".join(missing)))
                continue
            say(f"run {scenario.name}: {scenario.title}")
            workdir = scratch / scenario.name
            workdir.mkdir()
            ctx = RunContext(quick=quick, workdir=workdir, bed_kind=bed_kind, _bed_holder=holder,
                             repetitions=repetitions, _log=say, bed_fallback=bed == "auto",
                             _bed_failure=bed_failure)
            began = time.monotonic()
            try:
                limit = scenario.time_limit(quick) if enforce_timeouts else None
                with time_limit(limit, scenario.name), closing_iterator(scenario.run(ctx)) as figures:
                    for measurement in figures:
                        if not isinstance(measurement, Measurement):
                            raise TypeError(f"scenario yielded {type(measurement).__name__}, not a Measurement")
                        measurements.append(measurement)
                outcomes.append(report.ScenarioOutcome(scenario.name, scenario.title, "ok",
                                                       time.monotonic() - began))
            except Exception as exc:  # noqa: BLE001 - reported in the run's table; the other scenarios still run
                say(f"{scenario.name} failed:\n{traceback.format_exc()}")
                outcomes.append(report.ScenarioOutcome(scenario.name, scenario.title, "failed",
                                                       time.monotonic() - began,
                                                       f"{type(exc).__name__}: {exc}"))
    finally:
        if "bed" in holder:
            say("bed: removing")
            holder["bed"].close()
        shutil.rmtree(scratch, ignore_errors=True)
    finished = datetime.datetime.now(datetime.timezone.utc)
    host["load1_end"] = round(os.getloadavg()[0], 2)   # a busy machine explains wide spreads
    run_report = report.RunReport(
        started=started.isoformat(timespec="seconds"), finished=finished.isoformat(timespec="seconds"),
        quick=quick, bed=holder["bed"].kind if holder else None, host=host, outcomes=outcomes,
        measurements=measurements, targets=[t for s in selected for t in s.targets])
    doc = report.to_json(run_report)
    paths = report.write(doc, results_dir, _stamp(started))
    return doc, paths

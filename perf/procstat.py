"""CPU and memory of processes from /proc, for scenarios that report them.

CPU is (utime + stime) ticks consumed between two readings, divided by the wall time:
1.0 means one full core. RSS is ``VmRSS`` from /proc/PID/status.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_stat_cpu_ticks(stat_line: str) -> int:
    """utime + stime from a /proc/PID/stat line (the comm field may hold spaces and parens)."""
    close = stat_line.rfind(")")
    if close < 0:
        raise ValueError("not a /proc/PID/stat line: no ')' after comm")
    fields = stat_line[close + 2:].split()
    # After comm: state(3) ppid ... utime is field 14, stime 15 (1-based) -> 11, 12 here.
    if len(fields) < 13:
        raise ValueError("truncated /proc/PID/stat line")
    return int(fields[11]) + int(fields[12])


def parse_status_rss_kib(status_text: str) -> int:
    """VmRSS in KiB from /proc/PID/status (0 for kernel threads and zombies, which have none)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"bad VmRSS line: {line!r}")
            return int(parts[1])
    return 0


def cpu_ticks(pid: int) -> int:
    return parse_stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) ``pid`` has used so far, in seconds (clock-tick steps)."""
    return cpu_ticks(pid) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    return parse_status_rss_kib(Path(f"/proc/{pid}/status").read_text()) / 1024


def pids_in_cgroup(cgroup: Path) -> list[int]:
    """Every PID in a cgroup v2 folder and its descendants."""
    pids: list[int] = []
    for procs in [cgroup / "cgroup.procs", *sorted(cgroup.rglob("*/cgroup.procs"))]:
        if procs.exists():
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1])


def split_supervisors(pids: Iterable[int]) -> tuple[list[int], list[int]]:
    """(workers, supervisors): a process that is the parent of another in ``pids`` is a
    supervisor (a node proxy's with N > 1 workers, which carries no connection); the rest,
    a single process included, carry the data path. Processes gone meanwhile are left out."""
    parents: dict[int, int] = {}
    for pid in pids:
        try:
            parents[pid] = parent_pid(pid)
        except (OSError, ValueError, IndexError):
            continue
    supervisors = {ppid for ppid in parents.values() if ppid in parents}
    return sorted(set(parents) - supervisors), sorted(supervisors)


def totals_per_supervisor(rss_mb: dict[int, float], supervisors: Iterable[int]) -> dict[int, float]:
    """Each node proxy's RSS in all, by its top pid: a supervisor with the workers it started
    (``split_supervisors``), a single process alone. Processes gone meanwhile are left out."""
    totals: dict[int, float] = {}
    tops = set(supervisors)
    for pid, mb in rss_mb.items():
        try:
            top = pid if pid in tops else parent_pid(pid)
        except (OSError, ValueError, IndexError):
            continue
        top = top if top in tops else pid
        totals[top] = totals.get(top, 0.0) + mb
    return totals


def parse_stat_pgid_comm(stat_line: str) -> tuple[int, str, str]:
    """(process group id, comm, state letter) from a /proc/PID/stat line."""
    open_, close = stat_line.find("("), stat_line.rfind(")")
    if open_ < 0 or close < 0:
        raise ValueError("not a /proc/PID/stat line")
    fields = stat_line[close + 2:].split()
    if len(fields) < 3:
        raise ValueError("truncated /proc/PID/stat line")
    return int(fields[2]), stat_line[open_ + 1:close], fields[0]


def pids_in_group(pgid: int, comm: str | None = None, proc: Path = Path("/proc")) -> list[int]:
    """PIDs of process group ``pgid`` (what ``Pod.spawn`` made), optionally only those named ``comm``.

    A pod's process may sit under wrappers (``shoal exec``, ``ip netns exec``, a shell);
    filtering by name measures the tool itself, not its idle wrappers. Zombies (exited,
    not yet reaped) are left out.
    """
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            group, name, state = parse_stat_pgid_comm((entry / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        if group == pgid and state != "Z" and (comm is None or name == comm):
            found.append(int(entry.name))
    return sorted(found)


@dataclass(frozen=True)
class Usage:
    cpu_cores: float      # average over the window
    rss_peak_mb: float    # sum over the processes, highest reading
    rss_mean_mb: float
    seconds: float


class ProcessSampler:
    """Samples a set of processes in a thread while a workload runs.

    >>> with ProcessSampler([proxy_pid]) as sampler:
    ...     run_load()
    >>> sampler.usage.cpu_cores
    """

    def __init__(self, pids: Iterable[int], interval: float = 0.2) -> None:
        self.pids = tuple(pids)
        if not self.pids:
            raise ValueError("ProcessSampler needs at least one PID")
        self.interval = interval
        self._rss: list[float] = []
        self._timeline: dict[int, list[tuple[float, float]]] = {}   # pid -> (seconds since start, MB)
        self._latest: dict[int, float] = {}
        self._peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="perf-sampler", daemon=True)
        self._start_ticks = 0
        self._start_time = 0.0
        self.usage: Usage | None = None

    def _ticks(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                total += cpu_ticks(pid)
            except FileNotFoundError:
                continue  # exited during the window: its last ticks are lost, say so in notes
        return total

    def _rss_total(self) -> float:
        latest = {}
        now = time.monotonic() - self._start_time
        for pid in self.pids:
            try:
                latest[pid] = rss_mb(pid)
            except FileNotFoundError:
                continue
            self._peaks[pid] = max(latest[pid], self._peaks.get(pid, 0.0))
            self._timeline.setdefault(pid, []).append((now, latest[pid]))
        self._latest = latest
        return sum(latest.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._rss.append(self._rss_total())

    def __enter__(self) -> "ProcessSampler":
        self._start_ticks = self._ticks()
        self._start_time = time.monotonic()
        self._rss.append(self._rss_total())
        self._thread.start()
        return self

    @property
    def rss_samples_mb(self) -> tuple[float, ...]:
        """Every RSS reading so far (MB, the processes together), oldest first."""
        return tuple(self._rss)

    @property
    def rss_timeline_mb(self) -> dict[int, tuple[tuple[float, float], ...]]:
        """Each process's RSS readings as (seconds since the sampler started, MB), oldest first."""
        return {pid: tuple(readings) for pid, readings in self._timeline.items()}

    @property
    def latest_rss_mb(self) -> dict[int, float]:
        """The last RSS reading of each process (MB)."""
        return dict(self._latest)

    @property
    def rss_peak_per_process_mb(self) -> dict[int, float]:
        """Each process's highest RSS reading (MB): a per-worker limit is checked on these."""
        return dict(self._peaks)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        seconds = time.monotonic() - self._start_time
        ticks = self._ticks() - self._start_ticks
        self._rss.append(self._rss_total())
        self.usage = Usage(cpu_cores=ticks / CLOCK_TICKS / seconds if seconds > 0 else 0.0,
                           rss_peak_mb=max(self._rss), rss_mean_mb=sum(self._rss) / len(self._rss),
                           seconds=seconds)

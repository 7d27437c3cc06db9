"""Issue 18's load targets through two Shoal node proxies: many concurrent connections,
and a soak at a steady connection rate.

- ``proxy.idle``: the RSS of the largest node proxy process (a worker, or the single
  process) with the pods enrolled and no connection yet (issue 13: <= 60 MB per worker).
- ``proxy.concurrent[conns=N]``: a client pod (node-1) opens N connections at once to an
  echo app (node-2), holds every one until all have exchanged a line, then pings each
  for a few seconds. Figures: the fraction that succeeded, seconds to open them all,
  and the peak RSS of the largest node proxy process meanwhile (targets: <= 120 MB at
  1,000, issue 13; <= 150 MB at 10,000, issue 18). Runs 1,000 then 10,000.
- ``proxy.soak[rate=R/s]``: R new connections a second for the run's duration (each a
  line echoed), with each node proxy process's RSS sampled every second: failures, and
  RSS growth after warm-up (the first quarter of the run), read off a least-squares line
  through the rest, for the process that grew most (target 0 and <= 5 %).

Full size is 1,000 then 10,000 connections and a 10-minute soak (the issue's 1 h soak:
``SHOAL_PERF_SOAK_SECONDS=3600``); ``--quick`` runs 1,000 then 2,000 connections and a 60 s
soak; ``SHOAL_PERF_LOAD_CONNECTIONS`` sets the counts (comma-separated, e.g. ``1000``). Either
set to 0 skips that part (a soak-only run:
``SHOAL_PERF_LOAD_CONNECTIONS=0 SHOAL_PERF_SOAK_SECONDS=3600``). Failures are reported by
reason (exception type and errno, client side) beside the refusals both node proxies
counted during that part (burst and soak each). The soak's failures and slow (> 1 s)
connections are also given per 5 s of start time, and ``failures_after_burst`` counts
those started in its first 15 s, right after the concurrent part's connections closed:
trouble bunched after a burst, or spread over the run.
The HTTP/2 floods are scaled down in ``make test`` (tests/agent/ztunnel/test_proxy_load.py).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from shoal.config import PORT_PROXY_METRICS
from shoal.perf import pod2pod, procstat
from shoal.perf.connscripts import ECHO_APP, HOLD_CLIENT, SOAK_CLIENT
from shoal.perf.scenario import Context, Measurement, Scenario, Target

NAMESPACE = "perf-load"
PATH = "shoal-l4"
PORT = 9100
FULL, QUICK = 10_000, 2_000
ONE_THOUSAND = 1_000
IDLE = "proxy.idle"
FULL_SOAK, QUICK_SOAK = 600.0, 60.0
SOAK_RATE = 200

def concurrent_benchmark(count: int) -> str:
    return f"proxy.concurrent[conns={count}]"


SOAK = f"proxy.soak[rate={SOAK_RATE}/s]"


def connection_counts(quick: bool) -> tuple[int, ...]:
    """Concurrent connections to open, one run per count (0 or nothing: skip that part,
    e.g. for a soak-only run)."""
    given = os.environ.get("SHOAL_PERF_LOAD_CONNECTIONS")
    if given is None:
        return (ONE_THOUSAND, QUICK if quick else FULL)
    return tuple(count for count in (int(item) for item in given.split(",") if item.strip()) if count > 0)


def soak_seconds(quick: bool) -> float:
    """Length of the soak (0: skip it)."""
    return float(os.environ.get("SHOAL_PERF_SOAK_SECONDS", QUICK_SOAK if quick else FULL_SOAK))


def _run_client(ctx: Context, client, argv: list[str], name: str, timeout: float,
                proxies) -> tuple[dict, procstat.ProcessSampler]:
    """Runs a client script in the pod while sampling the proxies; its JSON summary (the
    last line it prints). Every minute, logs the client's latest progress line and the
    proxies' RSS, so a long soak can be watched."""
    log = ctx.workdir / f"{name}.log"
    deadline = time.monotonic() + timeout
    with procstat.ProcessSampler(proxies(), interval=1.0) as sampler:
        proc = client.spawn([sys.executable, "-c", *argv], log=log)
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    proc.wait(min(60.0, max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    lines = log.read_text().strip().splitlines() if log.exists() else []
                    rss = " + ".join(f"{mb:.1f}" for mb in sampler.latest_rss_mb.values())
                    ctx.log(f"  {name}: {lines[-1] if lines else '(no output yet)'}; proxies' RSS {rss} MB")
        finally:
            ctx.bed.stop(proc)
    lines = log.read_text().strip().splitlines() if log.exists() else []
    try:
        return json.loads(lines[-1]), sampler
    except (IndexError, ValueError):
        raise RuntimeError(f"{name}: no summary from the client: {' | '.join(lines[-3:])}") from None


def run(ctx: Context) -> Iterator[Measurement]:
    client = ctx.bed.pod(NAMESPACE, "client", "node-1", meshed=True, service_account="client")
    server = ctx.bed.pod(NAMESPACE, "server", "node-2", meshed=True, service_account="server")
    proxies = lambda: ctx.bed.component_pids("proxy", nodes=("node-1", "node-2"))
    echo = _start_echo(ctx, server)
    try:
        yield from pod2pod.idle_rss(proxies, IDLE, PATH)
        for count in connection_counts(ctx.quick):
            yield from _concurrent(ctx, client, server, proxies, count)
        seconds = soak_seconds(ctx.quick)
        if seconds > 0:
            yield from _soak(ctx, client, server, proxies, seconds)
    finally:
        ctx.bed.stop(echo)


ECHO_START_TIMEOUT = 60.0   # a python app on a loaded machine takes seconds to start


def _start_echo(ctx: Context, server):
    """The echo app, once it listens. Connections before that fail at the inbound proxy's
    upstream connect (counted as the proxies' failures); on a loaded machine the pod's
    process may not even be there yet ("no running process to enter"): started again."""
    log = ctx.workdir / "echo.log"
    deadline = time.monotonic() + ECHO_START_TIMEOUT
    while True:
        echo = server.spawn([sys.executable, "-c", ECHO_APP, str(PORT)], log=log)
        while echo.poll() is None and time.monotonic() < deadline:
            if log.exists() and "listening" in log.read_text():
                return echo
            time.sleep(0.2)
        output = log.read_text()[-300:] if log.exists() else "(no output)"
        ctx.bed.stop(echo)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the echo app did not start in {ECHO_START_TIMEOUT:.0f} s: {output}")
        ctx.log(f"  echo app exited before listening ({output.strip()}), starting it again")
        time.sleep(1.0)


REFUSAL_METRICS = ("shoal_proxy_rejected_total", "shoal_proxy_accept_paused_total")


def parse_refusals(metrics_text: str) -> dict[str, float]:
    """``listener/reason`` (or ``listener/accept_paused``) -> count, from a proxy's /metrics."""
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name, _, rest = line.partition("{")
        if name not in REFUSAL_METRICS or "}" not in rest:
            continue
        labels_text, _, value = rest.rpartition("}")
        labels = dict(item.split("=", 1) for item in labels_text.split(",") if "=" in item)
        listener = labels.get("listener", '""').strip('"')
        reason = labels.get("reason", '"accept_paused"').strip('"')
        counts[f"{listener}/{reason}"] = counts.get(f"{listener}/{reason}", 0.0) + float(value)
    return counts


def proxy_refusals(ctx: Context) -> dict[str, float]:
    """Refusals and accept pauses counted by both node proxies so far (their /metrics on
    15020 in each node's namespace); empty when they cannot be read."""
    totals: dict[str, float] = {}
    for node in ("node-1", "node-2"):
        done = subprocess.run(["ip", "netns", "exec", ctx.bed.layout.node_netns(node), "curl", "-s", "-m", "20",
                               f"http://127.0.0.1:{PORT_PROXY_METRICS}/metrics"],
                              capture_output=True, text=True, timeout=30)
        for key, value in parse_refusals(done.stdout).items():
            totals[f"{node} {key}"] = totals.get(f"{node} {key}", 0.0) + value
    return totals


def _concurrent(ctx: Context, client, server, proxies, count: int) -> Iterator[Measurement]:
    ctx.log(f"  {count} concurrent connections through the node proxies")
    before = proxy_refusals(ctx)
    summary, sampler = _run_client(ctx, client, [HOLD_CLIENT, server.ip, str(PORT), str(count), "5"],
                                   "concurrent", 600, proxies)
    refused = refusal_delta(before, proxy_refusals(ctx))
    bench = concurrent_benchmark(count)
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary.get("reasons", {}).items())) or "none"
    ctx.log(f"  concurrent: client failures {reasons}; the proxies counted {refused}")
    yield Measurement(bench, PATH, "succeeded", "fraction", (summary["ok"] / count,), "higher",
                      f"{summary['n_failed']} failed ({reasons}), {len(summary['lost'])} lost while held; "
                      f"the proxies counted: {refused}")
    yield Measurement(bench, PATH, "open_time", "s", (summary["open_seconds"],), "lower",
                      "all connections opened and echoed once")
    if sampler.usage:
        yield Measurement(bench, PATH, "rss", "MB", (max(sampler.rss_peak_per_process_mb.values()),), "lower",
                          "peak of the larger node proxy (per worker); both together "
                          f"{sampler.usage.rss_peak_mb:.0f} MB")


def refusal_delta(before: dict[str, float], after: dict[str, float]) -> str:
    """What the proxies counted between two ``proxy_refusals`` readings, for a note."""
    return ", ".join(f"{after[k] - before.get(k, 0):.0f} {k}" for k in sorted(after)
                     if after[k] > before.get(k, 0)) or "none"


def _soak(ctx: Context, client, server, proxies, seconds: float) -> Iterator[Measurement]:
    ctx.log(f"  soak: {SOAK_RATE} connections/s for {seconds:.0f} s")
    before = proxy_refusals(ctx)
    summary, sampler = _run_client(ctx, client, [SOAK_CLIENT, server.ip, str(PORT), str(SOAK_RATE), str(seconds)],
                                   "soak", seconds + 300, proxies)
    refused = refusal_delta(before, proxy_refusals(ctx))
    total = int(SOAK_RATE * seconds)
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary["reasons"].items())) or "none"
    spread = failure_spread(summary)
    ctx.log(f"  soak: client failures {reasons}; the proxies counted {refused}; {spread}")
    yield Measurement(SOAK, PATH, "failures", "count", (float(summary["failed"]),), "lower",
                      f"{summary['ok']} of {total} succeeded; failures: {reasons}; {spread}; "
                      f"the proxies counted: {refused}")
    if summary.get("failed_by_window") is not None:
        yield Measurement(SOAK, PATH, "failures_after_burst", "count",
                          (float(failures_in_first(summary, AFTER_BURST_SECONDS)),), "lower",
                          f"failures of the connections started in the soak's first {AFTER_BURST_SECONDS:.0f} s "
                          "(right after the concurrent part's connections closed)")
    if summary.get("p99") is not None:
        yield Measurement(SOAK, PATH, "p99", "ms", (summary["p99"] * 1000,), "lower",
                          f"connect + one echo; p50 {summary['p50'] * 1000:.1f} ms")
    growths = {pid: growth for pid, readings in sampler.rss_timeline_mb.items()
               if (growth := steady_growth(readings)) is not None}
    if growths:
        worst = max(growths, key=lambda pid: growths[pid].percent)
        each = "; ".join(f"{readings[0][1]:.1f} MB at start, {growths[pid].start_mb:.1f} after warm-up, "
                         f"{readings[-1][1]:.1f} at the end ({growths[pid].percent:+.1f} %, "
                         f"{growths[pid].mb_per_hour:+.1f} MB/h)"
                         for pid, readings in sampler.rss_timeline_mb.items() if pid in growths)
        yield Measurement(SOAK, PATH, "rss_growth", "%", (growths[worst].percent,), "lower",
                          f"the node proxy that grew most, after a warm-up of the first {WARMUP_FRACTION:.0%} "
                          f"of the run (least-squares line through the rest); each: {each}")


AFTER_BURST_SECONDS = 15.0


def failures_in_first(summary: dict, seconds: float) -> int:
    """Failures of the soak's connections that started in its first ``seconds``."""
    return sum(count for start, count in summary.get("failed_by_window", {}).items() if float(start) < seconds)


def failure_spread(summary: dict) -> str:
    """Where in the run failures and slow (> 1 s) connections fell, per window of start
    time: bunched after a burst or spread over the run."""
    window = summary.get("window")
    if window is None:
        return "no per-window figures"
    def listing(counts: dict) -> str:
        return ", ".join(f"{int(start)}-{int(start) + window} s: {n}" for start, n in counts.items()) or "none"
    return (f"failures by start time {listing(summary['failed_by_window'])}; "
            f"slower than 1 s {listing(summary['slow_by_window'])}")


WARMUP_FRACTION = 0.25
MIN_READINGS = 8


@dataclass(frozen=True)
class Growth:
    start_mb: float       # the fitted line where the steady window begins
    percent: float        # its rise over the window, against start_mb
    mb_per_hour: float    # its slope


def steady_growth(readings: Sequence[tuple[float, float]], warmup: float = WARMUP_FRACTION) -> Growth | None:
    """How one process's RSS grows once warmed up: the least-squares line through the
    readings (seconds, MB) after the first ``warmup`` of the run, its rise from the
    window's start to its end. The warm-up (imports done, pools, buffers and allocator
    arenas filled for this load) is left out rather than taken as the baseline: memory
    that plateaus after it is not growth, memory that keeps rising at a steady rate is,
    however it is spread over the run, and a fit is not swayed by one noisy reading as two
    quarter medians of a sum over processes were. None with too few readings to say."""
    if len(readings) < MIN_READINGS:
        return None
    begin, end = readings[0][0], readings[-1][0]
    window = [(t, mb) for t, mb in readings if t >= begin + warmup * (end - begin)]
    if len(window) < MIN_READINGS // 2 or window[-1][0] <= window[0][0]:
        return None
    slope, intercept = statistics.linear_regression([t for t, _ in window], [mb for _, mb in window])
    start = intercept + slope * window[0][0]
    if start <= 0:
        return None
    rise = slope * (window[-1][0] - window[0][0])
    return Growth(start_mb=start, percent=rise / start * 100, mb_per_hour=slope * 3600)


SCENARIO = Scenario(
    name="load",
    title="Node proxy under load: 10,000 concurrent connections, soak at 200 connections/s",
    run=run,
    requires=("root", "cluster"),
    targets=(
        Target(IDLE, "rss", PATH, "<=", 60, label="60 MB per worker"),
        Target(concurrent_benchmark(ONE_THOUSAND), "rss", PATH, "<=", 120, label="120 MB per worker"),
        Target(concurrent_benchmark(FULL), "succeeded", PATH, ">=", 1.0),
        Target(concurrent_benchmark(FULL), "rss", PATH, "<=", 150, label="150 MB per worker"),
        Target(SOAK, "failures", PATH, "<=", 0),
        Target(SOAK, "rss_growth", PATH, "<=", 5),
    ),
    order=60,
    # The concurrent part takes a few minutes; the soak as long as it is told (an hour),
    # read when the run starts (SHOAL_PERF_SOAK_SECONDS), whole even under --quick.
    timeout=1800.0,
    told_seconds=soak_seconds,
)

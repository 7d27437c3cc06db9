"""Issue 18's load targets through two Shoal node proxies: many concurrent connections,
and a soak at a steady connection rate.

- ``proxy.concurrent[conns=N]``: a client pod (node-1) opens N connections at once to an
  echo app (node-2), holds every one until all have exchanged a line, then pings each
  for a few seconds. Figures: the fraction that succeeded, seconds to open them all,
  and the peak RSS of the largest node proxy meanwhile (target <= 150 MB at 10,000).
- ``proxy.soak[rate=R/s]``: R new connections a second for the run's duration (each a
  line echoed), with the node proxies' RSS sampled: failures, and RSS growth from the
  first to the last quarter (target 0 and <= 5 %).

Full size is 10,000 connections and a 10-minute soak (the issue's 1 h soak:
``SHOAL_PERF_SOAK_SECONDS=3600``); ``--quick`` runs 2,000 connections and a 60 s soak;
``SHOAL_PERF_LOAD_CONNECTIONS`` sets the count.
The HTTP/2 floods are scaled down in ``make test`` (tests/agent/ztunnel/test_zt_load.py).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Iterator

from shoal.perf import procstat
from shoal.perf.connscripts import ECHO_APP, HOLD_CLIENT
from shoal.perf.scenario import Context, Measurement, Scenario, Target

NAMESPACE = "perf-load"
PATH = "shoal-l4"
PORT = 9100
FULL, QUICK = 10_000, 2_000
SOAK_RATE = 200

# Opens RATE connections a second for SECONDS, each echoing a line; prints a JSON summary.
_SOAK_CLIENT = """
import asyncio, json, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ok, failed = 0, []
async def one(i):
    global ok
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        w.write(b"soak %d\\n" % i)
        if await asyncio.wait_for(r.readexactly(len(b"soak %d\\n" % i)), 10) == b"soak %d\\n" % i:
            ok += 1
        w.close()
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        failed.append(repr(exc))
async def main():
    tasks, start = [], time.monotonic()
    for i in range(int(rate * seconds)):
        tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.sleep(max(0, start + (i + 1) / rate - time.monotonic()))
    await asyncio.gather(*tasks)
    print(json.dumps({"ok": ok, "failed": len(failed), "errors": failed[:10]}))
asyncio.run(main())
"""


def concurrent_benchmark(count: int) -> str:
    return f"proxy.concurrent[conns={count}]"


SOAK = f"proxy.soak[rate={SOAK_RATE}/s]"


def _run_client(ctx: Context, client, argv: list[str], name: str, timeout: float,
                proxies) -> tuple[dict, procstat.ProcessSampler]:
    """Runs a client script in the pod while sampling the proxies; its JSON summary."""
    log = ctx.workdir / f"{name}.log"
    with procstat.ProcessSampler(proxies(), interval=1.0) as sampler:
        proc = client.spawn([sys.executable, "-c", *argv], log=log)
        try:
            proc.wait(timeout)
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
    echo = server.spawn([sys.executable, "-c", ECHO_APP, str(PORT)], log=ctx.workdir / "echo.log")
    try:
        time.sleep(1.0)
        count = int(os.environ.get("SHOAL_PERF_LOAD_CONNECTIONS", QUICK if ctx.quick else FULL))
        ctx.log(f"  {count} concurrent connections through the node proxies")
        summary, sampler = _run_client(ctx, client, [HOLD_CLIENT, server.ip, str(PORT), str(count), "5"],
                                       "concurrent", 600, proxies)
        bench = concurrent_benchmark(count)
        yield Measurement(bench, PATH, "succeeded", "fraction", (summary["ok"] / count,), "higher",
                          f"{summary['n_failed']} failed, {len(summary['lost'])} lost while held")
        yield Measurement(bench, PATH, "open_time", "s", (summary["open_seconds"],), "lower",
                          "all connections opened and echoed once")
        if sampler.usage:
            yield Measurement(bench, PATH, "rss", "MB", (sampler.usage.rss_peak_mb,), "lower",
                              "peak, both node proxies together")
        seconds = float(os.environ.get("SHOAL_PERF_SOAK_SECONDS", ctx.seconds(600, 60)))
        ctx.log(f"  soak: {SOAK_RATE} connections/s for {seconds:.0f} s")
        summary, sampler = _run_client(ctx, client, [_SOAK_CLIENT, server.ip, str(PORT), str(SOAK_RATE),
                                                     str(seconds)], "soak", seconds + 120, proxies)
        total = int(SOAK_RATE * seconds)
        yield Measurement(SOAK, PATH, "failures", "count", (float(summary["failed"]),), "lower",
                          f"{summary['ok']} of {total} succeeded")
        growth = rss_growth(sampler.rss_samples_mb)
        if growth is not None:
            yield Measurement(SOAK, PATH, "rss_growth", "%", (growth,), "lower",
                              "both node proxies: last quarter's median RSS over the first's")
    finally:
        ctx.bed.stop(echo)


def rss_growth(samples: tuple[float, ...]) -> float | None:
    """Percent growth of the median RSS from the first quarter of the run to the last
    (the first quarter is the warm-up); None with too few samples to say."""
    if len(samples) < 8:
        return None
    quarter = len(samples) // 4
    first, last = statistics.median(samples[:quarter]), statistics.median(samples[-quarter:])
    return (last / first - 1) * 100 if first > 0 else None


SCENARIO = Scenario(
    name="load",
    title="Node proxy under load: 10,000 concurrent connections, soak at 200 connections/s",
    run=run,
    requires=("root", "cluster"),
    targets=(
        Target(concurrent_benchmark(FULL), "succeeded", PATH, ">=", 1.0),
        Target(concurrent_benchmark(FULL), "rss", PATH, "<=", 300, label="150 MB per proxy"),
        Target(SOAK, "failures", PATH, "<=", 0),
        Target(SOAK, "rss_growth", PATH, "<=", 5),
    ),
    order=60,
    timeout=2400.0,
)

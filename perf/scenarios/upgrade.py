"""Issue 15's upgrade of a node proxy container (``shoal up --containers``): replacing it
under a steady rate of new connections refuses none, and long-lived connections on the
old proxy are drained, not cut.

On its own containers cluster (``perf-upgrade``: the images of ``make images``), a client
pod on node-1 holds ``HELD`` connections to an echo app on node-2, pinging each every half
second, and opens ``RATE`` new connections a second (each one echoed line); meanwhile
``shoal replace-proxy --node node-1`` replaces node-1's proxy container, the way an
upgrade does (the successor takes over through the restart handover, the old one drains
for the manifest's ``--drain-grace``). Figures: new connections that failed (target 0),
held connections that survived (target: all), and how long the replacement took
(successor started to old container removed). First, the same rate for half as long with
no replacement (``proxy.steady``): what the machine gives without one, to read the rest by.
Held connections end 15 s after the replacement begins, inside the 25 s drain grace.
``--quick`` holds 50 and runs 15 s; full size holds 200 and runs 40 s.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from shoal.local import podman
from shoal.perf.beds.cluster import DEFAULT_CLUSTER, ClusterBed
from shoal.perf.connscripts import ECHO_APP, HOLD_CLIENT, SOAK_CLIENT, summary_of
from shoal.perf.scenario import Context, Measurement, Scenario, Target

NAMESPACE = "perf-upgrade"
PATH = "shoal-l4-containers"
PORT = 9100
RATE = 200
BENCHMARK = f"proxy.replace_container[rate={RATE}/s]"


# Held connections end this long after the replacement starts: inside the manifest's
# --drain-grace (25 s), so surviving means the drain carried them, not that the grace cut them.
HELD_AFTER_REPLACE = 15.0
BASELINE = f"proxy.steady[rate={RATE}/s]"


def _failures(summary: dict, total: int) -> str:
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary["reasons"].items())) or "none"
    p99 = f"{summary['p99'] * 1000:.1f} ms" if summary.get("p99") is not None else "n/a"
    return f"{summary['ok']} of {total} new connections succeeded; failures: {reasons}; p99 connect + echo {p99}"


def run(ctx: Context) -> Iterator[Measurement]:
    missing = podman.available()
    if missing:
        raise RuntimeError(f"needs podman: {missing}")
    held, seconds = (50, 15.0) if ctx.quick else (200, 40.0)
    lead = min(5.0, seconds / 3)   # new connections before the replacement starts
    bed = ClusterBed(name=f"{DEFAULT_CLUSTER}-upgrade", containers=True, log=ctx.log).up()
    try:
        client = bed.pod(NAMESPACE, "client", "node-1", meshed=True, service_account="client")
        server = bed.pod(NAMESPACE, "server", "node-2", meshed=True, service_account="server")
        echo = server.spawn([sys.executable, "-c", ECHO_APP, str(PORT)], log=ctx.workdir / "echo.log")
        try:
            time.sleep(1.0)
            # The same rate with no replacement: what this machine gives without one.
            steady_log = ctx.workdir / "steady.log"
            ctx.log(f"  {RATE} new connections/s for {seconds / 2:.0f} s, no replacement")
            steady = client.spawn([sys.executable, "-c", SOAK_CLIENT, server.ip, str(PORT), str(RATE),
                                   str(seconds / 2)], log=steady_log)
            steady.wait(seconds + 120)
            hold_log, load_log = ctx.workdir / "held.log", ctx.workdir / "new.log"
            hold = client.spawn([sys.executable, "-c", HOLD_CLIENT, server.ip, str(PORT), str(held),
                                 str(5.0 + lead + HELD_AFTER_REPLACE)], log=hold_log)
            time.sleep(5.0)   # all held connections open and pinging
            load = client.spawn([sys.executable, "-c", SOAK_CLIENT, server.ip, str(PORT), str(RATE),
                                 str(seconds)], log=load_log)
            time.sleep(lead)
            ctx.log(f"  replacing node-1's proxy container under {RATE} new connections/s, {held} held")
            started = time.monotonic()
            bed._shoal("replace-proxy", "--node", "node-1", timeout=300)
            replaced = time.monotonic() - started
            load.wait(seconds + 120)
            hold.wait(seconds + 120)
            base, new, kept = summary_of(steady_log), summary_of(load_log), summary_of(hold_log)
        finally:
            bed.stop(echo)
    finally:
        bed.close()
    yield Measurement(BASELINE, PATH, "new_failed", "count", (float(base["failed"]),), "lower",
                      _failures(base, int(RATE * seconds / 2)))
    yield Measurement(BENCHMARK, PATH, "new_failed", "count", (float(new["failed"]),), "lower",
                      _failures(new, int(RATE * seconds)))
    survived = kept["ok"] - len(kept["lost"])
    yield Measurement(BENCHMARK, PATH, "held_survived", "fraction", (survived / held,), "higher",
                      f"{survived} of {held} long-lived connections survived the drain, each ending "
                      f"{HELD_AFTER_REPLACE:.0f} s after the replacement began ({kept['n_failed']} failed to "
                      f"open, {len(kept['lost'])} lost, {kept['pings']} pings)")
    yield Measurement(BENCHMARK, PATH, "replace_time", "s", (replaced,), "lower",
                      "successor started to old container drained and removed")

SCENARIO = Scenario(
    name="upgrade",
    title="Replacing a node proxy container under 200 new connections/s (shoal up --containers)",
    run=run,
    requires=("root",),
    targets=(
        Target(BENCHMARK, "new_failed", PATH, "<=", 0),
        Target(BENCHMARK, "held_survived", PATH, ">=", 1.0),
    ),
    order=65,
    timeout=1200.0,
)

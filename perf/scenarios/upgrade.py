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
(successor started to old container removed).
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


def run(ctx: Context) -> Iterator[Measurement]:
    missing = podman.available()
    if missing:
        raise RuntimeError(f"needs podman: {missing}")
    held, seconds = (50, 15.0) if ctx.quick else (200, 40.0)
    bed = ClusterBed(name=f"{DEFAULT_CLUSTER}-upgrade", containers=True, log=ctx.log).up()
    try:
        client = bed.pod(NAMESPACE, "client", "node-1", meshed=True, service_account="client")
        server = bed.pod(NAMESPACE, "server", "node-2", meshed=True, service_account="server")
        echo = server.spawn([sys.executable, "-c", ECHO_APP, str(PORT)], log=ctx.workdir / "echo.log")
        try:
            time.sleep(1.0)
            hold_log, load_log = ctx.workdir / "held.log", ctx.workdir / "new.log"
            hold = client.spawn([sys.executable, "-c", HOLD_CLIENT, server.ip, str(PORT), str(held),
                                 str(seconds + 10)], log=hold_log)
            time.sleep(5.0)   # all held connections open and pinging
            load = client.spawn([sys.executable, "-c", SOAK_CLIENT, server.ip, str(PORT), str(RATE),
                                 str(seconds)], log=load_log)
            time.sleep(min(5.0, seconds / 3))
            ctx.log(f"  replacing node-1's proxy container under {RATE} new connections/s, {held} held")
            started = time.monotonic()
            bed._shoal("replace-proxy", "--node", "node-1", timeout=300)
            replaced = time.monotonic() - started
            load.wait(seconds + 120)
            hold.wait(seconds + 120)
            new, kept = summary_of(load_log), summary_of(hold_log)
        finally:
            bed.stop(echo)
    finally:
        bed.close()
    total = int(RATE * seconds)
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(new["reasons"].items())) or "none"
    yield Measurement(BENCHMARK, PATH, "new_failed", "count", (float(new["failed"]),), "lower",
                      f"{new['ok']} of {total} new connections succeeded; failures: {reasons}; "
                      f"p99 connect + echo {new['p99'] * 1000 if new.get('p99') else float('nan'):.1f} ms")
    survived = kept["ok"] - len(kept["lost"])
    yield Measurement(BENCHMARK, PATH, "held_survived", "fraction", (survived / held,), "higher",
                      f"{survived} of {held} long-lived connections survived the drain "
                      f"({kept['n_failed']} failed to open, {len(kept['lost'])} lost, {kept['pings']} pings)")
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

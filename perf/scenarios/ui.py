"""The web UI (``shoal ui``) in headless Chromium, with a large service map.

The UI server is fed synthetic flows for W workloads (quick: 50, full: 200) in 10
namespaces, each calling two services (about 2W service edges and W backend edges), as
its relay feed would deliver them. Figures:

* ``ui.load[workloads=W]``: from navigation until every node of the map is drawn
  (issue 16: <= 1 s at 200 workloads).
* ``ui.edge_update[workloads=W]``: from a DROPPED flow reaching the UI server until the
  page draws that edge red (issue 16: <= 2 s).

Needs Debian's ``chromium`` and the ``playwright`` package (scripts/install.sh).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from shoal.perf.scenario import Context, Measurement, Scenario, Target

PATH = "shoal-ui"
NAMESPACES = 10
RED = "rgb(211,47,47)"


def synthetic_flows(workloads: int, ts_ns: int, verdict: str = "FORWARDED"):
    """Flows for ``workloads`` client workloads, each calling two Services backed by workloads."""
    from shoal.flows.records import l4_flow

    flows = []
    for index in range(workloads):
        namespace = f"ns-{index % NAMESPACES}"
        for offset in (1, 2):
            target = (index + offset) % workloads
            flow = l4_flow(f"10.{index // 250}.{index % 250}.2", 30000 + index, f"10.9.{target % 250}.3", 8080,
                           event="open", mtls=True, ts_ns=ts_ns + index, verdict=verdict,
                           drop_reason=181 if verdict == "DROPPED" else 0)
            flow.source.namespace, flow.source.pod_name = namespace, f"app-{index}-0"
            flow.source.workloads.add(name=f"app-{index}", kind="Deployment")
            flow.destination.namespace = f"ns-{target % NAMESPACES}"
            flow.destination.pod_name = f"app-{target}-0"
            flow.destination.workloads.add(name=f"app-{target}", kind="Deployment")
            flow.destination_service.name, flow.destination_service.namespace = f"svc-{target}", flow.destination.namespace
            flows.append(flow)
    return flows


def measure(workloads: int, repetitions: int, log) -> tuple[list[float], list[float]]:
    from shoal.cli.ui.background import UiServer
    from shoal.cli.ui.browser import chromium_page

    loads, updates = [], []
    for _ in range(repetitions):
        with UiServer("unix:/nonexistent/relay.sock") as server:
            for flow in synthetic_flows(workloads, time.time_ns()):
                server.call(server.feed.add, flow)
            expected = len(server.call(lambda: server.feed.map.snapshot(time.time_ns(), None))["nodes"])
            with chromium_page() as page:
                started = time.monotonic()
                page.goto(server.url)
                page.wait_for_function(f"window.shoalMap && window.shoalMap.nodes().length >= {expected}",
                                       timeout=30_000, polling=20)
                loads.append(time.monotonic() - started)
                # app-0 -> svc-1 exists on the map; its next flow is a drop.
                drop = synthetic_flows(workloads, time.time_ns(), verdict="DROPPED")[0]
                edge = "workload:ns-0/app-0->service:ns-1/svc-1"
                started = time.monotonic()
                server.call(server.feed.add, drop)
                page.wait_for_function(
                    """id => { const e = window.shoalMap.getElementById(id);
                               return e.nonempty() && e.style('line-color').replace(/ /g, '') === '%s'; }""" % RED,
                    arg=edge, timeout=30_000, polling=20)
                updates.append(time.monotonic() - started)
        log(f"ui: {workloads} workloads ({expected} map nodes): load {loads[-1]:.2f}s, edge {updates[-1]:.2f}s")
    return loads, updates


def run(ctx: Context) -> Iterator[Measurement]:
    if not Path("/usr/bin/chromium").exists():
        ctx.log("ui: /usr/bin/chromium missing (scripts/install.sh); skipped")
        return
    workloads = 50 if ctx.quick else 200
    loads, updates = measure(workloads, ctx.repetitions, ctx.log)
    yield Measurement(f"ui.load[workloads={workloads}]", PATH, "seconds", "s", tuple(loads), better="lower")
    yield Measurement(f"ui.edge_update[workloads={workloads}]", PATH, "seconds", "s", tuple(updates),
                      better="lower")


SCENARIO = Scenario(
    name="ui",
    title="Web UI: service map load and edge update in headless Chromium",
    run=run,
    targets=(
        Target("ui.load[workloads=200]", "seconds", PATH, "<=", 1.0),
        Target("ui.edge_update[workloads=200]", "seconds", PATH, "<=", 2.0),
    ),
    order=65,
)

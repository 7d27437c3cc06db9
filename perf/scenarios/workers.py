"""The node proxy on every core (issue 13): the request rate one and two workers sustain.

redis-benchmark GET (64 connections, one request in flight each, 2 client threads) from
the meshed client pod (node-1) to a redis in the meshed server pod (node-2): every
request crosses both node proxies, which are the bottleneck (redis serves far more than
the mesh carries; the direct path, measured in the same rounds, shows the ceiling of
client and server). Both node proxies are restarted with ``--workers 1`` and
``--workers 2`` in turn, by the restart handover (``shoal.local`` starts the successor,
which retires the old one); rounds alternate so the machine's noise hits both alike.
At the end the proxies go back to the cluster's own worker count.

The target (2 workers ≥ 1.6 × 1 worker) holds only where cores are free for the second
worker: on a 2-core machine shared by client, server and four proxy workers the ratio
says more about the machine than about the proxy (the report's note says so).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from shoal.perf import peers, pod2pod
from shoal.perf.scenario import PATH_DIRECT, Context, Measurement, Pod, Scenario, Target
from shoal.perf.tools import redisbench

BENCHMARK = "workers.redis_get[c=64,P=1]"
CLIENTS = 64
WORKER_COUNTS = (1, 2)
NODES = ("node-1", "node-2")


def path_name(workers: int) -> str:
    return f"shoal[workers={workers}]"


def _proxy_marker(layout, node: str) -> str:
    try:
        return (layout.node_dir(node) / "proxy.ready").read_text().strip()
    except FileNotFoundError:
        return ""


def set_workers(ctx: Context, workers: int, timeout: float = 90.0, nodes: tuple[str, ...] = NODES,
                extra_args: tuple[str, ...] = ()) -> None:
    """Restart the ``nodes``' proxies with ``workers`` workers (and ``extra_args``) by the
    restart handover, and wait until the new ones serve every pod and the old ones have exited."""
    from shoal.local.cluster import LocalCluster

    layout = ctx.bed.layout  # type: ignore[attr-defined]
    cluster = LocalCluster(layout, proxy_workers=workers)
    started: dict[str, int] = {}
    for node in nodes:
        component = next(c for c in cluster.node_components(node) if c.name == f"proxy-{node}")
        started[node] = cluster.start(dataclasses.replace(component, args=component.args + extra_args))
    deadline = time.monotonic() + timeout
    for node, pid in started.items():
        while not _proxy_marker(layout, node).startswith(f"{pid}-"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {workers}-worker proxy of {node} (pid {pid}) did not become ready")
            time.sleep(0.2)
    # The predecessors drain, then exit: only the new proxies' processes may remain.
    while len(ctx.bed.component_pids("proxy", nodes=nodes)) > len(nodes) * (workers + 1):  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise RuntimeError("the previous node proxies did not exit")
        time.sleep(0.2)


@contextmanager
def _redis(ctx: Context, pod: Pod) -> Iterator[None]:
    proc = pod.spawn(redisbench.server_argv(), log=ctx.workdir / f"redis-{pod.namespace}.log")
    try:
        peers.wait_all_listening(pod, "0.0.0.0", [redisbench.DEFAULT_PORT], timeout=20, procs=[proc])
        yield
    finally:
        ctx.bed.stop(proc)


def rate(ctx: Context, client: Pod, server: Pod) -> float:
    requests = 30_000 if ctx.quick else 200_000
    argv = [*redisbench.client_argv(server.ip, requests, tests=("get",), clients=CLIENTS), "--threads", "2"]
    done = client.run(argv, timeout=600, check=False)
    return redisbench.rates(done.stdout + done.stderr)["GET"]


def run(ctx: Context) -> Iterator[Measurement]:
    plain_client, plain_server = pod2pod.plain_pods(ctx.bed)
    mesh_client, mesh_server = pod2pod.meshed_pods(ctx.bed)
    configured = int(os.environ.get("SHOAL_PERF_RESTORE_WORKERS", "1"))
    figures: dict[str, list[float]] = {PATH_DIRECT: [], **{path_name(n): [] for n in WORKER_COUNTS}}
    with _redis(ctx, plain_server), _redis(ctx, mesh_server):
        try:
            for rep in range(ctx.repetitions):
                figures[PATH_DIRECT].append(rate(ctx, plain_client, plain_server))
                ctx.log(f"  {BENCHMARK} {PATH_DIRECT} #{rep + 1}: {figures[PATH_DIRECT][-1]:,.0f} req/s")
                for workers in WORKER_COUNTS:
                    set_workers(ctx, workers)
                    path = path_name(workers)
                    figures[path].append(rate(ctx, mesh_client, mesh_server))
                    ctx.log(f"  {BENCHMARK} {path} #{rep + 1}: {figures[path][-1]:,.0f} req/s")
        finally:
            set_workers(ctx, configured)
    cores = len(os.sched_getaffinity(0))
    for path, values in figures.items():
        yield Measurement(BENCHMARK, path, "rate", "req/s", tuple(values),
                          note=f"{cores} cores shared by client, server and every proxy worker")


SCENARIO = Scenario(
    name="workers",
    title="Node proxy workers: request rate with 1 and 2 workers (redis GET through two node proxies)",
    run=run,
    requires=("root", "cluster", "bin:redis-server", "bin:redis-benchmark"),
    targets=(
        Target(BENCHMARK, "rate", path_name(2), ">=", 1.6, kind="ratio", against=path_name(1),
               label="2 workers ≥ 1.6× the request rate of 1 worker (where the load generator is not the limit)"),
    ),
    order=32,
)

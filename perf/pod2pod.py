"""The shared pod-to-pod workload: the same tools and settings for every path.

A *route* is how the client pod reaches the servers: the server pod's IP for the direct
path (and for Shoal, which captures transparently), or 127.0.0.1 and the local ports of
a peer's client end. Repetitions are interleaved across routes (direct, stunnel,
haproxy, direct, ...) so that a noisy minute on this shared machine hurts every path
alike instead of one.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from shoal.perf import peers, procstat
from shoal.perf.scenario import Bed, Context, Measurement, Pod
from shoal.perf.tools import iperf3, sockperf

STREAM = "pod2pod.tcp_stream"          # single-stream throughput
RR = "pod2pod.tcp_rr_1k@1000/s"        # 1 KiB request/response at a fixed 1,000 per second
RR_RATE = 1000
RR_SIZE = 1024
STREAM_PORT = iperf3.DEFAULT_PORT
RR_PORT = sockperf.DEFAULT_PORT
PLAIN_NAMESPACE = "perf-plain"         # direct and the peers: not meshed
MESH_NAMESPACE = "perf-mesh"           # the Shoal path: meshed pods, same nodes
PATH_SHOAL = "shoal-l4"
PROXY_ENDS = 2                         # every path has two proxies: one per node, or a peer's two ends

T = TypeVar("T")


def rounds(items: Sequence[T], repetitions: int) -> Iterator[tuple[int, T]]:
    """(repetition, item) in interleaved order: every item once per round, round after round.

    Each round measures every path back to back, so a noisy minute on this shared machine
    lands on one repetition of every path (which the median discards) instead of on all
    repetitions of the one path that happened to run then.
    """
    for rep in range(repetitions):
        for item in items:
            yield rep, item


@dataclass(frozen=True)
class Route:
    """How the client reaches the servers on one path.

    ``processes`` returns the PIDs of the path's own processes (peer ends, node proxies):
    their CPU and RSS are sampled during the fixed-rate request/response runs, which gives
    the "cores per 1,000 req/s" figure, for the path (``cpu``) and per proxy
    (``cpu_per_proxy``: the path's cores over its ``ends``, two node proxies or a peer's
    two ends).
    """

    path: str
    client: Pod
    host: str
    stream_port: int = STREAM_PORT
    rr_port: int = RR_PORT
    processes: Callable[[], Sequence[int]] | None = None
    ends: int = PROXY_ENDS


def plain_pods(bed: Bed) -> tuple[Pod, Pod]:
    """Client on node-1, server on node-2, outside the mesh (direct path, peers)."""
    return bed.pod(PLAIN_NAMESPACE, "client", "node-1"), bed.pod(PLAIN_NAMESPACE, "server", "node-2")


def meshed_pods(bed: Bed) -> tuple[Pod, Pod]:
    """The same placement in a meshed namespace: their traffic crosses both node proxies."""
    return (bed.pod(MESH_NAMESPACE, "client", "node-1", meshed=True, service_account="client"),
            bed.pod(MESH_NAMESPACE, "server", "node-2", meshed=True, service_account="server"))


def node_proxies(bed: Bed) -> Callable[[], list[int]]:
    """PIDs of the two node proxies the Shoal path crosses (cluster bed only)."""
    return lambda: bed.component_pids("proxy", nodes=("node-1", "node-2"))  # type: ignore[attr-defined]


def idle_rss(proxies: Callable[[], list[int]], bench: str, path: str) -> Iterator[Measurement]:
    """RSS of each node proxy process with pods enrolled and nothing connected (a few
    samples). Two figures: per worker (the target's unit), the largest process that
    carries connections; and per node proxy, the largest total of a supervisor (it holds
    the config stream and the certificates, no connection) and its workers (or a single
    process), the figure a DaemonSet's memory limit must cover."""
    workers, supervisors = procstat.split_supervisors(proxies())
    with procstat.ProcessSampler(workers + supervisors, interval=0.5) as sampler:
        time.sleep(2.0)
    if sampler.usage:
        per_process = sampler.rss_peak_per_process_mb
        per_worker = {pid: mb for pid, mb in per_process.items() if pid not in supervisors}
        note = "largest node proxy worker (or single process), no connection; each: " + ", ".join(
            f"{mb:.1f}" for mb in sorted(per_worker.values()))
        if supervisors:
            note += "; supervisors: " + ", ".join(f"{per_process[pid]:.1f}" for pid in supervisors if pid in per_process)
        yield Measurement(bench, path, "rss", "MB", (max(per_worker.values()),), "lower", note)
        totals = procstat.totals_per_supervisor(per_process, supervisors)
        yield Measurement(bench, path, "rss_node_total", "MB", (max(totals.values()),), "lower",
                          "largest node proxy in all (supervisor + workers, or one process); each: "
                          + ", ".join(f"{mb:.1f}" for mb in sorted(totals.values())))


@contextmanager
def servers(ctx: Context, pod: Pod, stream_ports: Sequence[int] = (STREAM_PORT,),
            rr_ports: Sequence[int] = (RR_PORT,)) -> Iterator[None]:
    """iperf3 and sockperf servers in ``pod`` (all addresses) for the duration of the block.

    An iperf3 server runs one test at a time; give each route its own port when several
    routes share the server pod.
    """
    logs = ctx.workdir / f"servers-{pod.namespace}-{pod.name}"
    logs.mkdir(parents=True, exist_ok=True)
    procs = [pod.spawn(iperf3.server_argv(port), log=logs / f"iperf3-{port}.log") for port in stream_ports]
    procs += [pod.spawn(sockperf.server_argv("0.0.0.0", port), log=logs / f"sockperf-{port}.log")
              for port in rr_ports]
    try:
        peers.wait_all_listening(pod, "0.0.0.0", (*stream_ports, *rr_ports), procs=procs)
        yield
    finally:
        for proc in procs:
            ctx.bed.stop(proc)


def stream_once(ctx: Context, route: Route, attempts: int = 4) -> float:
    seconds = ctx.seconds(5, 1.5)
    attempt = 1
    while True:
        done = route.client.run(iperf3.client_argv(route.host, seconds, route.stream_port),
                                timeout=seconds + 30, check=False)
        try:
            return iperf3.received_gbps(done.stdout)
        except iperf3.ServerBusy:
            if attempt >= attempts:
                raise
        time.sleep(0.5 * attempt)  # the server is still closing the previous test
        attempt += 1


def rr_once(ctx: Context, route: Route) -> dict[float, float]:
    seconds = ctx.seconds(5, 2)
    done = route.client.run(sockperf.client_argv(route.host, seconds, RR_RATE, RR_SIZE, route.rr_port),
                            timeout=seconds + 30, check=False)
    return sockperf.percentiles(done.stdout + done.stderr)


def measure_interleaved(ctx: Context, routes: Sequence[Route]) -> Iterator[Measurement]:
    """Throughput, then latency, of every route; repetitions interleaved across routes."""
    gbps: dict[str, list[float]] = {r.path: [] for r in routes}
    for rep, route in rounds(routes, ctx.repetitions):
        gbps[route.path].append(stream_once(ctx, route))
        ctx.log(f"  {STREAM} {route.path} #{rep + 1}: {gbps[route.path][-1]:.2f} Gbit/s")
    for route in routes:
        yield Measurement(STREAM, route.path, "throughput", "Gbit/s", tuple(gbps[route.path]), "higher")
    p50: dict[str, list[float]] = {r.path: [] for r in routes}
    p99: dict[str, list[float]] = {r.path: [] for r in routes}
    cpu: dict[str, list[float]] = {r.path: [] for r in routes}
    rss: dict[str, list[float]] = {r.path: [] for r in routes}
    for rep, route in rounds(routes, ctx.repetitions):
        pids = list(route.processes()) if route.processes else []
        if pids:
            with procstat.ProcessSampler(pids) as sampler:
                pct = rr_once(ctx, route)
            assert sampler.usage is not None
            cpu[route.path].append(sampler.usage.cpu_cores)
            rss[route.path].append(sampler.usage.rss_peak_mb)
        else:
            pct = rr_once(ctx, route)
        p50[route.path].append(pct[50.0])
        p99[route.path].append(pct[99.0])
        usage = f", {cpu[route.path][-1]:.3f} cores" if pids else ""
        ctx.log(f"  {RR} {route.path} #{rep + 1}: p50 {pct[50.0]:.0f} µs, p99 {pct[99.0]:.0f} µs{usage}")
    for route in routes:
        yield Measurement(RR, route.path, "p50", "µs", tuple(p50[route.path]), "lower")
        yield Measurement(RR, route.path, "p99", "µs", tuple(p99[route.path]), "lower")
        if cpu[route.path]:
            note = "both ends of the path together, over the fixed-rate run"
            yield Measurement(RR, route.path, "cpu", "cores", tuple(cpu[route.path]), "lower", note)
            yield Measurement(RR, route.path, "rss", "MB", tuple(rss[route.path]), "lower", note)
            yield Measurement(RR, route.path, "cpu_per_proxy", "cores", tuple(c / route.ends for c in cpu[route.path]),
                              "lower", f"cores per 1,000 req/s per proxy: the path's cores over its {route.ends} ends")


def measure(ctx: Context, path: str, client: Pod, host: str, stream_port: int = STREAM_PORT,
            rr_port: int = RR_PORT, processes: Callable[[], Sequence[int]] | None = None,
            ) -> Iterator[Measurement]:
    """The pod-to-pod figures of one path (what Shoal's scenarios call)."""
    yield from measure_interleaved(ctx, [Route(path, client, host, stream_port, rr_port, processes)])

"""Same-node pods (issue 13): the kernel bypass against direct and against the HBONE path.

Client and server pods both on node-1. ``direct``: pods outside the mesh. ``shoal-bypass``:
meshed pods, node-1's proxy as the cluster runs it (bypass on): after the proxy's checks
the two plaintext sockets are joined in the kernel (agent/ztunnel/bypass.py).
``shoal-appjoin``: the same meshed pods with node-1's proxy restarted with
``--same-node-app-join`` (the apps' own sockets send straight into the proxy's socket
toward the other app once switched, bpf/sk_msg_join.c). ``shoal-hbone``: the same meshed
pods with node-1's proxy restarted with ``--no-same-node-bypass`` (the tunnel the proxy
opens to itself), then restarted back.

The bypass block (direct and bypass interleaved) runs first, then the app-join block, then
the no-bypass block (direct again and HBONE interleaved): a restart lies between them, so
direct is measured in each and its samples pooled. Targets: bypass throughput ≥ 0.9× direct, added p50 ≤ 20 µs.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack

from shoal.perf import pod2pod
from shoal.perf.scenario import PATH_DIRECT, Context, Measurement, Scenario, Target
from shoal.perf.scenarios.workers import set_workers

STREAM = "samenode.tcp_stream"
RR = "samenode.tcp_rr_1k@1000/s"
PATH_BYPASS = "shoal-bypass"
PATH_HBONE = "shoal-hbone"
PATH_APPJOIN = "shoal-appjoin"
PLAIN_NAMESPACE = "perf-samenode-plain"
MESH_NAMESPACE = "perf-samenode-mesh"
NODE = "node-1"


def _renamed(measurements: Iterator[Measurement]) -> Iterator[Measurement]:
    """pod2pod's measurements under this scenario's benchmark names (rows never mix with
    the cross-node ones of the baseline)."""
    names = {pod2pod.STREAM: STREAM, pod2pod.RR: RR}
    for m in measurements:
        yield dataclasses.replace(m, benchmark=names.get(m.benchmark, m.benchmark))


def _pooled(blocks: list[list[Measurement]]) -> Iterator[Measurement]:
    merged: dict[tuple[str, str, str], Measurement] = {}
    for block in blocks:
        for m in block:
            key = (m.benchmark, m.path, m.metric)
            if key in merged:
                m = dataclasses.replace(m, samples=merged[key].samples + m.samples)
            merged[key] = m
    yield from merged.values()


def joined_pairs(ctx: Context) -> float:
    """node-1's proxy's count of same-node connections joined in the kernel (its 15020
    metrics): the proof that the bypass path was the one measured."""
    return _metric_sum(_proxy_metrics(ctx), "shoal_proxy_bypass_connections_total{", 'outcome="joined"')


def _proxy_metrics(ctx: Context) -> str:
    """node-1's proxy's 15020 metrics text."""
    layout = ctx.bed.layout  # type: ignore[attr-defined]
    return subprocess.run(["ip", "netns", "exec", layout.node_netns(NODE), sys.executable, "-c",
                          "import urllib.request;print(urllib.request.urlopen("
                          "'http://127.0.0.1:15020/metrics', timeout=5).read().decode())"],
                         capture_output=True, text=True, timeout=30).stdout


def handed_back_bytes(ctx: Context) -> float:
    """Bytes node-1's proxy relayed itself for joined pairs (a receiver fell behind the
    verdict's high-water mark): how much of the bypass path was userspace after all."""
    return _metric_sum(_proxy_metrics(ctx), "shoal_proxy_bypass_handed_back_bytes_total", "")


def app_directions(ctx: Context) -> dict[str, float]:
    """node-1's proxy's ended same-node directions by how the app join left them (direct,
    retired, proxy_path): whether the apps' sends were the ones carried."""
    text = _proxy_metrics(ctx)
    return {state: _metric_sum(text, "shoal_proxy_bypass_app_directions_total{", f'state="{state}"')
            for state in ("direct", "retired", "proxy_path")}


def _metric_sum(text: str, prefix: str, contains: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and contains in line)


def run(ctx: Context) -> Iterator[Measurement]:
    bed = ctx.bed
    plain_client, plain_server = bed.pod(PLAIN_NAMESPACE, "client", NODE), bed.pod(PLAIN_NAMESPACE, "server", NODE)
    mesh_client = bed.pod(MESH_NAMESPACE, "client", NODE, meshed=True, service_account="client")
    mesh_server = bed.pod(MESH_NAMESPACE, "server", NODE, meshed=True, service_account="server")
    proxy = lambda: bed.component_pids("proxy", nodes=(NODE,))  # type: ignore[attr-defined]  # noqa: E731
    workers = int(os.environ.get("SHOAL_PERF_RESTORE_WORKERS", "1"))
    direct = pod2pod.Route(PATH_DIRECT, plain_client, plain_server.ip)
    blocks: list[list[Measurement]] = []
    with ExitStack() as stack:
        stack.enter_context(pod2pod.servers(ctx, plain_server))
        stack.enter_context(pod2pod.servers(ctx, mesh_server))
        blocks.append(list(_renamed(pod2pod.measure_interleaved(ctx, [
            direct, pod2pod.Route(PATH_BYPASS, mesh_client, mesh_server.ip, processes=proxy, ends=1)]))))
        joined = joined_pairs(ctx)
        ctx.log(f"  node-1's proxy joined {joined:.0f} same-node connections in the kernel, "
                f"relayed {handed_back_bytes(ctx):.0f} handed-back bytes itself")
        if not joined:
            raise RuntimeError(f"the {PATH_BYPASS} path was not bypassed (no joined pair in node-1's proxy metrics)")
        set_workers(ctx, workers, nodes=(NODE,), extra_args=("--same-node-app-join",))
        blocks.append(list(_renamed(pod2pod.measure_interleaved(ctx, [
            direct, pod2pod.Route(PATH_APPJOIN, mesh_client, mesh_server.ip, processes=proxy, ends=1)]))))
        ctx.log(f"  node-1's proxy with the app join: directions {app_directions(ctx)}, relayed "
                f"{handed_back_bytes(ctx):.0f} handed-back bytes itself")
        set_workers(ctx, workers, nodes=(NODE,), extra_args=("--no-same-node-bypass",))
        try:
            blocks.append(list(_renamed(pod2pod.measure_interleaved(ctx, [
                direct, pod2pod.Route(PATH_HBONE, mesh_client, mesh_server.ip, processes=proxy, ends=1)]))))
        finally:
            set_workers(ctx, workers, nodes=(NODE,))
    yield from _pooled(blocks)


SCENARIO = Scenario(
    name="samenode",
    title="Same-node pods: the kernel bypass against direct and the HBONE path",
    run=run,
    requires=("root", "cluster", "bin:iperf3", "bin:sockperf"),
    targets=(
        Target(STREAM, "throughput", PATH_BYPASS, ">=", 0.9, kind="ratio", against=PATH_DIRECT),
        Target(RR, "p50", PATH_BYPASS, "<=", 20, kind="added", against=PATH_DIRECT),
        Target(STREAM, "throughput", PATH_APPJOIN, ">=", 0.9, kind="ratio", against=PATH_DIRECT),
        Target(RR, "p50", PATH_APPJOIN, "<=", 20, kind="added", against=PATH_DIRECT),
    ),
    order=12,
)

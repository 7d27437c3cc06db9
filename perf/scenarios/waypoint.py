"""The waypoint's HTTP path (issue 6): added latency, maximum rate vs haproxy, RSS.

Same HTTP workload as ``shoal.perf.http`` for every path: h2load at a fixed 1,000 req/s
with 1 KiB request bodies (POST) and a 1 KiB answer from a C origin (haproxy's
``http-request return``), then h2load unthrottled for the maximum rate.

Paths (client pod on node-1; origin and proxies on node-2):
- ``direct``: client -> origin;
- ``haproxy-http``: client -> haproxy in HTTP mode (one thread) in a proxy pod -> origin;
- ``shoal-waypoint``: client -> ``python -m shoal.waypoint`` (one process, one core) in
  the same proxy pod, plain HTTP/1.1 on both sides, its full L7 pipeline (routing, L7
  authorization, telemetry) -> origin. Same position as haproxy: same path.
- ``shoal-waypoint-nofast``: the same waypoint with ``--no-fast-path`` (every request
  through the coroutine pipeline, as before ``waypoint/fastpath.py``): an A/B in one run.
- on the cluster bed, also through the mesh: ``shoal-l4`` (meshed client and origin,
  node proxies only) and ``shoal-l4+waypoint`` (the origin's Service labelled with a
  waypoint: client node proxy -> HBONE -> waypoint -> HBONE -> origin node proxy).
  The added latency of the waypoint path over ``shoal-l4`` is the issue's figure.
"""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from shoal.perf import http, peers, procstat
from shoal.perf.scenario import PATH_DIRECT, Context, Measurement, Scenario, Target

NAMESPACE = "perf-http"
MESH_NAMESPACE = "perf-wp"
PROXY_PORT = 18081
WAYPOINT_PORT = 18082
PATH_HAPROXY_HTTP = "haproxy-http"
PATH_WAYPOINT = "shoal-waypoint"
PATH_WAYPOINT_PIPELINE = "shoal-waypoint-nofast"   # the same, every request through the pipeline (before the fast path)
PATH_L4 = "shoal-l4"
PATH_MESH_WAYPOINT = "shoal-l4+waypoint"


def _waypoint_pids(root_pid: int) -> list[int]:
    """The waypoint process(es) among a spawned process group (not `shoal exec`/`ip netns exec`)."""
    found = []
    for pid in procstat.pids_in_group(root_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"shoal.waypoint" in cmdline and b"exec" not in cmdline:
            found.append(pid)
    return found


def _start_waypoint(ctx: Context, pod, upstream: str, fast_path: bool = True):
    # A pod's address, not loopback: the client pod reaches it across the fabric.
    argv = [*http.waypoint_argv(f"0.0.0.0:{WAYPOINT_PORT}", upstream, NAMESPACE, fast_path), "--plaintext-beyond-loopback"]
    proc = pod.spawn(argv, log=ctx.workdir / "waypoint.log")
    peers.wait_listening(pod, "0.0.0.0", WAYPOINT_PORT, timeout=30)
    return proc


def _mesh_paths(ctx: Context) -> Iterator[Measurement]:
    """Through the real mesh (cluster bed only); skipped with a note if the mesh path fails."""
    bed = ctx.bed
    client = bed.pod(MESH_NAMESPACE, "client", "node-1", meshed=True, service_account="client")
    server = bed.pod(MESH_NAMESPACE, "origin", "node-2", meshed=True, service_account="origin",
                     labels={"app": "origin"})
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "origin", "namespace": MESH_NAMESPACE},
         "spec": {"selector": {"app": "origin"}, "ports": [{"name": "http", "port": 80, "targetPort": http.ORIGIN_PORT}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "origin-wp", "namespace": MESH_NAMESPACE,
                                                             "labels": {"shoal.io/use-waypoint": "waypoint"}},
         "spec": {"selector": {"app": "origin"}, "ports": [{"name": "http", "port": 80, "targetPort": http.ORIGIN_PORT}]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "waypoint", "namespace": MESH_NAMESPACE},
         "spec": {"gatewayClassName": "shoal-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
    ]
    subprocess.run([*bed.shoal, "apply", "-f", "-"], input=yaml.safe_dump_all(docs), text=True, env=bed.env,
                   check=True, capture_output=True, timeout=60)
    _wait_waypoint_ready(bed, timeout=60)
    time.sleep(ctx.seconds(2, 1))  # the binding pushed to every node proxy
    pids = lambda: [p for p in procstat.pids_in_cgroup(bed.layout.cgroup) if _is_waypoint(p)]  # noqa: E731
    with http.origin(ctx, server):
        yield from http.measure(ctx, PATH_L4, client, f"http://origin.{MESH_NAMESPACE}/", max_rate=True)
        yield from http.measure(ctx, PATH_MESH_WAYPOINT, client, f"http://origin-wp.{MESH_NAMESPACE}/",
                                processes=pids, max_rate=True)


def _wait_waypoint_ready(bed, timeout: float) -> None:
    """Until the waypoint pod is Ready: only then does the controller route to it (before,
    traffic to origin-wp would take the L4 path and the figures would not be the waypoint's)."""
    import json

    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run([*bed.shoal, "get", "pods", "-n", MESH_NAMESPACE, "-o", "json"], env=bed.env,
                             capture_output=True, text=True, timeout=30).stdout
        pods = json.loads(out or '{"items": []}')["items"]
        if any(p["metadata"]["name"].startswith("waypoint-") and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []) for p in pods):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"waypoint in {MESH_NAMESPACE} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def _is_waypoint(pid: int) -> bool:
    try:
        return b"shoal.waypoint" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def run(ctx: Context) -> Iterator[Measurement]:
    bed = ctx.bed
    client = bed.pod(NAMESPACE, "client", "node-1")
    server = bed.pod(NAMESPACE, "origin", "node-2")
    proxy = bed.pod(NAMESPACE, "proxy", "node-2")
    upstream = f"{server.ip}:{http.ORIGIN_PORT}"
    with http.origin(ctx, server):
        yield from http.measure(ctx, PATH_DIRECT, client, f"http://{upstream}/")
        with http.haproxy_http_proxy(ctx, proxy, PROXY_PORT, upstream) as haproxy_pids:
            yield from http.measure(ctx, PATH_HAPROXY_HTTP, client, f"http://{proxy.ip}:{PROXY_PORT}/",
                                    processes=haproxy_pids)
        for path, fast_path in ((PATH_WAYPOINT, True), (PATH_WAYPOINT_PIPELINE, False)):
            waypoint = _start_waypoint(ctx, proxy, upstream, fast_path)
            try:
                yield from http.measure(ctx, path, client, f"http://{proxy.ip}:{WAYPOINT_PORT}/",
                                        processes=lambda: _waypoint_pids(waypoint.pid))  # noqa: B023 - used before the loop moves on
            finally:
                bed.stop(waypoint)
    if bed.kind == "cluster":
        try:
            yield from _mesh_paths(ctx)
        except (subprocess.SubprocessError, OSError, RuntimeError) as err:
            ctx.log(f"  mesh paths skipped: {err}")


SCENARIO = Scenario(
    name="waypoint",
    title="HTTP through the waypoint vs haproxy HTTP mode (1 KiB, 1,000 req/s; max rate; RSS)",
    run=run,
    requires=("root", "bin:h2load", "bin:haproxy"),
    targets=(
        Target(http.MAX, "rate", PATH_WAYPOINT, ">=", 0.5, kind="ratio", against=PATH_HAPROXY_HTTP,
               label="max req/s on one core >= 0.5x haproxy HTTP mode"),
        # The same goal by CPU cost: CPU-seconds per request served depend much less on what
        # else the machine runs than max rates, which on a loaded machine mostly measure the load.
        Target(http.RR, "cpu_per_request", PATH_WAYPOINT, "<=", 2.0, kind="ratio", against=PATH_HAPROXY_HTTP,
               label="CPU per request at 1,000 req/s <= 2x haproxy's (= 0.5x its rate on a free core)"),
        Target(http.RR, "rss", PATH_WAYPOINT, "<=", 80, kind="absolute", label="RSS <= 80 MB under load"),
        Target(http.RR, "rss", PATH_MESH_WAYPOINT, "<=", 80, kind="absolute",
               label="RSS <= 80 MB under load, in the mesh (HBONE both sides)"),
        Target(http.RR, "p50", PATH_MESH_WAYPOINT, "<=", 300, kind="added", against=PATH_L4,
               label="added p50 of the waypoint path over L4 at 1,000 req/s <= 300 µs"),
        Target(http.RR, "p99", PATH_MESH_WAYPOINT, "<=", 1000, kind="added", against=PATH_L4,
               label="added p99 of the waypoint path over L4 at 1,000 req/s <= 1 ms"),
    ),
    order=40,
)

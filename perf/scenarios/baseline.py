"""Pod to pod across two nodes: direct (no mesh), the stunnel4 and haproxy mTLS pairs, and
Shoal (two node proxies, HBONE), all in the same interleaved rounds.

Client pod on node-1, server pod on node-2. Direct and the peers use pods of a namespace
that is not meshed (the peers' TLS ends run inside them); Shoal uses meshed pods on the
same nodes. Every repetition measures every path back to back (``pod2pod.rounds``), so
the machine's noise hits all paths alike. On the netns bed there is no Shoal path.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

from shoal.perf import peers, pod2pod
from shoal.perf.pod2pod import PATH_SHOAL, RR, STREAM
from shoal.perf.scenario import PATH_DIRECT, PATH_HAPROXY, PATH_STUNNEL, Context, Measurement, Scenario, Target

# Each path gets its own servers: an iperf3 server serves one test at a time.
PEER_PORTS = ((peers.STUNNEL, 20000, pod2pod.STREAM_PORT + 1, pod2pod.RR_PORT + 1),
              (peers.HAPROXY, 21000, pod2pod.STREAM_PORT + 2, pod2pod.RR_PORT + 2))


def run(ctx: Context) -> Iterator[Measurement]:
    client, server = pod2pod.plain_pods(ctx.bed)
    routes = [pod2pod.Route(PATH_DIRECT, client, server.ip)]
    with ExitStack() as stack:
        stack.enter_context(pod2pod.servers(
            ctx, server, stream_ports=(pod2pod.STREAM_PORT, *(p[2] for p in PEER_PORTS)),
            rr_ports=(pod2pod.RR_PORT, *(p[3] for p in PEER_PORTS))))
        for peer, base, stream_port, rr_port in PEER_PORTS:
            forwards = peers.forwards(base, (("stream", stream_port), ("rr", rr_port)))
            pids = stack.enter_context(peers.pair(peer, ctx.bed, client, server, forwards, ctx.workdir))
            routes.append(pod2pod.Route(peer.name, client, "127.0.0.1", forwards[0].local, forwards[1].local,
                                        processes=pids))
        if ctx.bed.kind == "cluster":
            mesh_client, mesh_server = pod2pod.meshed_pods(ctx.bed)
            stack.enter_context(pod2pod.servers(ctx, mesh_server))
            routes.append(pod2pod.Route(PATH_SHOAL, mesh_client, mesh_server.ip,
                                        processes=pod2pod.node_proxies(ctx.bed)))
        else:
            ctx.log(f"  no {PATH_SHOAL} path on the {ctx.bed.kind} bed (needs the Shoal cluster)")
        yield from pod2pod.measure_interleaved(ctx, routes)


SCENARIO = Scenario(
    name="baseline",
    title="Pod to pod across two nodes: direct, stunnel4 pair, haproxy pair and Shoal, interleaved",
    run=run,
    requires=("root", "bin:iperf3", "bin:sockperf", "bin:stunnel4", "bin:haproxy", "bin:ss"),
    targets=(  # issue 13 (and issue 4's stretch and stunnel goals)
        Target(STREAM, "throughput", PATH_SHOAL, ">=", 1.2, kind="ratio", against=PATH_HAPROXY),
        Target(STREAM, "throughput", PATH_SHOAL, ">=", 1.5, kind="ratio", against=PATH_STUNNEL),
        Target(STREAM, "throughput", PATH_SHOAL, ">=", 0.4, kind="ratio", against=PATH_DIRECT, label="stretch"),
        Target(RR, "p50", PATH_SHOAL, "<=", 150, kind="added", against=PATH_DIRECT),
        Target(RR, "p50", PATH_SHOAL, "<=", 30, kind="added", against=PATH_HAPROXY,
               label=f"{RR} p50 {PATH_SHOAL}: added ≤ haproxy's added + 30 µs"),
        Target(RR, "p99", PATH_SHOAL, "<=", 500, kind="added", against=PATH_DIRECT),
        Target(RR, "p50", PATH_SHOAL, "<=", 0, kind="added", against=PATH_STUNNEL),
        Target(RR, "p99", PATH_SHOAL, "<=", 0, kind="added", against=PATH_STUNNEL),
        Target(RR, "cpu_per_proxy", PATH_SHOAL, "<=", 0.05,
               label="cores per 1,000 req/s per node proxy ≤ 0.05 (ztunnel publishes 0.06)"),
    ),
    order=10,
)

"""Pod to pod across two nodes: direct (no mesh), and the stunnel4 and haproxy mTLS pairs.

The reference every Shoal path is compared with. Client pod on node-1, server pod on
node-2, in a namespace that is not meshed; the peers' TLS ends run inside the pods.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

from shoal.perf import peers, pod2pod
from shoal.perf.scenario import PATH_DIRECT, Context, Measurement, Scenario

NAMESPACE = "perf-plain"


# Each path gets its own servers: an iperf3 server serves one test at a time.
PEER_PORTS = ((peers.STUNNEL, 20000, pod2pod.STREAM_PORT + 1, pod2pod.RR_PORT + 1),
              (peers.HAPROXY, 21000, pod2pod.STREAM_PORT + 2, pod2pod.RR_PORT + 2))


def _forwards(base: int, stream_port: int, rr_port: int) -> tuple[peers.Forward, ...]:
    return (peers.Forward("stream", base + 1, base + 2, stream_port),
            peers.Forward("rr", base + 3, base + 4, rr_port))


def run(ctx: Context) -> Iterator[Measurement]:
    client = ctx.bed.pod(NAMESPACE, "client", "node-1")
    server = ctx.bed.pod(NAMESPACE, "server", "node-2")
    routes = [pod2pod.Route(PATH_DIRECT, client, server.ip)]
    with ExitStack() as stack:
        stack.enter_context(pod2pod.servers(
            ctx, server, stream_ports=(pod2pod.STREAM_PORT, *(p[2] for p in PEER_PORTS)),
            rr_ports=(pod2pod.RR_PORT, *(p[3] for p in PEER_PORTS))))
        for peer, base, stream_port, rr_port in PEER_PORTS:
            forwards = _forwards(base, stream_port, rr_port)
            pids = stack.enter_context(peers.pair(peer, ctx.bed, client, server, forwards, ctx.workdir))
            routes.append(pod2pod.Route(peer.name, client, "127.0.0.1", forwards[0].local, forwards[1].local,
                                        processes=pids))
        yield from pod2pod.measure_interleaved(ctx, routes)


SCENARIO = Scenario(
    name="baseline",
    title="Pod to pod across two nodes: direct, stunnel4 mTLS pair, haproxy mTLS pair",
    run=run,
    requires=("root", "bin:iperf3", "bin:sockperf", "bin:stunnel4", "bin:haproxy", "bin:ss"),
    order=10,
)

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


def _forwards(base: int) -> tuple[peers.Forward, ...]:
    return (peers.Forward("stream", base + 1, base + 2, pod2pod.STREAM_PORT),
            peers.Forward("rr", base + 3, base + 4, pod2pod.RR_PORT))


def run(ctx: Context) -> Iterator[Measurement]:
    client = ctx.bed.pod(NAMESPACE, "client", "node-1")
    server = ctx.bed.pod(NAMESPACE, "server", "node-2")
    routes = [pod2pod.Route(PATH_DIRECT, client, server.ip)]
    with ExitStack() as stack:
        stack.enter_context(pod2pod.servers(ctx, server))
        for base, peer in ((20000, peers.STUNNEL), (21000, peers.HAPROXY)):
            forwards = _forwards(base)
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

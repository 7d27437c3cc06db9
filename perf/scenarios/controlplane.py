"""Control-plane scale: the real controller core, 10 real gRPC clients standing in for agents.

The controller (model + config distribution + CA, as in ``python -m shoal.controller``)
runs as its own process (``python -m shoal.perf.scenarios.controlplane serve``), loaded
with a synthetic cluster: N pods on 10 nodes in 50 meshed namespaces, N/5 Services
selecting them, N/10 AuthorizationPolicies selecting apps. The scenario's process runs 10
gRPC clients, each its own channel and config stream, speaking the real protocol (hello,
decode every push with the generated protobuf classes, ACK each push).

Figures, for N = 1,000 / 5,000 / 20,000 pods (quick: 1,000 / 5,000):
* ``controlplane.full_push[pods=N]``: fresh streams for 10 agents until every one has its
  full config (issue 5: <= 2 s at 5,000 pods).
* ``controlplane.pod_change[pods=N]``: one pod's IP changes in the controller (a command
  on its stdin) until all 10 agents have received the push carrying it; p50 and p99 over
  many changes (issue 5: p99 <= 100 ms).
* ``controlplane.rss[pods=N]``: the controller's peak RSS with 10 agents synced
  (issue 5: <= 300 MB at 5,000 pods).
* ``controlplane.load[pods=N]``: time to build the model from the objects.

The clients decode with protobuf (upb, C) rather than building ``shoal.xds`` model objects,
so the figure is the controller's, not a Python agent's decode time.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from shoal.perf.scenario import Context, Measurement, Scenario, Target

PATH = "shoal-controller"
AGENTS = 10
NAMESPACES = 50
# The agents' credentials are issued with this (perf-only) cluster key.
CREDENTIAL_KEY = b"perf-controlplane-credential-key!"


# -- the synthetic cluster ---------------------------------------------------------------------

def cluster_objects(pods: int) -> list[dict]:
    services, policies = max(1, pods // 5), max(1, pods // 10)
    objs: list[dict] = []
    for n in range(NAMESPACES):
        objs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": f"ns-{n}", "labels": {"shoal.io/mesh": "enabled"}}})
    for i in range(pods):
        app = i % services
        objs.append(pod_object(i, app, f"10.{100 + i // 65000}.{(i // 250) % 256}.{i % 250 + 1}"))
    for s in range(services):
        objs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": f"svc-{s}", "namespace": f"ns-{s % NAMESPACES}"},
                     "spec": {"selector": {"app": f"app-{s}"},
                              "clusterIP": f"10.96.{s // 250}.{s % 250 + 1}",
                              "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    for p in range(policies):
        app = (p * 2) % services
        objs.append({"apiVersion": "security.shoal.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": f"policy-{p}", "namespace": f"ns-{app % NAMESPACES}"},
                     "spec": {"action": "ALLOW", "selector": {"matchLabels": {"app": f"app-{app}"}},
                              "rules": [{"from": [{"source": {"namespaces": ["ns-1", "ns-2"]}}],
                                         "to": [{"operation": {"ports": ["8080"]}}]}]}})
    return objs


def pod_object(i: int, app: int, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"pod-{i}", "namespace": f"ns-{app % NAMESPACES}",
                         "labels": {"app": f"app-{app}", "version": "v1"}},
            "spec": {"nodeName": f"node-{i % AGENTS + 1}", "serviceAccountName": f"sa-{app % 200}",
                     "containers": [{"name": "main", "command": ["sleep", "inf"]}]},
            "status": {"phase": "Running", "podIP": ip}}


# -- the controller process ------------------------------------------------------------------

async def serve(pods: int, port_file: str) -> None:
    import tempfile
    from pathlib import Path

    from shoal.controller.auth import NodeCredentialAuthenticator
    from shoal.controller.ca import CertificateAuthority
    from shoal.controller.controlplane import ControlPlane
    from shoal.controller.identity import IdentityAllocator
    from shoal.controller.model import MeshModel
    from shoal.credentials import NodeCredentials

    state = Path(tempfile.mkdtemp(prefix="shoal-perf-cp-"))
    ca = CertificateAuthority.load_or_create(state / "ca", "cluster.local")
    plane = ControlPlane(MeshModel(IdentityAllocator(state / "identities")), ca,
                         NodeCredentialAuthenticator(NodeCredentials(CREDENTIAL_KEY)))
    objs = cluster_objects(pods)
    started = time.perf_counter()
    plane.apply([("ADDED", o) for o in objs])
    load_s = time.perf_counter() - started
    port = await plane.start("127.0.0.1:0")
    Path(port_file).write_text(f"{port} {load_s}\n")
    services = max(1, pods // 5)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "change":
            i, serial = int(line[1]), int(line[2])
            plane.apply([("MODIFIED", pod_object(
                i, i % services, f"10.250.{serial // 250 % 256}.{serial % 250 + 1}"))])
        elif line[0] == "quit":
            break
    await plane.stop(0)


# -- the agents ---------------------------------------------------------------------------------

class Agent:
    """One stand-in agent: a config stream that decodes and ACKs every push."""

    def __init__(self, address: str, node: str) -> None:
        self.address, self.node = address, node
        self.resources: dict[str, str] = {}
        self.synced = asyncio.Event()
        self.waiting: dict[str, asyncio.Future] = {}

    async def run(self) -> None:
        import grpc

        from shoal.api import config_pb2 as pb
        from shoal.api import config_pb2_grpc as pb_grpc
        from shoal.xds.client import CHANNEL_OPTIONS

        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.ConfigDiscoveryStub(channel)
            replies: asyncio.Queue = asyncio.Queue()
            replies.put_nowait(pb.DeltaRequest(node=self.node, component="agent"))

            async def requests():
                while True:
                    yield await replies.get()

            from shoal.credentials import NodeCredentials
            token = NodeCredentials(CREDENTIAL_KEY).issue(self.node)
            call = stub.StreamConfig(requests(), metadata=(("authorization", f"Bearer {token}"),))
            async for push in call:
                for resource in push.resources:
                    key = f"{resource.type}/{resource.name}"
                    self.resources[key] = resource.version
                    waiter = self.waiting.pop(key, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(time.perf_counter())
                for key in push.removed:
                    self.resources.pop(key, None)
                replies.put_nowait(pb.DeltaRequest(response_nonce=push.nonce))
                self.synced.set()


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def measure(pods: int, repetitions: int, changes: int, workdir) -> dict:
    port_file = workdir / f"controlplane-{pods}.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "shoal.perf.scenarios.controlplane", "serve",
                             "--pods", str(pods), "--port-file", str(port_file)],
                            stdin=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not port_file.exists() or not port_file.read_text().endswith("\n"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"controller for {pods} pods did not start")
            await asyncio.sleep(0.05)
        port, load_s = port_file.read_text().split()
        address = f"127.0.0.1:{port}"
        full_push = []
        agents: list[Agent] = []
        tasks: list[asyncio.Task] = []
        for _ in range(repetitions):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            agents = [Agent(address, f"node-{i + 1}") for i in range(AGENTS)]
            started = time.perf_counter()
            tasks = [asyncio.ensure_future(a.run()) for a in agents]
            await asyncio.wait_for(asyncio.gather(*(a.synced.wait() for a in agents)), 120)
            full_push.append(time.perf_counter() - started)
        expected = len(agents[0].resources)
        rss, peak = _rss_mb(proc.pid)
        latencies = []
        for serial in range(changes):
            i = (serial * 7919) % pods
            key = f"workload/ns-{(i % max(1, pods // 5)) % NAMESPACES}/pod-{i}"
            loop = asyncio.get_running_loop()
            waits = []
            for agent in agents:
                agent.waiting[key] = loop.create_future()
                waits.append(agent.waiting[key])
            sent = time.perf_counter()
            proc.stdin.write(f"change {i} {serial}\n".encode())
            proc.stdin.flush()
            arrivals = await asyncio.wait_for(asyncio.gather(*waits), 30)
            latencies.append(max(arrivals) - sent)
            await asyncio.sleep(0.005)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"load": float(load_s), "full_push": full_push, "latencies": latencies,
                "rss": rss, "peak": max(peak, _rss_mb(proc.pid)[1]), "resources": expected}
    finally:
        if proc.poll() is None:
            proc.stdin.write(b"quit\n")
            proc.stdin.flush()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(ctx: Context) -> Iterator[Measurement]:
    sizes = (1000, 5000) if ctx.quick else (1000, 5000, 20000)
    changes = 50 if ctx.quick else 200
    for pods in sizes:
        ctx.log(f"controlplane: {pods} pods, {pods // 5} services, {pods // 10} policies, "
                f"{AGENTS} agents")
        result = asyncio.run(measure(pods, ctx.repetitions, changes, ctx.workdir))
        name = f"[pods={pods}]"
        note = f"{result['resources']} resources per agent"
        yield Measurement(f"controlplane.full_push{name}", PATH, "seconds", "s",
                          tuple(result["full_push"]), better="lower", note=note)
        lat_ms = [v * 1000 for v in result["latencies"]]
        yield Measurement(f"controlplane.pod_change{name}", PATH, "p50", "ms",
                          (statistics.median(lat_ms),), better="lower",
                          note=f"{len(lat_ms)} changes, each to all {AGENTS} agents")
        yield Measurement(f"controlplane.pod_change{name}", PATH, "p99", "ms",
                          (_percentile(lat_ms, 0.99),), better="lower",
                          note=f"{len(lat_ms)} changes, each to all {AGENTS} agents")
        yield Measurement(f"controlplane.rss{name}", PATH, "peak", "MB", (result["peak"],),
                          better="lower", note=f"RSS now {result['rss']:.0f} MB")
        yield Measurement(f"controlplane.load{name}", PATH, "seconds", "s", (result["load"],),
                          better="lower", note="objects -> model, encoded")


SCENARIO = Scenario(
    name="controlplane",
    title="Controller scale: full config and single-change latency to 10 agents, RSS",
    run=run,
    requires=(),
    targets=(
        Target("controlplane.full_push[pods=5000]", "seconds", PATH, "<=", 2.0),
        Target("controlplane.pod_change[pods=5000]", "p99", PATH, "<=", 100.0),
        Target("controlplane.rss[pods=5000]", "peak", PATH, "<=", 300.0),
    ),
    order=50,
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.perf.scenarios.controlplane")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="the controller process of the benchmark")
    serve_parser.add_argument("--pods", type=int, required=True)
    serve_parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.pods, args.port_file))


if __name__ == "__main__":
    main()

"""What the agent's eBPF capture costs: connection set-up with and without it, and the
time from a policy change to the kernel map.

Runs on a bed of its own (two pod namespaces on a veth pair, a node cgroup, a pin dir,
all named shoal-pc<pid>-*), with the real programs loaded by the real loader:

- `capture.connect_rr[outbound]`: connect + 1-byte request + reply + close, in a loop,
  from a process in pod a to a server on 127.0.0.1:15001 inside pod a. `direct`
  connects there itself (loopback is never captured); `capture` connects to pod b's
  IP and is rewritten there by connect4 (+ sockops records the original destination):
  same server, same socket path, the difference is the capture.
- `capture.connect_rr[socket-lb]`: pod b (unmeshed) to pod a's :8080, `direct` to the
  pod IP, `socket-lb` to a Service VIP rewritten by connect4.
- `capture.connect_rr[inbound]`: pod b to pod a's :8080, `direct` without tc, `steered`
  with tc in pod a (every packet looked up, the SYN assigned to the :15006 listener).
- `capture.kernel_cost`: the in-kernel time per connection as the programs measure it
  (bpf_ktime_get_ns around the work, into a per-CPU log2 histogram; the median, since
  a preempted run would swamp a mean); the agent exports the same figures as
  shoal_agent_capture_cost_nanoseconds{stat="p50"}.
- `capture.policy_to_map[workloads=N]`: a DENY policy pushed into ConfigState until the
  policy_deny map holds it (the agent's map reconciler, diffing against the kernel).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.perf.scenario import PATH_DIRECT, Context, Measurement, Scenario, Target

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
BPFFS_ROOT = Path("/sys/fs/bpf")
POD_A, POD_B = "10.99.7.2", "10.99.7.3"
VIP = "10.96.77.7"
OUTBOUND = "capture.connect_rr[outbound]"
SOCKET_LB = "capture.connect_rr[socket-lb]"
INBOUND = "capture.connect_rr[inbound]"
KERNEL_COST = "capture.kernel_cost"

SERVER = textwrap.dedent("""
    import socket, sys, threading
    def serve(host, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port)); sock.listen(512)
        while True:
            conn, _ = sock.accept()
            conn.recv(16); conn.sendall(b"y"); conn.close()
    threading.Thread(target=serve, args=("0.0.0.0", 8080), daemon=True).start()
    threading.Thread(target=serve, args=("0.0.0.0", 15006), daemon=True).start()
    print("ready", flush=True)
    serve("127.0.0.1", 15001)
""")

CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    started = time.perf_counter()
    for _ in range(count):
        sock = socket.socket()
        sock.connect((host, port)); sock.sendall(b"x"); sock.recv(16); sock.close()
    print(json.dumps({"us_per_conn": (time.perf_counter() - started) / count * 1e6}))
""")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class CaptureBed:
    def __init__(self, tag: str):
        from shoal.config import ClusterLayout
        self.layout = ClusterLayout(name=tag)
        self.tag = tag
        self.netns = {"a": f"{tag}-a", "b": f"{tag}-b"}
        self.node_cgroup = self.layout.node_cgroup("node-1")
        self.cgroups = {pod: self.node_cgroup / "pods" / pod for pod in ("a", "b")}
        self.pin_dir = self.layout.bpf_pin_dir("node-1")

    def build(self) -> None:
        for pod, netns in self.netns.items():
            _sh("ip", "netns", "add", netns)
            _sh("ip", "-n", netns, "link", "set", "lo", "up")
            self.cgroups[pod].mkdir(parents=True)
        _sh("ip", "-n", self.netns["a"], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", self.netns["b"])
        for pod, ip in (("a", POD_A), ("b", POD_B)):
            _sh("ip", "-n", self.netns[pod], "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", self.netns[pod], "link", "set", "eth0", "up")

    def spawn(self, pod: str, code: str, *args: str, in_cgroup: bool = True) -> subprocess.Popen:
        argv = ["ip", "netns", "exec", self.netns[pod], sys.executable, "-c", code, *args]
        if in_cgroup:   # a shell joins the pod's cgroup, then execs (no preexec_fn)
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroups[pod] / "cgroup.procs"), *argv]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        from shoal.agent.loader import detach_cgroup
        if self.pin_dir.exists():
            detach_cgroup(self.pin_dir, self.node_cgroup)
        for netns in self.netns.values():
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(BPFFS_ROOT / self.tag, ignore_errors=True)
        for path in sorted((CGROUP_ROOT / self.tag).glob("**/"), key=lambda p: len(p.parts), reverse=True):
            try:
                path.rmdir()
            except OSError:
                pass


@contextmanager
def capture_bed() -> Iterator[CaptureBed]:
    bed = CaptureBed(f"shoal-pc{os.getpid()}")
    try:
        bed.build()
        yield bed
    finally:
        bed.close()


def _loop(bed: CaptureBed, pod: str, host: str, port: int, count: int) -> float:
    proc = bed.spawn(pod, CLIENT, host, str(port), str(count))
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"client loop failed: {err.strip()[-500:]}")
    return json.loads(out)["us_per_conn"]


def _kernel_ns(before: dict, after: dict, programs: tuple[str, ...]) -> float:
    """Median in-kernel ns per connection over one loop: p50 of each program, summed."""
    from shoal.agent.mapsync import histogram_quantile
    total = 0.0
    for program in programs:
        delta = [a - b for a, b in zip(after[program], before[program])]
        total += histogram_quantile(delta, 0.5) or 0.0
    return total


def _policy_latency(maps, samples: int, workloads: int) -> list[float]:
    """ms from ConfigState.apply(DENY) until the map holds it (reconciler runs on apply)."""
    from shoal.agent.app import MapReconciler
    from shoal.xds import model as m
    from shoal.xds.state import ConfigState
    state = ConfigState()
    reconciler = MapReconciler("node-1", state, maps)
    state.subscribe(reconciler.sync)
    pods = []
    for i in range(workloads):
        ns = f"ns{i % 20}"
        pods.append(m.Workload(uid=f"{ns}/p{i}", name=f"p{i}", namespace=ns, service_account=f"sa{i % 50}",
                               node=f"node-{1 + i % 2}", ip=f"10.250.{i // 250}.{1 + i % 250}",
                               identity=1000 + (i % 20) * 50 + i % 50, spiffe_id="", meshed=True,
                               labels=m.Labels({"app": f"app{i % 40}"})))
    services = [m.Service(name=f"s{i}", namespace=f"ns{i % 20}", vip=f"10.96.{200 + i // 250}.{1 + i % 250}",
                          ports=(m.ServicePort("tcp", 80, 8080),),
                          endpoints=tuple(p.uid for p in pods[i::50])) for i in range(50)]
    state.apply(m.ConfigDelta("0", upserted=(*pods, *services)))
    latencies = []
    try:
        for i in range(samples):
            policy = m.Authorization(name=f"deny-{i}", namespace="ns3", action="DENY",
                                     selector=m.Labels({}),
                                     rules=(m.Rule(sources=(m.Source(namespaces=(f"ns{i % 20}",)),),
                                                   operations=(m.Operation(ports=(7000 + i,)),)),))
            started = time.perf_counter()
            state.apply(m.ConfigDelta(str(2 * i + 1), upserted=(policy,)))
            elapsed = time.perf_counter() - started
            if not any(entry.dport == 7000 + i for entry in maps.policies()):
                raise RuntimeError("the DENY did not reach the kernel map")
            latencies.append(elapsed * 1000)
            state.apply(m.ConfigDelta(str(2 * i + 2), removed=(f"authorization/ns3/deny-{i}",)))
    finally:
        maps.sync_policies({})
        maps.sync_services({})
        maps.sync_endpoints({})
    return latencies


def _inbound(ctx: Context, bed: CaptureBed, datapath, maps, count: int) -> Iterator[Measurement]:
    from shoal.agent.netns import attach_tc_ingress, detach_tc_ingress
    netns = f"/run/netns/{bed.netns['a']}"
    paths = {PATH_DIRECT: [], "steered": []}
    cost = []
    for _ in range(ctx.repetitions):
        paths[PATH_DIRECT].append(_loop(bed, "b", POD_A, 8080, count))
        attach_tc_ingress(netns, datapath.tc_program_fd())
        try:
            before = maps.cost_histograms()
            paths["steered"].append(_loop(bed, "b", POD_A, 8080, count))
            cost.append(_kernel_ns(before, maps.cost_histograms(), ("tc",)))
        finally:
            detach_tc_ingress(netns)
    for path, samples in paths.items():
        yield Measurement(INBOUND, path, "per_conn", "us", tuple(samples), better="lower",
                          note=f"{count} connect+request+close per sample")
    yield Measurement(KERNEL_COST, "inbound-steer", "per_packet", "ns", tuple(cost), better="lower",
                      note="p50 of tc_ingress per packet (SYN: two socket lookups + sk_assign)")


def run(ctx: Context) -> Iterator[Measurement]:
    from shoal.agent.loader import Datapath, FeatureFlags
    from shoal.agent.mapsync import DatapathMaps
    from shoal.agent.netns import netns_cookie
    from shoal.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND
    count = 300 if ctx.quick else 1500
    with capture_bed() as bed:
        datapath = Datapath(bed.pin_dir, FeatureFlags(PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_HBONE))
        datapath.start(bed.node_cgroup)
        maps = DatapathMaps(bed.pin_dir)
        # the server runs in pod a's netns but outside the node cgroup: never captured itself
        server = bed.spawn("a", SERVER, in_cgroup=False)
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError(f"server did not start: {server.stderr.read()[-500:]}")
            maps.set_pod(netns_cookie(f"/run/netns/{bed.netns['a']}"), 4242, POD_A, ns_id=1)
            maps.sync_services({(VIP, 80, 6): ((POD_A, 8080),)})
            outbound = {PATH_DIRECT: [], "capture": []}
            balanced = {PATH_DIRECT: [], "socket-lb": []}
            cost_capture, cost_lb = [], []
            for pod, host, port in (("a", "127.0.0.1", PORT_OUTBOUND), ("a", POD_B, 8080), ("b", VIP, 80)):
                _loop(bed, pod, host, port, count // 3)   # warm-up: page cache, slab, conntrack-free paths
            for _ in range(ctx.repetitions):
                # interleaved, so drift on this shared machine hits every path alike
                outbound[PATH_DIRECT].append(_loop(bed, "a", "127.0.0.1", PORT_OUTBOUND, count))
                before = maps.cost_histograms()
                outbound["capture"].append(_loop(bed, "a", POD_B, 8080, count))
                cost_capture.append(_kernel_ns(before, maps.cost_histograms(), ("connect", "sockops")))
                balanced[PATH_DIRECT].append(_loop(bed, "b", POD_A, 8080, count))
                before = maps.cost_histograms()
                balanced["socket-lb"].append(_loop(bed, "b", VIP, 80, count))
                cost_lb.append(_kernel_ns(before, maps.cost_histograms(), ("connect",)))
            for path, samples in outbound.items():
                yield Measurement(OUTBOUND, path, "per_conn", "us", tuple(samples), better="lower",
                                  note=f"{count} connect+request+close per sample")
            for path, samples in balanced.items():
                yield Measurement(SOCKET_LB, path, "per_conn", "us", tuple(samples), better="lower",
                                  note=f"{count} connect+request+close per sample")
            yield Measurement(KERNEL_COST, "capture", "per_conn", "ns", tuple(cost_capture), better="lower",
                              note="p50 of connect4 + p50 of sockops (log2 histogram in the kernel)")
            yield Measurement(KERNEL_COST, "socket-lb", "per_conn", "ns", tuple(cost_lb), better="lower",
                              note="p50 of connect4")
            maps.remove_pod(netns_cookie(f"/run/netns/{bed.netns['a']}"))
            maps.sync_services({})
            yield from _inbound(ctx, bed, datapath, maps, count)
            for workloads in ((200,) if ctx.quick else (200, 2000)):
                samples = _policy_latency(maps, max(5, ctx.repetitions * 3), workloads)
                yield Measurement(f"capture.policy_to_map[workloads={workloads}]", "agent", "latency", "ms",
                                  tuple(samples), better="lower",
                                  note="ConfigState.apply(DENY) until policy_deny holds it")
        finally:
            server.kill()
            server.wait()
            maps.close()
            datapath.close()


SCENARIO = Scenario(
    name="capture",
    title="Agent eBPF capture: connection set-up cost, socket-LB, policy to kernel map",
    run=run,
    requires=("root",),
    targets=(
        Target(KERNEL_COST, "per_conn", "capture", "<=", 10_000, kind="absolute",
               label="capture costs <= 10 us per connection in the kernel"),
        Target(OUTBOUND, "per_conn", "capture", "<=", 10, kind="added", against=PATH_DIRECT,
               label="capture adds <= 10 us per connection, end to end"),
        Target(INBOUND, "per_conn", "steered", "<=", 10, kind="added", against=PATH_DIRECT,
               label="inbound steering adds <= 10 us per connection, end to end"),
        Target("capture.policy_to_map[workloads=200]", "latency", "agent", "<=", 10, kind="absolute",
               label="policy change reaches the kernel map <= 10 ms"),
    ),
    order=15,
)

"""Pod to pod across two nodes through two Shoal node proxies (HBONE, mTLS), issue 4.

Same workload as ``baseline`` (direct, stunnel4 pair, haproxy pair): single-stream
iperf3 and 1 KiB sockperf ping-pong at a fixed 1,000 msg/s, with the CPU and RSS of
both node proxies during the fixed-rate run. Plus the proxies' RSS idle and while the
client holds 1,000 open connections through them.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from shoal.perf import pod2pod, procstat
from shoal.perf.scenario import PATH_DIRECT, Context, Measurement, Scenario, Target

NAMESPACE = "perf-mesh"
PATH = "shoal-l4"
HOLD_PORT = 7100
OPEN_CONNECTIONS = 1000
IDLE = "proxy.rss_idle"
HELD = f"proxy.rss[conns={OPEN_CONNECTIONS}]"

# A listener that accepts and holds connections (server pod), and a client that opens
# N of them, reports, and holds them until stdin closes or a timeout.
_HOLD_SERVER = """
import socket, sys, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096)
held = []
while True:
    c, _ = s.accept(); held.append(c)
"""
_HOLD_CLIENT = """
import socket, sys, time
host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
conns = []
for _ in range(n):
    c = socket.create_connection((host, port), timeout=10); c.send(b"x"); conns.append(c)
print(len(conns), flush=True)
time.sleep(hold)
"""


def _rss(pids) -> float:
    """Peak RSS of the largest single node proxy (the targets are per proxy)."""
    peaks = []
    for pid in pids:
        with procstat.ProcessSampler([pid]) as sampler:
            time.sleep(0.5)
        peaks.append(sampler.usage.rss_peak_mb if sampler.usage else 0.0)
    return max(peaks, default=0.0)


def run(ctx: Context) -> Iterator[Measurement]:
    client = ctx.bed.pod(NAMESPACE, "client", "node-1", meshed=True, service_account="client")
    server = ctx.bed.pod(NAMESPACE, "server", "node-2", meshed=True, service_account="server")
    proxies = lambda: ctx.bed.component_pids("proxy", nodes=("node-1", "node-2"))
    yield Measurement(IDLE, PATH, "rss", "MB", (_rss(proxies()),), "lower", "largest node proxy")
    with pod2pod.servers(ctx, server):
        yield from pod2pod.measure(ctx, PATH, client, server.ip, processes=proxies)
    holder = server.spawn([sys.executable, "-c", _HOLD_SERVER, str(HOLD_PORT)],
                          log=ctx.workdir / "hold-server.log")
    try:
        time.sleep(1.0)
        opener = client.spawn([sys.executable, "-c", _HOLD_CLIENT, server.ip, str(HOLD_PORT),
                               str(OPEN_CONNECTIONS), "30"], log=ctx.workdir / "hold-client.log")
        try:
            deadline = time.monotonic() + 60
            log = ctx.workdir / "hold-client.log"
            while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
                time.sleep(0.5)
            opened = log.read_text().strip() if log.exists() else ""
            if opened != str(OPEN_CONNECTIONS):
                ctx.log(f"  held connections: {opened or 'none'} (wanted {OPEN_CONNECTIONS})")
            else:
                yield Measurement(HELD, PATH, "rss", "MB", (_rss(proxies()),), "lower",
                                  f"largest node proxy, {OPEN_CONNECTIONS} open client connections")
        finally:
            ctx.bed.stop(opener)
    finally:
        ctx.bed.stop(holder)


SCENARIO = Scenario(
    name="shoal_l4",
    title="Pod to pod through two Shoal node proxies (HBONE mTLS)",
    run=run,
    requires=("root", "cluster", "bin:iperf3", "bin:sockperf"),
    targets=(
        Target(pod2pod.STREAM, "throughput", PATH, ">=", 1.0, kind="ratio", against="haproxy"),
        Target(pod2pod.STREAM, "throughput", PATH, ">=", 1.5, kind="ratio", against="stunnel"),
        Target(pod2pod.STREAM, "throughput", PATH, ">=", 0.4, kind="ratio", against=PATH_DIRECT,
               label="stretch"),
        Target(pod2pod.RR, "p50", PATH, "<=", 150, kind="added", against=PATH_DIRECT),
        Target(pod2pod.RR, "p99", PATH, "<=", 500, kind="added", against=PATH_DIRECT),
        Target(pod2pod.RR, "p50", PATH, "<=", 0, kind="added", against="stunnel"),
        Target(pod2pod.RR, "p99", PATH, "<=", 0, kind="added", against="stunnel"),
        Target(pod2pod.RR, "cpu", PATH, "<=", 0.15),
        Target(IDLE, "rss", PATH, "<=", 60),
        Target(HELD, "rss", PATH, "<=", 120),
    ),
    order=20,
)

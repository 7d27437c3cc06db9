"""Memory of the Shoal node proxies (issues 4 and 13): RSS idle, and while the client
holds 1,000 open connections through them.

The Shoal path's throughput, latency and CPU are measured by ``baseline``, in the same
interleaved rounds as direct and the stunnel4 and haproxy pairs.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from shoal.perf import pod2pod, procstat
from shoal.perf.scenario import Context, Measurement, Scenario, Target

PATH = pod2pod.PATH_SHOAL
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


def _worker_rss(pids: list[int]) -> float:
    """Peak RSS of the largest node proxy worker (or single process): the targets are per
    worker, and a supervisor carries no connection."""
    workers, _ = procstat.split_supervisors(pids)
    with procstat.ProcessSampler(workers, interval=0.25) as sampler:
        time.sleep(1.0)
    return max(sampler.rss_peak_per_process_mb.values(), default=0.0) if sampler.usage else 0.0


def run(ctx: Context) -> Iterator[Measurement]:
    client, server = pod2pod.meshed_pods(ctx.bed)
    proxies = pod2pod.node_proxies(ctx.bed)
    yield from pod2pod.idle_rss(proxies, IDLE, PATH)
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
                yield Measurement(HELD, PATH, "rss", "MB", (_worker_rss(proxies()),), "lower",
                                  f"largest node proxy worker, {OPEN_CONNECTIONS} open client connections")
        finally:
            ctx.bed.stop(opener)
    finally:
        ctx.bed.stop(holder)


SCENARIO = Scenario(
    name="shoal_l4",
    title="Memory of the Shoal node proxies: idle, and holding 1,000 connections",
    run=run,
    requires=("root", "cluster"),
    targets=(
        Target(IDLE, "rss", PATH, "<=", 60, label="node proxy RSS idle ≤ 60 MB per worker"),
        Target(HELD, "rss", PATH, "<=", 120),
    ),
    order=20,
)

"""What one tunnel's close costs the node proxy, and whether new tunnels wait behind closes.

    python -m shoal.perf.closebench [--streams 2000] [--probe-seconds 4]

Local HBONE pairs (``shoal.perf.hbonepair``, real TLS and HTTP/2 on loopback; one per
100 streams, the stream cap of a pooled connection) with
the node proxy's telemetry on the serving end (Istio metrics, one flow per open and close
to a Unix datagram socket, the JSON access log to /dev/null). A client process opens
``--streams`` connections through it, echoes a line on each, then closes them all at
once, and opens a new connection every 20 ms meanwhile (connect, one echo). Prints JSON:
this process's CPU per close (both ends of the pair and the serving end's telemetry; the
apps and the flow receiver run in their own processes), the wall time for all closes, and
the new connections' latencies during the tear-down. Issue 18's post-burst stall was this
work on the receiving proxy (about 4 ms per close, measured under load).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from shoal.agent.ztunnel.telemetry import ConnectionRecord, ConnectionTelemetry, ProxyMetrics
from shoal.flows.emitter import FlowEmitter
from shoal.hbone import framing
from shoal.hbone.session import StreamPeer
from shoal.perf.connscripts import ECHO_APP
from shoal.perf.hbonepair import HbonePair
from shoal.runtime import access_log

STREAMS_PER_CONNECTION = 100

# The app side: holds N connections, closes them all at once on "go", probes meanwhile.
CLIENT = r"""
import asyncio, json, sys, time
ports, count, probe_seconds = [int(p) for p in sys.argv[1].split(",")], int(sys.argv[2]), float(sys.argv[3])
probe_port = int(sys.argv[4])

async def echo_once(reader, writer):
    writer.write(b"x\n"); await writer.drain()
    await reader.readline()

async def probe(port):
    began = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(echo_once(reader, writer), 30)
        writer.close()
        return time.monotonic() - began
    except (OSError, asyncio.TimeoutError):
        return None

async def main():
    held = []
    for i in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
        await echo_once(reader, writer)
        held.append(writer)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in held:
        writer.close()
    probes = []
    deadline = time.monotonic() + probe_seconds
    while time.monotonic() < deadline:
        probes.append(asyncio.ensure_future(probe(probe_port)))
        await asyncio.sleep(0.02)
    results = await asyncio.gather(*probes)
    print(json.dumps({"probes": results}), flush=True)

asyncio.run(main())
"""

# The agent's end of the flow socket: receives and counts, in its own process.
RECEIVER = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.bind(sys.argv[1])
print("bound", flush=True)
while True:
    sock.recv(65536)
"""


class TelemetryPair(HbonePair):
    """The pair, its serving end reporting each tunnel as the node proxy's inbound does."""

    telemetry: ConnectionTelemetry | None = None

    def upstream_peer(self, request: framing.TunnelRequested) -> StreamPeer:
        assert self.telemetry is not None
        record = ConnectionRecord("destination", "127.0.0.1", request.forwarded_port, request.host, request.port,
                                  mtls=True, route="inbound", src_identity="spiffe://bench/client",
                                  dst_identity="spiffe://bench/server")
        return StreamPeer(record, on_finished=self.telemetry.closed, tcp_is_client=False)

    def answered(self, peer: StreamPeer) -> None:
        assert self.telemetry is not None and isinstance(peer.record, ConnectionRecord)
        self.telemetry.opened(peer.record)
        peer.established()


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


async def bench(streams: int, probe_seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    workdir = Path(tempfile.mkdtemp(prefix="closebench-"))
    flow_path = workdir / "flows.sock"
    echo_port = 16000 + os.getpid() % 2000
    procs = [_spawn(ECHO_APP, str(echo_port)), _spawn(RECEIVER, str(flow_path))]
    try:
        for proc in procs:
            assert proc.stdout is not None
            await loop.run_in_executor(None, proc.stdout.readline)
        access_log("shoal.proxy.access", os.devnull)
        emitter = FlowEmitter(flow_path)
        telemetry = ConnectionTelemetry(ProxyMetrics(CollectorRegistry()), emitter)
        pairs = []
        for _ in range(-(-streams // STREAMS_PER_CONNECTION) + 1):   # the last one for the probes
            pair = TelemetryPair(("127.0.0.1", echo_port))
            pair.telemetry = telemetry
            pairs.append(await pair.start())
        client = _spawn(CLIENT, ",".join(str(p.port) for p in pairs[:-1]), str(streams), str(probe_seconds),
                        str(pairs[-1].port))
        procs.append(client)
        assert client.stdin is not None and client.stdout is not None
        await loop.run_in_executor(None, client.stdout.readline)   # all held
        opened = len(telemetry.live)
        cpu, wall = time.process_time(), time.monotonic()
        client.stdin.write("go\n")
        client.stdin.flush()
        while telemetry.live:
            await asyncio.sleep(0.005)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        summary = json.loads(await loop.run_in_executor(None, client.stdout.readline))
        probes = summary["probes"]
        answered = sorted(p for p in probes if p is not None)
        for pair in pairs:
            await pair.close()
        emitter.close()
        return {
            "streams": opened, "close_wall_s": round(wall, 3),
            "cpu_per_close_us": round(cpu / max(opened, 1) * 1e6, 1),
            "flows_sent": emitter.sent, "flows_dropped": emitter.dropped,
            "probes": len(probes), "probes_failed": len(probes) - len(answered),
            "probe_p50_ms": round(answered[len(answered) // 2] * 1000, 1) if answered else None,
            "probe_max_ms": round(answered[-1] * 1000, 1) if answered else None,
        }
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--probe-seconds", type=float, default=4.0)
    args = parser.parse_args()
    import uvloop
    print(json.dumps(uvloop.run(bench(args.streams, args.probe_seconds))))


if __name__ == "__main__":
    main()

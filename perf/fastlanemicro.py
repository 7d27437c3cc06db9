"""CPU of the waypoint's plain fast path in Python alone: no sockets, no kernel.

    python -m shoal.perf.fastlanemicro [--requests 20000] [--repeat 5] [--connections 16]

The perf scenario's plain path (``h2load --h1``: a 1 KiB POST, a 1 KiB answer from haproxy)
in one process: a real ``WaypointProxy`` with its fast lanes (``fastpath.FastLane``) and
its plaintext wiring (``StaticResolver``, no access log, no flows), whose downstream and
upstream ``TcpStream``s sit on in-memory transports: the client's next request and the
origin's answer arrive on the next loop turn after the write before them, as from a
socket. Each connection's client checks that every answer is the origin's. Prints the
process CPU per request (``process_time``); A/B by running each tree with ``PYTHONPATH``
(laid out as installed: ``PATH/shoal/waypoint``...), rounds interleaved.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from prometheus_client import CollectorRegistry

from shoal.perf.rrmicro import StandInTransport
from shoal.perf.waypointmicro import ANSWER, BODY
from shoal.waypoint.app import GC_YOUNG_THRESHOLD
from shoal.waypoint.downstream import serve_connection
from shoal.waypoint.fastpath import fast_lanes
from shoal.waypoint.http import Limits, PeerInfo, TcpStream
from shoal.waypoint.listener import connection_callbacks
from shoal.waypoint.proxy import WaypointProxy
from shoal.waypoint.resolver import StaticResolver
from shoal.waypoint.telemetry import RequestTelemetry
from shoal.waypoint.upstream import Endpoint

# The plain scenario's request as h2load sends it (waypointmicro's is the mesh path's).
REQUEST = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:18081\r\nUser-Agent: h2load nghttp2/1.52.0\r\n"
           b"Content-Length: 1024\r\n\r\n" + BODY)


class MemoryTransport(StandInTransport):
    """What a ``TcpStream`` writes goes to ``on_write`` at once (the rest as ``StandInTransport``)."""

    def __init__(self, on_write) -> None:
        super().__init__()
        self.on_write = on_write

    def write(self, data) -> None:
        self.on_write(data)


class OriginConnector:
    """Upstream connections whose far end answers each whole request with ``ANSWER``."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def open(self, endpoint: Endpoint) -> TcpStream:
        stream = TcpStream()
        received = bytearray()

        def on_write(data: bytes) -> None:
            received.extend(data)
            end = received.find(b"\r\n\r\n")
            if end >= 0 and len(received) >= end + 4 + len(BODY):
                del received[:end + 4 + len(BODY)]
                self.loop.call_soon(stream.data_received, ANSWER)

        stream.connection_made(MemoryTransport(on_write))
        return stream


class Client:
    """One keep-alive connection: a request, the whole answer (checked), then the next."""

    def __init__(self, proxy: WaypointProxy, limits: Limits, lanes, port: int, requests: int,
                 done: asyncio.Future) -> None:
        self.loop = asyncio.get_running_loop()
        self.left = requests
        self.done = done
        self.received = bytearray()
        self.expected = b""
        self.stream = TcpStream()
        self.stream.connection_made(MemoryTransport(self._answer))
        reject, on_protocol = connection_callbacks(proxy, limits)
        self.task = self.loop.create_task(serve_connection(self.stream, PeerInfo("127.0.0.1", port), proxy.handle,
                                                           limits, reject, on_protocol, lanes))

    def send(self) -> None:
        self.left -= 1
        self.loop.call_soon(self.stream.data_received, REQUEST)

    def _answer(self, data: bytes) -> None:
        received = self.received
        received.extend(data)
        if not self.expected:
            end = received.find(b"\r\n\r\n")
            if end < 0:
                return
            self.expected = bytes(received[:end + 4]) + BODY
        if len(received) < len(self.expected):
            return
        if received[:len(self.expected)] != self.expected or not self.expected.startswith(b"HTTP/1.1 200 OK\r\n") \
                or b"content-length: 1024\r\n" not in self.expected:
            self.done.set_exception(RuntimeError(f"not the origin's answer: {bytes(received[:300])!r}"))
            return
        del received[:len(self.expected)]
        if self.left:
            self.send()
        elif not self.done.done():
            self.done.set_result(None)


async def run(requests: int, connections: int) -> float:
    """CPU seconds per request of ``requests`` spread over ``connections``, after a warm-up."""
    limits = Limits()
    resolver = StaticResolver({("perf", "origin"): [Endpoint("127.0.0.1", 18080, name="origin-0", namespace="perf")]},
                              namespace="perf", default=("perf", "origin"))
    proxy = WaypointProxy(resolver, OriginConnector(), RequestTelemetry(CollectorRegistry()), limits)  # type: ignore[arg-type]
    lanes = fast_lanes(proxy)
    loop = asyncio.get_running_loop()

    async def batch(count: int) -> None:
        futures = [loop.create_future() for _ in range(connections)]
        clients = [Client(proxy, limits, lanes, 40000 + i, count // connections, f) for i, f in enumerate(futures)]
        for client in clients:
            client.send()
        await asyncio.gather(*futures)
        for client in clients:
            client.task.cancel()
        await asyncio.gather(*(c.task for c in clients), return_exceptions=True)

    await batch(connections * 50)      # warm: pooled connections, memo, caches
    served = proxy.fast_served
    start = time.process_time()
    await batch(requests)
    cpu = time.process_time() - start
    if proxy.fast_served - served != requests // connections * connections:
        raise RuntimeError(f"only {proxy.fast_served - served} requests took the fast path")
    await proxy.close()
    return cpu / (requests // connections * connections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:     # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    results = [runner(run(args.requests, args.connections)) * 1e6 for _ in range(args.repeat)]
    print(f"fast path: {min(results):.1f} µs CPU/request best, {statistics.median(results):.1f} median "
          f"({', '.join(f'{r:.1f}' for r in results)})")


if __name__ == "__main__":
    main()

"""CPU of the waypoint's mesh request path in Python alone: no sockets, no TLS, no kernel.

    python -m shoal.perf.waypointmicro [--requests 5000] [--repeat 5] [--no-telemetry]

The perf scenario's mesh path in one process: an HBONE client session (the client's node
proxy) opens a tunnel to a real waypoint (``WaypointProxy``, its HBONE listener's wiring,
the fast path, pooled HBONE upstreams), whose upstream session reaches a terminator session
(the origin's node proxy) that answers each request as the perf origin does (1 KiB POST,
1 KiB answer). The sessions are joined by in-memory wires that deliver each write on the
next loop turn, as a socket would. Prints the process CPU per request (``process_time``:
steadier than wall time on a busy machine) of the four parties together; the waypoint is
most of it, the rest is the same for every variant, so an A/B of waypoint code (run each
tree with ``PYTHONPATH``, interleaved) compares the waypoint's Python work. The garbage
collector is set as the waypoint process sets it (start-up objects frozen, young
collections every ``GC_YOUNG_THRESHOLD`` allocations). TLS and the kernel are not in it
(the scenario and ``hbonebench`` measure those): in the mesh they are
about as much again.

With telemetry (the default, as a mesh waypoint runs): an access log (batched, discarded)
and L7 flows to a stand-in agent socket, which this process drains.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import socket
import tempfile
import time
from typing import Any

from prometheus_client import CollectorRegistry

from shoal.hbone import framing
from shoal.hbone.session import HboneSession
from shoal.hbone.stream import HboneStream
from shoal.perf.rrmicro import StandInTransport, _into

CLIENT_ID = "spiffe://cluster.local/ns/perf-wp/sa/client"
ORIGIN_ID = "spiffe://cluster.local/ns/perf-wp/sa/origin"
VIP = "10.96.0.20"
BODY = b"x" * 1024
REQUEST = (b"POST / HTTP/1.1\r\nhost: origin-wp.perf-wp\r\nuser-agent: h2load nghttp2/1.52.0\r\n"
           b"content-length: 1024\r\n\r\n" + BODY)
ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\ncontent-type: text/plain\r\n"
          b"cache-control: no-cache\r\n\r\n" + BODY)


class Wire(StandInTransport):
    """One end of an in-memory connection: what is written reaches the other end's protocol
    on the next loop turn (every write of a turn at once, as one socket read)."""

    def __init__(self) -> None:
        super().__init__()
        self.peer: Any = None

    def write(self, data) -> None:
        if not self.writes:
            asyncio.get_running_loop().call_soon(self._deliver)
        super().write(data)

    def _deliver(self) -> None:
        _into(self.peer, self.take())


def join(client: HboneSession, server: HboneSession) -> None:
    to_server, to_client = Wire(), Wire()
    to_server.peer, to_client.peer = server, client
    client.connection_made(to_server)
    server.connection_made(to_client)


class StandInConnector:
    """The waypoint's upstream transport: streams on one HBONE session (no dial, no TLS)."""

    def __init__(self, session: HboneSession) -> None:
        self.session = session

    async def open(self, endpoint) -> HboneStream:
        stream = HboneStream()
        stream.response = asyncio.get_running_loop().create_future()
        self.session.open_stream(stream, endpoint.ip, endpoint.port, "10.244.1.3", framing.new_traceparent())
        await stream.response
        return stream


def origin(session: HboneSession, event: framing.TunnelRequested) -> None:
    """The origin behind its node proxy (an HBONE terminator's ``on_request``): one ANSWER
    per whole request."""
    stream = HboneStream()
    session.accept_stream(stream, event.stream_id)
    received = bytearray()

    def readable() -> None:
        while data := stream.read_nowait():
            received.extend(data)
        while (end := received.find(b"\r\n\r\n")) >= 0 and len(received) >= end + 4 + len(BODY):
            del received[:end + 4 + len(BODY)]
            stream.write(ANSWER)

    stream.on_readable = readable


class StandInAgent:
    """The node agent's flow socket, drained by the running loop (flows arrive, nobody reads
    them); ``close`` removes it and its folder."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="shoal-waypointmicro-")
        self.path = os.path.join(self.folder, "flows.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        try:
            while True:
                self.sock.recv(65536)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.folder)


class Client:
    """The client behind its node proxy, on one tunnel (an answered HBONE stream): a request,
    its whole answer (the origin's, or the exchange fails), then the next."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self._received = bytearray()
        self._answered: asyncio.Future | None = None
        stream.on_readable = self._readable

    def _readable(self) -> None:
        received, answered = self._received, self._answered
        while data := self.stream.read_nowait():
            received.extend(data)
        if len(received) >= len(ANSWER) and answered is not None and not answered.done():
            if received[:len(ANSWER)] == ANSWER:
                answered.set_result(None)
            else:
                answered.set_exception(RuntimeError(f"not the origin's answer: {bytes(received[:200])!r}"))
            del received[:len(ANSWER)]

    async def exchange(self) -> None:
        self._answered = asyncio.get_running_loop().create_future()
        self.stream.write(REQUEST)
        await asyncio.wait_for(self._answered, 5)


async def run(requests: int, telemetry: bool = True) -> dict[str, float]:
    """CPU seconds per request, and what the waypoint served (on its fast path, logged)."""
    from shoal.flows.emitter import FlowEmitter
    from shoal.waypoint.app import GC_YOUNG_THRESHOLD
    from shoal.waypoint.downstream import serve_connection
    from shoal.waypoint.fastpath import fast_lanes
    from shoal.waypoint.http import Limits, PeerInfo
    from shoal.waypoint.listener import connection_callbacks
    from shoal.waypoint.proxy import WaypointProxy
    from shoal.waypoint.resolver import StaticResolver
    from shoal.waypoint.telemetry import BatchedLines, RequestTelemetry
    from shoal.waypoint.upstream import Endpoint

    loop = asyncio.get_running_loop()
    logged = 0
    emitter = agent = None

    def count_lines(text: str) -> None:
        nonlocal logged
        logged += text.count("\n")

    if telemetry:
        agent = StandInAgent()
        emitter = FlowEmitter(agent.path)
    access_log = BatchedLines(count_lines) if telemetry else None
    request_telemetry = RequestTelemetry(CollectorRegistry(), access_log=access_log, flow_emitter=emitter)

    upstream, terminator = HboneSession(client_side=True, idle_timeout=0), \
        HboneSession(client_side=False, idle_timeout=0, on_request=origin)
    join(upstream, terminator)
    endpoint = Endpoint("10.244.2.2", 18080, "origin-0", "origin", "perf-wp", ORIGIN_ID, "HBONE")
    resolver = StaticResolver({("perf-wp", "origin-wp"): [endpoint]}, namespace="perf-wp",
                              vips={VIP: ("perf-wp", "origin-wp")})
    limits = Limits()
    proxy = WaypointProxy(resolver, StandInConnector(upstream), request_telemetry, limits, rng=random.Random(1))
    reject, on_protocol = connection_callbacks(proxy, limits)
    lanes = fast_lanes(proxy)
    tunnels: list[asyncio.Task] = []

    def on_tunnel(session: HboneSession, event: framing.TunnelRequested) -> None:
        # As the HBONE listener wires a tunnel (waypoint.hbone.start_hbone_listener).
        stream = HboneStream()
        session.accept_stream(stream, event.stream_id)
        peer = PeerInfo(source_ip="10.244.1.2", source_port=0, source_principal=CLIENT_ID,
                        destination_ip=event.host, destination_port=event.port, mtls=True)
        tunnels.append(loop.create_task(serve_connection(stream, peer, proxy.handle, limits, reject, on_protocol,
                                                         lanes)))

    node_proxy, downstream = HboneSession(client_side=True, idle_timeout=0), \
        HboneSession(client_side=False, idle_timeout=0, on_request=on_tunnel)
    join(node_proxy, downstream)
    client = HboneStream()
    client.response = loop.create_future()
    node_proxy.open_stream(client, VIP, 80, "10.244.1.2", framing.new_traceparent())
    assert await asyncio.wait_for(client.response, 5) == 200
    exchange = Client(client).exchange

    thresholds = gc.get_threshold()
    try:
        for _ in range(50):              # warm: the upstream connection, memo, answer heads
            await exchange()
        # The collector as the waypoint process sets it once started (waypoint.app.main).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
        fast_before = proxy.fast_served
        started = time.process_time()
        for _ in range(requests):
            await exchange()
        spent = time.process_time() - started
        fast = proxy.fast_served - fast_before
        request_telemetry.flush()
        if access_log is not None:
            access_log.flush()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        for task in tunnels:
            task.cancel()
        await asyncio.gather(*tunnels, return_exceptions=True)
        if agent is not None:
            agent.close()
        if emitter is not None:
            emitter.close()
    return {"cpu_per_request": spent / requests, "fast_path": fast / requests, "logged": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-telemetry", action="store_true", help="no access log and no flows")
    args = parser.parse_args()
    import uvloop
    results = sorted(uvloop.run(run(args.requests, not args.no_telemetry))["cpu_per_request"]
                     for _ in range(args.repeat))
    print(f"{results[len(results) // 2] * 1e6:.1f} µs of Python CPU per request through the waypoint's mesh path "
          f"(median of {args.repeat}; min {results[0] * 1e6:.1f}, max {results[-1] * 1e6:.1f}; "
          f"telemetry {'off' if args.no_telemetry else 'on'})")


if __name__ == "__main__":
    main()

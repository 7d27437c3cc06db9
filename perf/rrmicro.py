"""CPU of the node proxy's Python request/response path alone: no sockets, no TLS, no kernel.

    python -m shoal.perf.rrmicro [--requests 20000] [--size 1024] [--streams 1]

Two real ``HboneSession`` ends (client and server) with their ``StreamPeer`` sockets, joined
by stand-in transports that hand bytes straight across. One request: ``size`` bytes arrive
on the app's socket, leave as DATA in the client's flush, are parsed by the server end and
written to the upstream socket; the response goes back the same way. Prints the process
CPU time per request for both ends together (``time.process_time``: time the process is
preempted does not count, so it is steadier on a busy machine than wall time), i.e. the
interpreter's share of a request through two node proxies. The kernel's share (the socket
reads and writes, TLS) is not in it: ``hbonebench`` and the ``baseline`` scenario measure that.
"""
from __future__ import annotations

import argparse
import asyncio
import time

from shoal.hbone import framing
from shoal.hbone.session import HboneSession, StreamPeer
from shoal.perf.hbonepair import PairRecord


class StandInTransport(asyncio.Transport):
    """A socket that sends everything at once (nothing ever queued): keeps every write,
    for whoever drives the protocol to pass on. Each buffer of ``writelines`` is its own
    write, as each becomes its own TLS record in uvloop's TLS transport."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.reading = True
        self.aborted = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def take(self) -> bytes:
        data, self.writes = b"".join(self.writes), []
        return data

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


def _into(protocol, data: bytes) -> None:
    """What uvloop does for the protocol: buffered (get_buffer, buffer_updated) or copied."""
    if not data:
        return
    if hasattr(protocol, "get_buffer"):
        view = 0
        while view < len(data):
            buffer = protocol.get_buffer(len(data) - view)
            n = min(len(buffer), len(data) - view)
            buffer[:n] = data[view:view + n]
            protocol.buffer_updated(n)
            view += n
    else:
        protocol.data_received(data)


async def run(requests: int, size: int, streams: int) -> float:
    client_tls, server_tls = StandInTransport(), StandInTransport()
    upstreams: list[tuple[StreamPeer, StandInTransport]] = []

    def on_request(session: HboneSession, request: framing.TunnelRequested) -> None:
        peer, tcp = StreamPeer(PairRecord(), lambda r: None, tcp_is_client=False), StandInTransport()
        peer.connection_made(tcp)
        session.accept_stream(peer, request.stream_id)
        peer.established()
        upstreams.append((peer, tcp))

    client = HboneSession(client_side=True, idle_timeout=0)
    server = HboneSession(client_side=False, idle_timeout=0, on_request=on_request)
    client.connection_made(client_tls)
    server.connection_made(server_tls)
    apps: list[tuple[StreamPeer, StandInTransport]] = []
    for n in range(streams):
        peer, tcp = StreamPeer(PairRecord(), lambda r: None, tcp_is_client=True), StandInTransport()
        peer.response = asyncio.get_running_loop().create_future()
        client.open_stream(peer, "10.0.0.2", 8000 + n, "10.0.0.1", framing.new_traceparent())
        peer.connection_made(tcp)
        apps.append((peer, tcp))
    for _ in range(4):  # handshake, SETTINGS and their ACKs, the CONNECTs and their 200s
        _into(server, client_tls.take())
        _into(client, server_tls.take())
        await asyncio.sleep(0)
    for peer, _ in apps:
        peer.established()
    assert len(upstreams) == streams, "every CONNECT was answered"
    request, response = b"q" * size, b"r" * size
    started = time.process_time()
    for _ in range(requests // streams):
        for peer, _ in apps:
            _into(peer, request)
        await asyncio.sleep(0)            # the loop turn's end: one coalesced flush
        _into(server, client_tls.take())
        for peer, tcp in upstreams:
            assert len(tcp.take()) == size
            _into(peer, response)
        await asyncio.sleep(0)
        _into(client, server_tls.take())
        for _, tcp in apps:
            assert len(tcp.take()) == size
    return (time.process_time() - started) / (requests // streams * streams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams, one request each per turn")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import uvloop
    results = sorted(uvloop.run(run(args.requests, args.size, args.streams)) for _ in range(args.repeat))
    print(f"{results[len(results) // 2] * 1e6:.1f} µs of Python CPU per request, both ends "
          f"(median of {args.repeat}; min {results[0] * 1e6:.1f}, max {results[-1] * 1e6:.1f}; "
          f"{args.size} B each way, {args.streams} stream(s))")


if __name__ == "__main__":
    main()

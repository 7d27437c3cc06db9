"""A real waypoint process on the mesh path: mTLS HBONE in and out over loopback, one
request at a time; prints the waypoint process's CPU per request (from /proc) and the
round trips' p50/p99.

    python -m shoal.perf.waypointreal [--requests 5000] [--rate 1000] [--no-telemetry]
                                      [--pidfile F --wait-before S]   # to attach py-spy/strace

``waypointmicro`` measures the Python of a mesh request alone; here are TLS, the sockets and
the wake-ups too. The forked child is the waypoint as its app wires it (``start_hbone_listener``,
``HboneConnector``, the fast path, telemetry with the access log to /dev/null and flows to a
socket the parent drains; the garbage collector as the app sets it). The parent is the
client's node proxy (an HBONE client session), and the origin's node proxy with the origin
(an HBONE terminator answering each 1 KiB POST with 1 KiB as the perf origin does). The
identities come from a throw-away controller CA. ``--rate 0``: as fast as one request at a
time goes (CPU per request near the waypoint's max rate).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import signal
import tempfile
import time

from cryptography import x509

from shoal.perf.procstat import cpu_seconds
from shoal.perf.waypointmicro import CLIENT_ID, ORIGIN_ID, VIP, Client, StandInAgent, origin

WAYPOINT_ID = "spiffe://cluster.local/ns/perf-wp/sa/waypoint"


class ThrowAwayCA:
    """A controller CA in a temporary folder, as the identities' signer (``IdentityManager``)."""

    def __init__(self) -> None:
        from shoal.controller.ca import CertificateAuthority

        with tempfile.TemporaryDirectory(prefix="shoal-waypointreal-ca-") as folder:
            self.ca = CertificateAuthority.load_or_create(folder, "cluster.local")

    async def sign(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        csr = x509.load_pem_x509_csr(csr_pem)
        spiffe = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)[0]
        signed = self.ca.sign(csr_pem, spiffe)
        return signed.chain_pem.encode(), signed.roots_pem.encode()


async def waypoint(ca: ThrowAwayCA, setup_r: int, ready_w: int, telemetry_on: bool) -> None:
    from prometheus_client import CollectorRegistry

    from shoal.flows.emitter import FlowEmitter
    from shoal.hbone.issuer import IdentityManager
    from shoal.waypoint.app import GC_YOUNG_THRESHOLD
    from shoal.waypoint.hbone import HboneConnector, start_hbone_listener
    from shoal.waypoint.http import Limits
    from shoal.waypoint.proxy import WaypointProxy
    from shoal.waypoint.resolver import StaticResolver
    from shoal.waypoint.telemetry import BatchedLines, RequestTelemetry
    from shoal.waypoint.upstream import Endpoint

    loop = asyncio.get_running_loop()
    terminator_port, flows_path = (await loop.run_in_executor(None, os.read, setup_r, 4096)).decode().split(" ", 1)
    terminator_port = int(terminator_port)
    identities = IdentityManager(ca.sign)
    await identities.get(WAYPOINT_ID)
    endpoint = Endpoint("127.0.0.1", 18080, "origin-0", "origin", "perf-wp", ORIGIN_ID, "HBONE")
    resolver = StaticResolver({("perf-wp", "origin-wp"): [endpoint]}, namespace="perf-wp",
                              vips={VIP: ("perf-wp", "origin-wp")})
    devnull = open(os.devnull, "w")
    access_log = BatchedLines(devnull.write) if telemetry_on else None
    flows = FlowEmitter(flows_path) if telemetry_on else None
    telemetry = RequestTelemetry(CollectorRegistry(), access_log=access_log, flow_emitter=flows)
    connector = HboneConnector(identities, WAYPOINT_ID, "127.0.0.1", hbone_port=terminator_port, mark=None)
    proxy = WaypointProxy(resolver, connector, telemetry, Limits(), rng=random.Random(1))
    listener = await start_hbone_listener(proxy, Limits(), identities, WAYPOINT_ID, host="127.0.0.1", port=0)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    os.write(ready_w, str(listener.sockets[0].getsockname()[1]).encode())
    os.close(ready_w)
    await asyncio.Event().wait()


async def driver(ca: ThrowAwayCA, args: argparse.Namespace, pid: int, setup_w: int, ready_r: int) -> dict[str, float]:
    from shoal.hbone import framing
    from shoal.hbone.identity import check_session
    from shoal.hbone.issuer import IdentityManager
    from shoal.hbone.session import HboneSession
    from shoal.hbone.stream import HboneStream

    loop = asyncio.get_running_loop()
    identities = IdentityManager(ca.sign)
    origin_svid = await identities.get(ORIGIN_ID)
    client_svid = await identities.get(CLIENT_ID)

    terminator = await loop.create_server(
        lambda: HboneSession(client_side=False, idle_timeout=0, on_request=origin,
                             verify=lambda ssl_object: check_session(ssl_object, None)),
        "127.0.0.1", 0, ssl=origin_svid.server_context)
    agent = StandInAgent()
    os.write(setup_w, f"{terminator.sockets[0].getsockname()[1]} {agent.path}".encode())
    try:
        port = int((await loop.run_in_executor(None, os.read, ready_r, 64)).decode())
        if args.pidfile:
            with open(args.pidfile, "w") as f:
                f.write(str(pid))
        session = HboneSession(client_side=True, idle_timeout=0)
        await loop.create_connection(lambda: session, "127.0.0.1", port, ssl=client_svid.client_context,
                                     server_hostname="")
        client = HboneStream()
        client.response = loop.create_future()
        session.open_stream(client, VIP, 80, "10.244.1.2", framing.new_traceparent())
        assert await asyncio.wait_for(client.response, 5) == 200
        client_exchange = Client(client).exchange

        async def exchange() -> float:
            sent = time.perf_counter()
            await client_exchange()
            return time.perf_counter() - sent

        for _ in range(200):
            await exchange()
        if args.wait_before:
            await asyncio.sleep(args.wait_before)
        interval = 1 / args.rate if args.rate else 0
        rtts = []
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        next_at = loop.time()
        for _ in range(args.requests):
            if interval:
                next_at += interval
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            rtts.append(await exchange())
        cpu = cpu_seconds(pid) - cpu0
        wall = time.monotonic() - wall0
        rtts.sort()
        with open("/proc/loadavg") as f:
            load = float(f.read().split()[0])
        return {"cpu_per_request": cpu / args.requests, "p50": rtts[len(rtts) // 2],
                "p99": rtts[int(len(rtts) * 0.99)], "rate": args.requests / wall, "load": load}
    finally:
        agent.close()
        terminator.close()


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Fork the waypoint, drive it, kill it: the figures of one run."""
    import uvloop

    ca = ThrowAwayCA()
    setup_r, setup_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            uvloop.run(waypoint(ca, setup_r, ready_w, not args.no_telemetry))
        finally:
            os._exit(0)
    try:
        return uvloop.run(driver(ca, args, pid, setup_w, ready_r))
    finally:
        for fd in (setup_r, setup_w, ready_r, ready_w):
            os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000, help="requests per second, one at a time (0: unpaced)")
    parser.add_argument("--pidfile", default="", help="write the waypoint's pid here once it serves")
    parser.add_argument("--wait-before", type=float, default=0, help="seconds between warm-up and measure")
    parser.add_argument("--no-telemetry", action="store_true", help="no access log and no flows")
    return parser.parse_args(argv)


def main() -> None:
    result = measure(parse())
    print(f"waypoint CPU {result['cpu_per_request'] * 1e6:.0f} µs/request; round trip p50 {result['p50'] * 1e6:.0f} µs "
          f"p99 {result['p99'] * 1e6:.0f} µs; {result['rate']:.0f} req/s; load {result['load']:.2f}")


if __name__ == "__main__":
    main()

"""The controller under unauthenticated traffic (issue 18's target: RSS <= 300 MB).

The real controller process (``python -m shoal.controller``, local source, no kubelet, TLS)
on loopback. Rounds of four 200 MiB ``SignCertificate`` requests without a credential
(the attack that took it from 76 MB to 1.65 GB), then rounds of unauthenticated config
streams and oversized requests from an authenticated node; reports the process's RSS and
peak (VmHWM) and the refusals counted on /metrics.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from shoal.perf.scenario import Context, Measurement, Scenario, Target

PATH = "shoal-controller"
REQUEST_MIB = 200
CONCURRENT = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


async def _flood(address: str, bundle: bytes, token: str, rounds: int) -> dict:
    import grpc

    from shoal.api import config_pb2 as pb

    body = pb.CertificateRequest(csr_pem="A" * (REQUEST_MIB << 20)).SerializeToString()
    codes: dict[str, int] = {}
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(bundle),
                                       options=(("grpc.max_send_message_length", -1),)) as channel:
        sign = channel.unary_unary("/shoal.config.v1.CertificateAuthority/SignCertificate",
                                   request_serializer=lambda b: b,
                                   response_deserializer=pb.CertificateResponse.FromString)
        stream = channel.stream_stream("/shoal.config.v1.ConfigDiscovery/StreamConfig",
                                       request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)

        async def one(coro):
            try:
                await coro
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] = codes.get(err.code().name, 0) + 1

        async def drain(call):
            async for _ in call:
                pass

        for _ in range(rounds):
            await asyncio.gather(*(one(sign(body, timeout=60)) for _ in range(CONCURRENT)))
            await asyncio.gather(*(one(drain(stream(iter([body[:1 << 20]]), timeout=30)))
                                   for _ in range(CONCURRENT)))
            authed = (("authorization", f"Bearer {token}"),)
            await asyncio.gather(*(one(sign(body[:4 << 20], metadata=authed, timeout=60))
                                   for _ in range(CONCURRENT)))
    return codes


def run(ctx: Context) -> Iterator[Measurement]:
    from shoal.config import ClusterLayout
    from shoal.credentials import NodeCredentials
    from shoal.local.apiclient import ApiClient

    rounds = 2 if ctx.quick else 5
    layout = ClusterLayout(name=f"shoal-perf-flood{os.getpid()}")
    grpc_port, admin_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.controller", "--cluster", layout.name, "--no-kubelet",
         "--grpc-address", f"127.0.0.1:{grpc_port}", "--admin-address", f"127.0.0.1:{admin_port}",
         "--relay-address", "", "--tls"],
        stdout=open(ctx.workdir / "controller.log", "wb"), stderr=subprocess.STDOUT)
    try:
        api = ApiClient(layout.api_socket, timeout=5)
        deadline = time.time() + 60
        while not api.healthy():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the controller did not start (see controller.log)")
            time.sleep(0.1)
        start_rss, _ = _memory_mb(proc.pid)
        token = NodeCredentials.load_or_create(layout.credential_key_path).issue("node-1")
        started = time.perf_counter()
        codes = asyncio.run(_flood(f"127.0.0.1:{grpc_port}",
                                   (layout.ca_dir / "root-cert.pem").read_bytes(), token, rounds))
        elapsed = time.perf_counter() - started
        rss, peak = _memory_mb(proc.pid)
        ctx.log(f"ctrlflood: {rounds} rounds in {elapsed:.1f}s, answers {codes}, "
                f"RSS {start_rss:.0f} -> {rss:.0f} MB (peak {peak:.0f})")
        note = (f"{rounds} rounds x ({CONCURRENT} x {REQUEST_MIB} MiB SignCertificate unauthenticated, "
                f"{CONCURRENT} unauthenticated streams, {CONCURRENT} x 4 MiB authenticated); "
                f"answers {codes}; RSS at start {start_rss:.0f} MB")
        yield Measurement("controller.unauthenticated_flood", PATH, "peak", "MB", (peak,),
                          better="lower", note=note)
        yield Measurement("controller.unauthenticated_flood", PATH, "rss_after", "MB", (rss,),
                          better="lower", note="RSS once the flood is over")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(layout.run_dir, ignore_errors=True)


SCENARIO = Scenario(
    name="ctrlflood",
    title="Controller RSS under unauthenticated 200 MiB requests (issue 18)",
    run=run,
    requires=(),
    targets=(Target("controller.unauthenticated_flood", "peak", PATH, "<=", 300.0),),
    order=55,
)

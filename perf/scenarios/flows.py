"""Flow observability: kernel event ingestion rate, and follow latency through the relay.

1. ``flows.kernel_ingest``: a tiny BPF program (run by the kernel with BPF_PROG_TEST_RUN
   and a repeat count) writes records shaped like the agent's FlowRecord into a ring
   buffer of the agent's size, at paced rates; ``shoal.agent.ringbuf.RingReader`` (the
   agent's reader) hands them in batches to ``HubbleServer.kernel_records`` (path
   ``shoal-agent``; libbcc's per-record callback, which it replaced, topped out near
   100,000/s). For each rate we count records the
   kernel could not write (ring full) and records never delivered. Reported: the highest
   rate without loss and the rate where loss begins (issue 7: >= 200,000 events/s).
2. ``flows.follow_latency``: two node observers and the relay, each its own process (as
   in the cluster), events generated on the nodes at a fixed rate; a ``--follow`` client
   on the relay measures receive time minus event time (issue 7: p99 <= 50 ms).

``python -m shoal.perf.scenarios.flows node|relay ...`` runs the helper processes.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from shoal.perf.beds import procs
from shoal.perf.scenario import Context, Measurement, Scenario, Target

PATH = "shoal-agent"
PATH_BIG_RING = "shoal-agent-4MiB-ring"
BIG_RING_BYTES = 4 * 1024 * 1024
INGEST_RATES = (100_000, 200_000, 300_000, 400_000, 500_000, 600_000, 800_000, 1_000_000)
TICK_S = 0.005
BPF_PROG_TEST_RUN = 10
SYS_BPF = 321  # x86_64

PRODUCER_C = r"""
BPF_RINGBUF_OUTPUT(events, PAGES);
BPF_ARRAY(lost, u64, 1);

struct record {            /* same layout as shoal.datapath.structs.FlowRecord */
    u64 ts_ns; u32 src_ip[4], dst_ip[4]; u16 src_port, dst_port;   /* IPv4 as ::ffff:a.b.c.d */
    u32 src_identity, dst_identity, rule_id;
    u8 protocol, verdict, direction, kind, tcp_flags, drop_reason; u16 pad;
};

int produce(struct __sk_buff *skb)
{
    struct record r = {};
    r.ts_ns = bpf_ktime_get_ns();
    r.src_ip[2] = r.dst_ip[2] = 0xFFFF0000;
    r.src_ip[3] = 0x0201F40A; r.dst_ip[3] = 0x0301F40A; r.src_port = 40000; r.dst_port = 8080;
    r.src_identity = 1001; r.dst_identity = 1002;
    r.protocol = 6; r.verdict = 1; r.direction = 2; r.kind = 3; r.tcp_flags = 2;
    if (events.ringbuf_output(&r, sizeof(r), 0) != 0) {
        int zero = 0;
        u64 *count = lost.lookup(&zero);
        if (count)
            __sync_fetch_and_add(count, 1);
    }
    return 0;
}
"""


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class KernelProducer:
    """Runs the producer program ``repeat`` times per syscall: real ring-buffer records."""

    def __init__(self, ring_bytes: int | None = None) -> None:
        from bcc import BPF

        from shoal.datapath.structs import RINGBUF_BYTES

        self.ring_bytes = ring_bytes or RINGBUF_BYTES
        self.bpf = BPF(text=PRODUCER_C, cflags=[f"-DPAGES={self.ring_bytes // 4096}"])
        self.prog_fd = self.bpf.load_func("produce", BPF.SOCKET_FILTER).fd
        self.ring_fd = self.bpf["events"].map_fd
        self._lost = self.bpf["lost"]
        self._packet = ctypes.create_string_buffer(64)
        self._libc = ctypes.CDLL(None, use_errno=True)

    def run(self, repeat: int) -> None:
        attr = _TestRunAttr(prog_fd=self.prog_fd, data_size_in=64,
                            data_in=ctypes.addressof(self._packet), repeat=repeat)
        if self._libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN failed")

    def lost(self) -> int:
        return sum(v.value for v in self._lost.values())

    def close(self) -> None:
        self.bpf.cleanup()


def ingest_step(producer: KernelProducer, reader, rate: int, seconds: float) -> tuple[int, int, int]:
    """Produces at ``rate`` for ``seconds``; returns (produced, lost in kernel, not delivered)."""
    lost_before, delivered_before = producer.lost(), reader.delivered
    per_tick = max(1, int(rate * TICK_S))
    produced, start = 0, time.monotonic()
    next_tick = start
    while (now := time.monotonic()) - start < seconds:
        if now < next_tick:
            time.sleep(next_tick - now)
        producer.run(per_tick)
        produced += per_tick
        next_tick += TICK_S
    kernel_lost = producer.lost() - lost_before
    deadline = time.monotonic() + 3
    while reader.delivered - delivered_before < produced - kernel_lost and time.monotonic() < deadline:
        time.sleep(0.01)
    undelivered = produced - kernel_lost - (reader.delivered - delivered_before)
    return produced, kernel_lost, undelivered


def _ingest_path(ctx: Context, path: str) -> tuple[int, int | None]:
    """One sweep of the rates on one reader; returns (best lossless rate, first lossy rate)."""
    from shoal.agent.hubble import HubbleConfig, HubbleServer

    seconds = ctx.seconds(2.0, 1.0)
    producer = KernelProducer(BIG_RING_BYTES if path == PATH_BIG_RING else None)
    server = HubbleServer(HubbleConfig(node_name="perf", tcp_address=None), None)
    from shoal.agent.ringbuf import RingReader

    reader = RingReader(producer.ring_fd, producer.ring_bytes, server.kernel_records)
    reader.start()
    best, first_loss = 0, None
    try:
        for rate in INGEST_RATES:
            produced, kernel_lost, undelivered = ingest_step(producer, reader, rate, seconds)
            ctx.log(f"flows ingest [{path}]: {rate:,}/s asked, {produced / seconds:,.0f}/s produced, "
                    f"ring full {kernel_lost}, undelivered {undelivered}, stored {server.store.head:,}")
            if kernel_lost or undelivered:
                first_loss = rate
                break
            best = rate
    finally:
        reader.stop()
        producer.close()
    return best, first_loss


def measure_ingest(ctx: Context) -> Iterator[Measurement]:
    # PATH: the mmap batch reader with raw records stored (what the agent should run), on
    # the agent's ring size; PATH_BIG_RING: the same with a 4 MiB ring (more headroom when
    # the reader thread is descheduled on a busy machine).
    for path in (PATH, PATH_BIG_RING):
        lossless, onset = [], []
        for _ in range(ctx.repetitions):
            best, first_loss = _ingest_path(ctx, path)
            lossless.append(float(best))
            onset.append(float(first_loss or INGEST_RATES[-1] * 2))
        yield Measurement("flows.kernel_ingest", path, "lossless_rate", "events/s", tuple(lossless))
        yield Measurement("flows.kernel_ingest", path, "loss_onset", "events/s", tuple(onset),
                          better="higher",
                          note="first paced rate with any loss (ring full or undelivered); "
                               f"{INGEST_RATES[-1] * 2:,} means none up to {INGEST_RATES[-1]:,}")


# ------------------------------------------------------------------ follow latency

def _spawn(ctx: Context, *args: str) -> "subprocess.Popen[bytes]":
    log = ctx.workdir / f"flows-{args[0]}-{len(list(ctx.workdir.iterdir()))}.log"
    return procs.spawn([sys.executable, "-m", "shoal.perf.scenarios.flows", *args], log)


def _wait_socket(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def follow_once(address: str, seconds: float) -> list[float]:
    import grpc

    from shoal.api.observer import observer_pb2, observer_pb2_grpc

    latencies: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True))
        timer = threading.Timer(seconds, call.cancel)
        timer.start()
        try:
            for response in call:
                if response.HasField("flow"):
                    latencies.append((time.time_ns() - response.flow.time.ToNanoseconds()) / 1e6)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                raise
        finally:
            timer.cancel()
    return latencies


def measure_follow(ctx: Context) -> Iterator[Measurement]:
    rate = 1000
    workdir = Path(ctx.workdir) / "follow"
    workdir.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for node in ("node-1", "node-2"):
            started.append(_spawn(ctx, "node", "--name", node, "--socket", str(workdir / f"{node}.sock"),
                                "--rate", str(rate)))
        for node in ("node-1", "node-2"):
            _wait_socket(workdir / f"{node}.sock")
        started.append(_spawn(ctx, "relay", "--socket", str(workdir / "relay.sock"),
                            *(f"{n}=unix:{workdir / f'{n}.sock'}" for n in ("node-1", "node-2"))))
        _wait_socket(workdir / "relay.sock")
        time.sleep(0.5)
        p50s, p99s, counts = [], [], []
        for repetition in range(ctx.repetitions):
            latencies = sorted(follow_once(f"unix:{workdir / 'relay.sock'}", ctx.seconds(6.0, 3.0)))
            if not latencies:
                raise RuntimeError("the follow stream delivered no flows")
            p50s.append(statistics.median(latencies))
            p99s.append(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])
            counts.append(len(latencies))
            ctx.log(f"flows follow #{repetition + 1}: {len(latencies)} flows, p50 {p50s[-1]:.2f} ms, "
                    f"p99 {p99s[-1]:.2f} ms")
        note = f"2 nodes x {rate} events/s, relay in its own process; flows per run {counts}"
        yield Measurement("flows.follow_latency", PATH, "p50", "ms", tuple(p50s), better="lower", note=note)
        yield Measurement("flows.follow_latency", PATH, "p99", "ms", tuple(p99s), better="lower", note=note)
    finally:
        for proc in started:
            procs.stop(proc)


def run(ctx: Context) -> Iterator[Measurement]:
    yield from measure_follow(ctx)
    if os.geteuid() == 0:
        yield from measure_ingest(ctx)
    else:
        ctx.log("flows: kernel ingestion needs root (eBPF); skipped")


SCENARIO = Scenario(
    name="flows",
    title="Flow observability: kernel event ingestion, follow latency through the relay",
    run=run,
    targets=(
        Target("flows.kernel_ingest", "lossless_rate", PATH, ">=", 200_000),
        Target("flows.follow_latency", "p99", PATH, "<=", 50),
    ),
    order=60,
)


# ------------------------------------------------------------------ helper processes

async def _serve_node(name: str, socket_path: str, rate: int) -> None:
    from shoal.agent.hubble import HubbleConfig, HubbleServer
    from shoal.flows.kernel import KernelFlowEvent

    server = HubbleServer(HubbleConfig(node_name=name, unix_socket=Path(socket_path), tcp_address=None), None)
    await server.start()
    interval = 1.0 / rate
    next_at = time.monotonic()
    port = 0
    while True:
        # Event time is taken when the event is produced: latency covers store, node, relay, client.
        port = (port + 1) % 60000
        server.kernel_sink(KernelFlowEvent(
            ts_ns=time.time_ns(), src_ip="10.244.1.2", dst_ip="10.244.2.3", src_port=1024 + port,
            dst_port=8080, protocol="TCP", src_identity=1001, dst_identity=1002, verdict="FORWARDED",
            drop_reason=0, direction="EGRESS", tcp_flags=2, kind="tc"))
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1:
            next_at = time.monotonic()


async def _serve_relay(socket_path: str, nodes: list[str]) -> None:
    from shoal.controller.relay import NodeTarget, Relay

    targets = [NodeTarget(*spec.split("=", 1)) for spec in nodes]
    relay = Relay(targets, unix_socket=Path(socket_path))
    await relay.start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.perf.scenarios.flows")
    sub = parser.add_subparsers(dest="role", required=True)
    node = sub.add_parser("node")
    node.add_argument("--name", required=True)
    node.add_argument("--socket", required=True)
    node.add_argument("--rate", type=int, default=1000)
    relay = sub.add_parser("relay")
    relay.add_argument("--socket", required=True)
    relay.add_argument("nodes", nargs="+", help="name=grpc-target")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if args.role == "node":
        asyncio.run(_serve_node(args.name, args.socket, args.rate))
    else:
        asyncio.run(_serve_relay(args.socket, args.nodes))


if __name__ == "__main__":
    main()

"""The shared HTTP workload (for waypoint scenarios): fixed-rate latency and maximum rate.

* ``origin``: a fast HTTP/1.1 origin in the server pod that answers every request with a
  1 KiB body (haproxy's ``http-request return``, C, single thread), so the origin's own
  cost stays small and equal for every path.
* ``measure``: ``h2load --rps`` at a fixed 1,000 req/s with 1 KiB request bodies (POST),
  percentiles from its per-request log; and ``h2load`` unthrottled for the maximum rate.
* ``haproxy_http_proxy``: haproxy in HTTP mode, one thread ("one core"), as the peer a
  waypoint is compared with on the same path.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from shoal.perf import peers, procstat, stats
from shoal.perf.scenario import Context, Measurement, Pod
from shoal.perf.tools import ToolOutputError, h2load

RR = "http.rr_1k@1000/s"        # fixed-rate request/response, 1 KiB bodies both ways
MAX = "http.max_rate"           # unthrottled requests per second
ORIGIN_PORT = 18080
BODY_SIZE = 1024
RATE = 1000
MAX_CONNECTIONS = 16


def body_file(directory: Path) -> Path:
    path = directory / "body-1k.txt"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text("x" * BODY_SIZE)
    return path


def _haproxy_head(threads: int) -> str:
    return (f"global\n    log stderr format short local0 warning\n    nbthread {threads}\n"
            "defaults\n    mode http\n    log global\n    timeout connect 5s\n"
            "    timeout client 1m\n    timeout server 1m\n    timeout http-keep-alive 1m\n")


def origin_config(port: int, body: Path) -> str:
    return (_haproxy_head(1) + f"frontend origin\n    bind 0.0.0.0:{port}\n"
            f"    http-request return status 200 content-type text/plain file {body}\n")


def waypoint_argv(listen: str, upstream: str, namespace: str, fast_path: bool = True) -> list[str]:
    """A plaintext waypoint as the perf scenario runs it: one static Service
    (``namespace``/origin -> ``upstream``), no metrics or ready port, no flows, no access log."""
    argv = [sys.executable, "-m", "shoal.waypoint", "--name", "perf-waypoint", "--namespace", namespace,
            "--plaintext", listen, "--static-service", f"{namespace}/origin={upstream}",
            "--metrics-port", "0", "--ready-port", "0", "--no-flows", "--access-log", "", "--log-level", "WARNING"]
    if not fast_path:
        argv.append("--no-fast-path")
    return argv


def proxy_config(listen: str, upstream: str, threads: int = 1) -> str:
    return (_haproxy_head(threads) + f"frontend proxy\n    bind {listen}\n    default_backend upstream\n"
            f"backend upstream\n    http-reuse always\n    server origin {upstream}\n")


@contextmanager
def _haproxy(ctx: Context, pod: Pod, name: str, config: str, port: int) -> Iterator[Callable[[], list[int]]]:
    path = ctx.workdir / f"{name}.cfg"
    path.write_text(config)
    proc = pod.spawn(["haproxy", "-db", "-f", str(path)], log=ctx.workdir / f"{name}.log")
    try:
        peers.wait_listening(pod, "0.0.0.0", port)
        yield lambda: procstat.pids_in_group(proc.pid, "haproxy")
    finally:
        ctx.bed.stop(proc)


@contextmanager
def origin(ctx: Context, pod: Pod, port: int = ORIGIN_PORT) -> Iterator[None]:
    """The 1 KiB origin on ``pod``:``port`` for the duration of the block."""
    with _haproxy(ctx, pod, f"origin-{pod.name}", origin_config(port, body_file(ctx.workdir)), port):
        yield


@contextmanager
def haproxy_http_proxy(ctx: Context, pod: Pod, port: int, upstream: str,
                       threads: int = 1) -> Iterator[Callable[[], list[int]]]:
    """haproxy in HTTP mode on ``pod`` 0.0.0.0:``port`` -> ``upstream`` (host:port); yields its PIDs."""
    with _haproxy(ctx, pod, f"proxy-{pod.name}-{port}", proxy_config(f"0.0.0.0:{port}", upstream, threads),
                  port) as pids:
        yield pids


def fixed_rate_once(ctx: Context, client: Pod, url: str, rate: int = RATE) -> list[float]:
    seconds = ctx.seconds(5, 2)
    # The per-request log comes back on stdout (h2load's own output goes to stderr): a
    # cluster pod has a private /tmp and a read-only view of the host, so a log file it
    # wrote there would never reach this side ("the log is empty, no request completed").
    log = f"/tmp/shoal-perf-h2load-{os.getpid()}.log"
    argv = h2load.client_argv(url, seconds, rate, log, data_file=str(body_file(ctx.workdir)))
    script = 'log=$1; shift; "$@" >&2; status=$?; cat "$log"; rm -f "$log"; exit $status'
    done = client.run(["sh", "-c", script, "h2load", log, *argv], timeout=seconds + 30, check=False)
    said = done.stderr.strip()[-400:]
    try:
        good, bad = h2load.latencies_us(done.stdout)
    except ToolOutputError as exc:
        raise ToolOutputError(f"{exc} (url {url}); h2load said: {said}") from exc
    if bad:
        raise ToolOutputError(f"h2load: {sum(bad.values())} requests to {url} got an error status {bad}")
    return good


def max_rate_once(ctx: Context, client: Pod, url: str, connections: int = MAX_CONNECTIONS) -> float:
    seconds = ctx.seconds(5, 2)
    argv = h2load.max_rate_argv(url, seconds, connections, data_file=str(body_file(ctx.workdir)))
    done = client.run(argv, timeout=seconds + 30, check=False)
    return h2load.summary_rate(done.stdout)


def measure(ctx: Context, path: str, client: Pod, url: str,
            processes: Callable[[], Sequence[int]] | None = None,
            max_rate: bool = True) -> Iterator[Measurement]:
    """p50/p99 (µs) at a fixed 1,000 req/s, [cpu, rss of ``processes``], and the max req/s."""
    p50, p99, cpu, cpu_per_request, rss, rates = [], [], [], [], [], []
    for rep in range(ctx.repetitions):
        pids = list(processes()) if processes else []
        if pids:
            with procstat.ProcessSampler(pids) as sampler:
                latencies = fixed_rate_once(ctx, client, url)
            assert sampler.usage is not None
            cpu.append(sampler.usage.cpu_cores)
            # CPU-seconds per request served: what a request costs, whatever share of the
            # machine the process got (cores alone mostly measure the load on a busy host).
            cpu_per_request.append(sampler.usage.cpu_cores * sampler.usage.seconds * 1e6 / max(len(latencies), 1))
            rss.append(sampler.usage.rss_peak_mb)
        else:
            latencies = fixed_rate_once(ctx, client, url)
        p50.append(stats.percentile(latencies, 50))
        p99.append(stats.percentile(latencies, 99))
        ctx.log(f"  {RR} {path} #{rep + 1}: p50 {p50[-1]:.0f} µs, p99 {p99[-1]:.0f} µs")
    yield Measurement(RR, path, "p50", "µs", tuple(p50), "lower")
    yield Measurement(RR, path, "p99", "µs", tuple(p99), "lower")
    if cpu:
        yield Measurement(RR, path, "cpu", "cores", tuple(cpu), "lower")
        yield Measurement(RR, path, "cpu_per_request", "µs", tuple(cpu_per_request), "lower")
        yield Measurement(RR, path, "rss", "MB", tuple(rss), "lower")
    if max_rate:
        for rep in range(ctx.repetitions):
            rates.append(max_rate_once(ctx, client, url))
            ctx.log(f"  {MAX} {path} #{rep + 1}: {rates[-1]:.0f} req/s")
        yield Measurement(MAX, path, "rate", "req/s", tuple(rates), "higher")

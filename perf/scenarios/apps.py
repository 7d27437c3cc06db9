"""Real clients and servers, meshed against direct and against the C mTLS pairs (issue 13):
redis-benchmark, pgbench -S and a 100 MB curl download.

The servers run in the server pods of ``baseline``'s placement (client on node-1, server
on node-2). Four paths reach them, all in the same interleaved rounds (``pod2pod.rounds``),
so the machine's noise hits every path alike:

- ``direct``: the plain client pod to the plain server pod's IP;
- ``stunnel`` and ``haproxy``: the plain client pod to 127.0.0.1:<local>, a peer's TLS
  client end there, mutual TLS 1.3 to its server end in the plain server pod, which
  forwards to the same servers on 127.0.0.1 (``peers.pair``, as ``baseline`` runs them);
- ``shoal-l4``: the meshed pods, through two node proxies (HBONE), cluster bed only.

Each figure is reported per path with its ratio to direct; Shoal's per-round ratio to the
haproxy pair is a figure of its own (``ratio_to_haproxy``). The issue's targets stay
against direct; beside each, a reference row says whether the haproxy pair itself reaches
that ratio here, so a target beyond a C pair's reach on this machine shows as such.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from shoal.perf import peers, pod2pod, stats
from shoal.perf.pod2pod import PATH_SHOAL
from shoal.perf.scenario import PATH_DIRECT, PATH_HAPROXY, Context, Measurement, Pod, Scenario, Target
from shoal.perf.tools import curl, pgbench, redisbench

REDIS = "redis-benchmark.{test}[c=20,P={pipeline}]"
REDIS_GET = REDIS.format(test="GET", pipeline=1)
PGBENCH = "pgbench.select_only[c=8]"
DOWNLOAD_MB = 100
DOWNLOAD = f"curl.download[{DOWNLOAD_MB}MB]"
DOWNLOAD_PORT = 18100
PIPELINES = (1, 16)
RATE = "rate"
RATIO_TO_HAPROXY = "ratio_to_haproxy"
LOOPBACK = "127.0.0.1"

# Issue 13's real-client targets: Shoal's rate against direct.
GOALS = {REDIS_GET: 0.5, PGBENCH: 0.6, DOWNLOAD: 0.8}
# The servers each path reaches, by the name of the peers' forward for it.
APP_PORTS = (("redis", redisbench.DEFAULT_PORT), ("postgres", pgbench.DEFAULT_PORT), ("download", DOWNLOAD_PORT))
# The C pairs' port ranges: clear of baseline's (20000, 21000), should both ever run at once.
PEER_BASES = ((peers.STUNNEL, 22000), (peers.HAPROXY, 23000))


@dataclass(frozen=True)
class AppPath:
    """One way from a client pod to the servers: the host and, per app, the port to connect to."""

    name: str
    client: Pod
    host: str
    ports: Mapping[str, int]

    def port(self, app: str) -> int:
        return self.ports[app]


def direct_path(name: str, client: Pod, server: Pod) -> AppPath:
    """The servers at the server pod's own IP and ports (direct, and Shoal's capture)."""
    return AppPath(name, client, server.ip, dict(APP_PORTS))


def peer_path(name: str, client: Pod, forwards: Sequence[peers.Forward]) -> AppPath:
    """The servers through a peer's client end: 127.0.0.1 and each forward's local port."""
    by_app = {f.name: f.local for f in forwards}
    missing = [app for app, _ in APP_PORTS if app not in by_app]
    if missing:
        raise ValueError(f"{name}: no forward for {missing}")
    return AppPath(name, client, LOOPBACK, by_app)


def peer_forwards(base: int) -> tuple[peers.Forward, ...]:
    """A pair's forwards: client pod 127.0.0.1:local -> server pod -> 127.0.0.1:<each app server>."""
    return peers.forwards(base, APP_PORTS)


def figure_measurements(figure: str, unit: str, rates: Mapping[str, Sequence[float]]) -> Iterator[Measurement]:
    """Every path's rates, and Shoal's per-round ratio to haproxy.

    Both ran in the same rounds, so each of Shoal's values is paired with haproxy's of the
    same round (the same noise): the median of those ratios is the comparison.
    """
    for path, values in rates.items():
        yield Measurement(figure, path, RATE, unit, tuple(values))
    shoal, haproxy = rates.get(PATH_SHOAL, ()), rates.get(PATH_HAPROXY, ())
    if shoal and len(shoal) == len(haproxy) and all(haproxy):
        yield Measurement(figure, PATH_SHOAL, RATIO_TO_HAPROXY, "×", tuple(s / h for s, h in zip(shoal, haproxy)),
                          note=f"{PATH_SHOAL} / {PATH_HAPROXY} of the same round")


def _times(value: float, reference: float) -> str:
    ratio = stats.ratio(value, reference)
    return "–" if ratio is None else f"{ratio:.2f}×"


def figure_line(figure: str, unit: str, rates: Mapping[str, Sequence[float]]) -> str:
    """One line per figure: each path's median and ratio to direct, Shoal's against haproxy, and
    the issue's target beside what the haproxy pair reaches against the same goal."""
    medians = {path: statistics.median(values) for path, values in rates.items() if values}
    direct, haproxy = medians.get(PATH_DIRECT), medians.get(PATH_HAPROXY)
    parts = []
    for path, value in medians.items():
        ratios = []
        if direct is not None and path != PATH_DIRECT:
            ratios.append(f"{_times(value, direct)} direct")
        if haproxy is not None and path == PATH_SHOAL:
            ratios.append(f"{_times(value, haproxy)} {PATH_HAPROXY}")
        parts.append(f"{path} {value:,.1f} {unit}" + (f" ({', '.join(ratios)})" if ratios else ""))
    line = f"  {figure}: " + "; ".join(parts)
    goal = GOALS.get(figure)
    if goal is None or not direct:
        return line
    shoal = medians.get(PATH_SHOAL)
    status = "not measured" if shoal is None else ("met" if shoal / direct >= goal else "missed")
    line += f". Target {PATH_SHOAL} ≥ {goal}× direct: {status}"
    if haproxy is not None:
        reach = "within" if haproxy / direct >= goal else "beyond"
        line += f"; the haproxy pair reaches {haproxy / direct:.2f}× (the target is {reach} a C pair's reach here)"
    return line


def scenario_targets() -> tuple[Target, ...]:
    """Each goal against direct for Shoal (the issue's target), and the same goal for the
    haproxy pair as a reference row: whether a C mTLS pair reaches it on this machine."""
    targets = []
    for figure, goal in GOALS.items():
        targets.append(Target(figure, RATE, PATH_SHOAL, ">=", goal, kind="ratio", against=PATH_DIRECT))
        targets.append(Target(figure, RATE, PATH_HAPROXY, ">=", goal, kind="ratio", against=PATH_DIRECT,
                              label=f"{figure} rate: reference, the haproxy mTLS pair / direct ≥ {goal} "
                                    f"(does a C pair reach the target above here?)"))
    return tuple(targets)


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/postgres: run scripts/install.sh --perf")
    return Path(found[-1]).parent


def postgres_argv(bindir: Path, data: str) -> list[str]:
    """Every address: the pod IP for direct and Shoal, 127.0.0.1 for the peers' server ends."""
    return [str(bindir / "postgres"), "-D", data, "-k", "/tmp", "-c", "listen_addresses=*",
            "-c", f"port={pgbench.DEFAULT_PORT}", "-c", "fsync=off"]


def download_server_argv(directory: Path) -> list[str]:
    """Every IPv4 address, as redis and postgres: the peers' server ends reach it on 127.0.0.1."""
    return [sys.executable, "-m", "http.server", str(DOWNLOAD_PORT), "--bind", "0.0.0.0", "--directory",
            str(directory)]


@contextmanager
def _postgres(ctx: Context, pod: Pod) -> Iterator[None]:
    """A throwaway postgres in ``pod``, trusting every address (a benchmark bed, nothing to protect).

    Pods run as an unprivileged uid of their own, with no passwd entry and the machine's
    filesystems read-only. initdb needs a named non-root user, so the cluster is made on the
    host as ``postgres`` (in the scenario's scratch directory), then copied into the pod's
    private /tmp, where the copy belongs to the pod's uid and the server can run from it.
    """
    bindir, user = _postgres_bin(), pwd.getpwnam("postgres")
    data = Path(tempfile.mkdtemp(prefix=f"pg-{pod.namespace}-", dir=ctx.workdir))
    in_pod = f"/tmp/shoal-perf-pg-{pod.namespace}"
    proc = None
    try:
        os.chown(data, user.pw_uid, user.pw_gid)
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(data / "db"),
                        "-A", "trust", "-U", "postgres"], capture_output=True, check=True, timeout=120)
        with open(data / "db" / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
        subprocess.run(["chmod", "-R", "a+rX", str(data)], check=True)   # readable by the pod's uid
        pod.run(["sh", "-c", f"rm -rf {in_pod} && cp -r {data / 'db'} {in_pod} && chmod 700 {in_pod}"],
                timeout=60)
        proc = pod.spawn(postgres_argv(bindir, in_pod), log=ctx.workdir / f"postgres-{pod.namespace}.log")
        peers.wait_all_listening(pod, "0.0.0.0", [pgbench.DEFAULT_PORT], timeout=30, procs=[proc])
        pod.run(pgbench.init_argv("127.0.0.1"), timeout=120)
        yield
    finally:
        if proc is not None:
            ctx.bed.stop(proc)
        shutil.rmtree(data, ignore_errors=True)


def _write_cached_blob(path: Path, size: int, chunk: int = 1 << 20) -> None:
    """Write ``size`` zero bytes, so that every page of the file is in the page cache before
    any path reads it: the disk is not what is measured. A sparse file (``truncate``) is not
    enough: its first read zero-fills each page in the reading server's time (``memset`` under
    ``ext4_mpage_readpages``, ~90 ms of CPU per 100 MB here), which the first path to each
    server paid alone: direct on the plain server and Shoal on the meshed one, while the C
    pairs, reading the plain server's file after direct, found it cached (perf README)."""
    zeros = bytes(chunk)
    with open(path, "wb") as blob:
        for offset in range(0, size, chunk):
            blob.write(zeros[:min(chunk, size - offset)])


@contextmanager
def _servers(ctx: Context, pod: Pod) -> Iterator[None]:
    """redis, postgres and a static HTTP server with a 100 MB file, in ``pod``."""
    logs = ctx.workdir / f"servers-{pod.namespace}"
    logs.mkdir(exist_ok=True)
    blob_dir = logs / "www"
    blob_dir.mkdir(exist_ok=True)
    _write_cached_blob(blob_dir / "blob", DOWNLOAD_MB * 1_000_000)
    procs = [pod.spawn(redisbench.server_argv(), log=logs / "redis.log"),
             pod.spawn(download_server_argv(blob_dir), log=logs / "http.log")]
    try:
        peers.wait_all_listening(pod, "0.0.0.0", [redisbench.DEFAULT_PORT, DOWNLOAD_PORT], timeout=20,
                                 procs=procs)
        with _postgres(ctx, pod):
            yield
    finally:
        for proc in procs:
            ctx.bed.stop(proc)


def _redis(ctx: Context, path: AppPath, pipeline: int) -> dict[str, float]:
    requests = (20_000 if ctx.quick else 100_000) * (4 if pipeline > 1 else 1)
    done = path.client.run(redisbench.client_argv(path.host, requests, pipeline=pipeline, port=path.port("redis")),
                           timeout=300, check=False)
    return {REDIS.format(test=test, pipeline=pipeline): rate
            for test, rate in redisbench.rates(done.stdout + done.stderr).items()}


def _pgbench(ctx: Context, path: AppPath) -> dict[str, float]:
    seconds = ctx.seconds(10, 3)
    done = path.client.run(pgbench.select_argv(path.host, seconds, port=path.port("postgres")),
                           timeout=seconds + 60, check=False)
    return {PGBENCH: pgbench.tps(done.stdout + done.stderr)}


def _download(ctx: Context, path: AppPath) -> dict[str, float]:
    url = f"http://{path.host}:{path.port('download')}/blob"
    done = path.client.run(curl.download_argv(url, 120), timeout=150, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"curl {url} on {path.name}: {done.stderr.strip()[-300:]}")
    return {DOWNLOAD: curl.download_mb_per_s(done.stdout, DOWNLOAD_MB * 1_000_000)}


Workload = Callable[[Context, AppPath], dict[str, float]]


def _workloads() -> list[tuple[str, Workload]]:
    """(unit, run once on a path -> {figure: value}), in the order they run."""
    redis: list[tuple[str, Workload]] = [("req/s", partial(_redis, pipeline=pipeline)) for pipeline in PIPELINES]
    return [*redis, ("tx/s", _pgbench), ("MB/s", _download)]


def _paths(ctx: Context, stack: ExitStack) -> list[AppPath]:
    """Direct and the C pairs on the plain pods, Shoal on the meshed pods; every server up."""
    client, server = pod2pod.plain_pods(ctx.bed)
    stack.enter_context(_servers(ctx, server))
    paths = [direct_path(PATH_DIRECT, client, server)]
    for peer, base in PEER_BASES:
        forwards = peer_forwards(base)
        stack.enter_context(peers.pair(peer, ctx.bed, client, server, forwards, ctx.workdir))
        paths.append(peer_path(peer.name, client, forwards))
    if ctx.bed.kind == "cluster":
        mesh_client, mesh_server = pod2pod.meshed_pods(ctx.bed)
        stack.enter_context(_servers(ctx, mesh_server))
        paths.append(direct_path(PATH_SHOAL, mesh_client, mesh_server))
    else:
        ctx.log(f"  no {PATH_SHOAL} path on the {ctx.bed.kind} bed (needs the Shoal cluster)")
    return paths


def run(ctx: Context) -> Iterator[Measurement]:
    with ExitStack() as stack:
        paths = _paths(ctx, stack)
        for unit, workload in _workloads():
            rates: dict[str, dict[str, list[float]]] = {}     # figure -> path -> one value per round
            for rep, path in pod2pod.rounds(paths, ctx.repetitions):
                for figure, value in workload(ctx, path).items():
                    rates.setdefault(figure, {}).setdefault(path.name, []).append(value)
                    ctx.log(f"  {figure} {path.name} #{rep + 1}: {value:,.1f} {unit}")
            for figure, by_path in rates.items():
                yield from figure_measurements(figure, unit, by_path)
                ctx.log(figure_line(figure, unit, by_path))


SCENARIO = Scenario(
    name="apps",
    title="Real clients: redis-benchmark, pgbench -S, 100 MB curl download; direct, stunnel, haproxy, Shoal",
    run=run,
    requires=("root", "bin:redis-server", "bin:redis-benchmark", "bin:pgbench", "bin:runuser", "bin:curl",
              "bin:ss", "bin:stunnel4", "bin:haproxy"),
    targets=scenario_targets(),
    order=30,
    timeout=1800.0,   # four paths; under --quick a third (600 s), the slowest path sets the pace
)

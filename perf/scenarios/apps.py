"""Real clients and servers, meshed against direct (issue 13): redis-benchmark, pgbench -S
and a 100 MB curl download.

The servers run in the server pods of ``baseline``'s placement (client on node-1, server
on node-2): the plain pods give the direct path, the meshed pods the Shoal path (two node
proxies, HBONE). Paths alternate in interleaved rounds (``pod2pod.rounds``), so the
machine's noise hits both alike; the report gives each figure as a ratio to direct.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from shoal.perf import peers, pod2pod
from shoal.perf.pod2pod import PATH_SHOAL
from shoal.perf.scenario import PATH_DIRECT, Context, Measurement, Pod, Scenario, Target
from shoal.perf.tools import curl, pgbench, redisbench

REDIS = "redis-benchmark.{test}[c=20,P={pipeline}]"
PGBENCH = "pgbench.select_only[c=8]"
DOWNLOAD_MB = 100
DOWNLOAD = f"curl.download[{DOWNLOAD_MB}MB]"
DOWNLOAD_PORT = 18100
PIPELINES = (1, 16)


@dataclass(frozen=True)
class AppPath:
    """One way from the client pod to the server pod, and the server's address."""

    name: str
    client: Pod
    server: Pod


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/postgres: run scripts/install.sh --perf")
    return Path(found[-1]).parent


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
        proc = pod.spawn([str(bindir / "postgres"), "-D", in_pod, "-k", "/tmp",
                          "-c", "listen_addresses=*", "-c", f"port={pgbench.DEFAULT_PORT}", "-c", "fsync=off"],
                         log=ctx.workdir / f"postgres-{pod.namespace}.log")
        peers.wait_all_listening(pod, "0.0.0.0", [pgbench.DEFAULT_PORT], timeout=30, procs=[proc])
        pod.run(pgbench.init_argv("127.0.0.1"), timeout=120)
        yield
    finally:
        if proc is not None:
            ctx.bed.stop(proc)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def _servers(ctx: Context, pod: Pod) -> Iterator[None]:
    """redis, postgres and a static HTTP server with a 100 MB file, in ``pod``."""
    logs = ctx.workdir / f"servers-{pod.namespace}"
    logs.mkdir(exist_ok=True)
    blob_dir = logs / "www"
    blob_dir.mkdir(exist_ok=True)
    with open(blob_dir / "blob", "wb") as blob:
        blob.truncate(DOWNLOAD_MB * 1_000_000)  # sparse: the disk is not what is measured
    procs = [pod.spawn(redisbench.server_argv(), log=logs / "redis.log"),
             pod.spawn([sys.executable, "-m", "http.server", str(DOWNLOAD_PORT), "--directory", str(blob_dir)],
                       log=logs / "http.log")]
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
    done = path.client.run(redisbench.client_argv(path.server.ip, requests, pipeline=pipeline), timeout=300,
                           check=False)
    return redisbench.rates(done.stdout + done.stderr)


def _pgbench(ctx: Context, path: AppPath) -> float:
    seconds = ctx.seconds(10, 3)
    done = path.client.run(pgbench.select_argv(path.server.ip, seconds), timeout=seconds + 60, check=False)
    return pgbench.tps(done.stdout + done.stderr)


def _download(path: AppPath) -> float:
    url = f"http://{path.server.ip}:{DOWNLOAD_PORT}/blob"
    done = path.client.run(curl.download_argv(url, 120), timeout=150, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"curl {url} on {path.name}: {done.stderr.strip()[-300:]}")
    return curl.download_mb_per_s(done.stdout, DOWNLOAD_MB * 1_000_000)


def run(ctx: Context) -> Iterator[Measurement]:
    paths = [AppPath(PATH_DIRECT, *pod2pod.plain_pods(ctx.bed))]
    if ctx.bed.kind == "cluster":
        paths.append(AppPath(PATH_SHOAL, *pod2pod.meshed_pods(ctx.bed)))
    else:
        ctx.log(f"  no {PATH_SHOAL} path on the {ctx.bed.kind} bed (needs the Shoal cluster)")
    with ExitStack() as stack:
        for path in paths:
            stack.enter_context(_servers(ctx, path.server))
        for pipeline in PIPELINES:
            samples: dict[tuple[str, str], list[float]] = {}
            for rep, path in pod2pod.rounds(paths, ctx.repetitions):
                for test, rate in _redis(ctx, path, pipeline).items():
                    samples.setdefault((test, path.name), []).append(rate)
                    ctx.log(f"  {REDIS.format(test=test, pipeline=pipeline)} {path.name} #{rep + 1}: {rate:,.0f} req/s")
            for (test, name), rates in samples.items():
                yield Measurement(REDIS.format(test=test, pipeline=pipeline), name, "rate", "req/s", tuple(rates))
        for benchmark, unit, measure in ((PGBENCH, "tx/s", lambda p: _pgbench(ctx, p)),
                                         (DOWNLOAD, "MB/s", _download)):
            figures: dict[str, list[float]] = {p.name: [] for p in paths}
            for rep, path in pod2pod.rounds(paths, ctx.repetitions):
                figures[path.name].append(measure(path))
                ctx.log(f"  {benchmark} {path.name} #{rep + 1}: {figures[path.name][-1]:,.1f} {unit}")
            for name, values in figures.items():
                yield Measurement(benchmark, name, "rate", unit, tuple(values))


SCENARIO = Scenario(
    name="apps",
    title="Real clients meshed against direct: redis-benchmark, pgbench -S, 100 MB curl download",
    run=run,
    requires=("root", "bin:redis-server", "bin:redis-benchmark", "bin:pgbench", "bin:runuser", "bin:curl",
              "bin:ss"),
    targets=(
        Target(REDIS.format(test="GET", pipeline=1), "rate", PATH_SHOAL, ">=", 0.5, kind="ratio",
               against=PATH_DIRECT),
        Target(PGBENCH, "rate", PATH_SHOAL, ">=", 0.6, kind="ratio", against=PATH_DIRECT),
        Target(DOWNLOAD, "rate", PATH_SHOAL, ">=", 0.8, kind="ratio", against=PATH_DIRECT),
    ),
    order=30,
)

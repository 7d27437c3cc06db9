"""The apps scenario's pure parts: the four paths (direct, the C pairs, Shoal) in one set of
interleaved rounds, the pairs' forwards to the same servers, and the per-figure ratios."""
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.perf import peers, report
from shoal.perf.pod2pod import PATH_SHOAL
from shoal.perf.scenario import PATH_DIRECT, PATH_HAPROXY, PATH_STUNNEL, Measurement
from shoal.perf.scenarios import apps, baseline
from shoal.perf.tools import pgbench, redisbench

PATHS = (PATH_DIRECT, PATH_STUNNEL, PATH_HAPROXY, PATH_SHOAL)


@dataclass
class Pod:
    namespace: str = "perf-plain"
    name: str = "server"
    node: str = "node-2"
    ip: str = "10.244.2.7"


def test_each_pair_forwards_to_the_same_servers_on_loopback_on_ports_of_its_own():
    used: set[int] = set()
    for peer, base in apps.PEER_BASES:
        forwards = apps.peer_forwards(base)
        assert {(f.name, f.target) for f in forwards} == set(apps.APP_PORTS)
        ports = {p for f in forwards for p in (f.local, f.tls)}
        assert len(ports) == 2 * len(forwards) and not ports & used, f"{peer.name} shares a port"
        used |= ports
    baseline_ports = {p for _, base, *_ in baseline.PEER_PORTS for p in range(base, base + 5)}
    assert not used & baseline_ports
    assert not used & {port for _, port in apps.APP_PORTS}


def test_a_peer_path_connects_to_its_client_end_and_a_direct_path_to_the_server_pod():
    forwards = apps.peer_forwards(23000)
    path = apps.peer_path(PATH_HAPROXY, Pod(name="client"), forwards)
    assert path.host == "127.0.0.1"
    assert [path.port(app) for app, _ in apps.APP_PORTS] == [23001, 23003, 23005]
    direct = apps.direct_path(PATH_DIRECT, Pod(name="client"), Pod())
    assert direct.host == "10.244.2.7"
    assert [direct.port(app) for app, _ in apps.APP_PORTS] == [redisbench.DEFAULT_PORT, pgbench.DEFAULT_PORT,
                                                               apps.DOWNLOAD_PORT]
    with pytest.raises(ValueError, match="download"):
        apps.peer_path(PATH_STUNNEL, Pod(), forwards[:2])


def test_the_servers_accept_the_pairs_server_end_on_loopback(tmp_path):
    """The pairs' server ends connect to 127.0.0.1:<app port>: every server listens on all
    addresses, and the haproxy and stunnel server ends point at those very ports."""
    assert "listen_addresses=*" in apps.postgres_argv(Path("/usr/lib/postgresql/16/bin"), "/tmp/db")
    download = apps.download_server_argv(tmp_path)
    assert download[download.index("--bind") + 1] == "0.0.0.0" and str(apps.DOWNLOAD_PORT) in download
    redis = redisbench.server_argv()
    assert redis[redis.index("--bind") + 1] == "0.0.0.0"
    certs = peers.mint_certificates(tmp_path / "certs", "10.244.2.7")
    forwards = apps.peer_forwards(23000)
    haproxy = peers.haproxy_server_config(certs, "10.244.2.7", forwards)
    stunnel = peers.stunnel_server_config(certs, "10.244.2.7", forwards)
    for _, port in apps.APP_PORTS:
        assert f"server local 127.0.0.1:{port}\n" in haproxy
        assert f"connect = 127.0.0.1:{port}\n" in stunnel


def test_shoals_ratio_to_haproxy_pairs_the_values_of_each_round():
    rates = {PATH_DIRECT: [100.0, 90.0], PATH_HAPROXY: [50.0, 20.0], PATH_SHOAL: [25.0, 30.0]}
    figures = {(m.path, m.metric): m for m in apps.figure_measurements("f", "req/s", rates)}
    assert figures[(PATH_HAPROXY, "rate")].samples == (50.0, 20.0)
    assert figures[(PATH_SHOAL, apps.RATIO_TO_HAPROXY)].samples == (0.5, 1.5)
    # Not the ratio of the medians (27.5 / 35): the rounds are paired.
    assert figures[(PATH_SHOAL, apps.RATIO_TO_HAPROXY)].median == pytest.approx(1.0)
    without = {(m.path, m.metric) for m in apps.figure_measurements("f", "req/s", {PATH_SHOAL: [1.0]})}
    assert without == {(PATH_SHOAL, "rate")}


def test_the_figure_line_says_whether_the_target_is_within_the_c_pairs_reach():
    within = apps.figure_line(apps.REDIS_GET, "req/s", {PATH_DIRECT: [40_000.0], PATH_STUNNEL: [22_000.0],
                                                        PATH_HAPROXY: [24_000.0], PATH_SHOAL: [6_000.0]})
    assert "direct 40,000.0 req/s; stunnel 22,000.0 req/s (0.55× direct)" in within
    assert "shoal-l4 6,000.0 req/s (0.15× direct, 0.25× haproxy)" in within
    assert "Target shoal-l4 ≥ 0.5× direct: missed" in within
    assert "haproxy pair reaches 0.60× (the target is within a C pair's reach here)" in within
    beyond = apps.figure_line(apps.PGBENCH, "tx/s", {PATH_DIRECT: [1000.0], PATH_HAPROXY: [500.0],
                                                    PATH_SHOAL: [650.0]})
    assert "Target shoal-l4 ≥ 0.6× direct: met" in beyond and "0.50× (the target is beyond" in beyond
    untargeted = apps.figure_line(apps.REDIS.format(test="SET", pipeline=16), "req/s",
                                  {PATH_DIRECT: [10.0], PATH_SHOAL: [5.0]})
    assert untargeted.endswith("shoal-l4 5.0 req/s (0.50× direct)")
    assert "Target shoal-l4 ≥ 0.8× direct: not measured" in apps.figure_line(apps.DOWNLOAD, "MB/s",
                                                                            {PATH_DIRECT: [100.0]})


def test_every_target_has_a_haproxy_reference_row_against_the_same_goal():
    get = apps.REDIS_GET
    figures = [Measurement(get, path, "rate", "req/s", (rate,))
               for path, rate in ((PATH_DIRECT, 40_000.0), (PATH_HAPROXY, 16_000.0), (PATH_SHOAL, 6_000.0))]
    results = {(r["benchmark"], r["path"]): r
               for r in (report.evaluate_target(t, figures) for t in apps.SCENARIO.targets)}
    assert set(results) == {(figure, path) for figure in apps.GOALS for path in (PATH_SHOAL, PATH_HAPROXY)}
    shoal, haproxy = results[(get, PATH_SHOAL)], results[(get, PATH_HAPROXY)]
    assert shoal["status"] == "missed" and shoal["actual"] == pytest.approx(0.15)
    assert haproxy["status"] == "missed" and haproxy["actual"] == pytest.approx(0.4)
    assert "reference" in results[(get, PATH_HAPROXY)]["label"]
    assert {r["against"] for r in results.values()} == {PATH_DIRECT}
    assert results[(apps.PGBENCH, PATH_HAPROXY)]["status"] == "not measured"


# -- the scenario's rounds, with canned tool output

RATES = {PATH_DIRECT: 1.0, PATH_STUNNEL: 0.6, PATH_HAPROXY: 0.8, PATH_SHOAL: 0.4}


@dataclass
class CannedPod:
    """A client pod whose tools answer at once, at a rate that tells the paths apart."""

    path: str
    calls: list[tuple[str, str, str]]
    namespace: str = "perf-plain"
    name: str = "client"
    node: str = "node-1"
    ip: str = "10.244.1.5"

    def run(self, argv, *, timeout, check=True):
        tool, scale = argv[0], RATES[self.path]
        target = argv[-1] if tool == "curl" else f"{argv[argv.index('-h') + 1]}:{argv[argv.index('-p') + 1]}"
        self.calls.append((self.path, tool, target))
        if tool == "redis-benchmark":
            out = f'"test","rps"\n"GET","{40_000 * scale}"\n"SET","{30_000 * scale}"\n'
        elif tool == "pgbench":
            out = f"tps = {5_000 * scale} (without initial connection time)\n"
        else:
            out = f"{apps.DOWNLOAD_MB * 1_000_000} {100e6 * scale}"
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_every_path_runs_every_client_in_the_same_interleaved_rounds(monkeypatch, fake_context):
    calls: list[tuple[str, str, str]] = []
    forwards = {PATH_STUNNEL: apps.peer_forwards(22000), PATH_HAPROXY: apps.peer_forwards(23000)}
    paths = [apps.peer_path(name, CannedPod(name, calls), forwards[name]) if name in forwards
             else apps.direct_path(name, CannedPod(name, calls), Pod(ip=f"10.244.2.{i}"))
             for i, name in enumerate(PATHS)]
    monkeypatch.setattr(apps, "_paths", lambda ctx, stack: paths)
    ctx = fake_context()
    figures = {(m.benchmark, m.metric, m.path): m for m in apps.run(ctx)}
    tools = ["redis-benchmark", "redis-benchmark", "pgbench", "curl"]
    assert [(path, tool) for path, tool, _ in calls] == [(p, t) for t in tools for _ in range(2) for p in PATHS]
    # The pairs' clients go to their own client end; direct and Shoal to the server pod.
    assert {target for path, tool, target in calls if path == PATH_HAPROXY and tool == "pgbench"} == {
        "127.0.0.1:23003"}
    assert {target for path, tool, target in calls if tool == "curl" and path == PATH_STUNNEL} == {
        "http://127.0.0.1:22005/blob"}
    assert {target for path, tool, target in calls if tool == "redis-benchmark" and path == PATH_SHOAL} == {
        "10.244.2.3:6379"}
    for figure in (apps.REDIS_GET, apps.REDIS.format(test="SET", pipeline=16), apps.PGBENCH, apps.DOWNLOAD):
        assert {p for b, m, p in figures if b == figure and m == "rate"} == set(PATHS)
        assert figures[(figure, apps.RATIO_TO_HAPROXY, PATH_SHOAL)].samples == pytest.approx((0.5, 0.5))
        (line,) = [line for line in ctx.lines if line.startswith(f"  {figure}: ")]
        assert "(0.40× direct, 0.50× haproxy)" in line
    assert figures[(apps.PGBENCH, "rate", PATH_HAPROXY)].samples == (4_000.0, 4_000.0)


def test_the_download_blob_is_written_not_sparse_so_no_path_reads_it_cold(tmp_path):
    """A sparse file's first read zero-fills its pages in the server's time: the first path to
    each server paid it alone. Written bytes are in the page cache for every path."""
    blob = tmp_path / "blob"
    apps._write_cached_blob(blob, 3 * 1024 * 1024 + 5, chunk=1024 * 1024)
    stat = blob.stat()
    assert stat.st_size == 3 * 1024 * 1024 + 5
    assert stat.st_blocks * 512 >= stat.st_size   # allocated: no holes
    with open(blob, "rb") as f:
        assert f.read() == bytes(stat.st_size)

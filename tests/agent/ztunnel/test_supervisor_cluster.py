"""Issue 13 "every core", on a real local cluster of its own whose node proxies run two
workers each: one config stream per node (the supervisor's), whose config and SVIDs reach
both workers, which load neither grpc nor cryptography; new connections spread over both,
a killed worker is restarted with only its own connections lost (and counted) and gets
the full config and every SVID again, pod handovers reach both, restarts refuse nothing."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shoal.agent.ztunnel.supervisor import fetch_page
from shoal.perf.connscripts import ECHO_APP, HOLD_CLIENT
from tests.conftest import eventually, pod_exec, pod_ip, running_demo_cluster, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ECHO_PORT = 9100
HELD = 40

EXTRA_POD = """
apiVersion: v1
kind: Pod
metadata: {name: extra-0, namespace: demo, labels: {app: extra}}
spec:
  nodeName: node-1
  serviceAccountName: extra
  containers:
    - name: app
      command: [python3, -m, http.server, "8081"]
"""


@pytest.fixture(scope="module")
def cluster():
    with running_demo_cluster(f"shoal-wk-{os.getpid()}", proxy_workers=2) as cluster:
        yield cluster


def node_get(layout, node: str, port: int, path: str) -> str:
    return subprocess.run(["ip", "netns", "exec", layout.node_netns(node), sys.executable, "-c",
                           f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}{path}',"
                           " timeout=10).read().decode())"],
                          capture_output=True, text=True, timeout=30, check=True).stdout


def workers(layout, node: str) -> dict:
    return json.loads(node_get(layout, node, 15000, "/workers"))


def worker_page(layout, node: str, pid: int, page: str) -> dict:
    """One worker's own page, from its Unix socket in the node directory (as the supervisor reads it)."""
    status, body = asyncio.run(fetch_page(str(layout.node_dir(node) / f"proxy-worker-{pid}.sock"), page))
    assert status == 200, body
    return json.loads(body)


def fed_alike(layout, node: str) -> list[dict]:
    """Every worker's config version, workloads and SVIDs (identity, expiry): the same in all."""
    seen = []
    for w in workers(layout, node)["workers"]:
        dump = worker_page(layout, node, w["pid"], "/config_dump")
        certs = worker_page(layout, node, w["pid"], "/certs")["certificates"]
        seen.append({"version": dump["config_version"], "workloads": sorted(x["uid"] for x in dump["workloads"]),
                     "certs": sorted((c["identity"], c["not_after"]) for c in certs)})
    return seen


def metric(layout, node: str, name: str) -> float:
    for line in node_get(layout, node, 15020, "/metrics").splitlines():
        if line.split("{")[0].split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported by the node proxy of {node}")




@pytest.fixture(scope="module")
def echo(cluster):
    """An echo app in demo/db-0 (node-2); clients run in demo/client-0 (node-1)."""
    layout = cluster.layout
    proc = subprocess.Popen(["ip", "netns", "exec", layout.pod_netns("demo", "db-0"), sys.executable, "-c",
                             ECHO_APP, str(ECHO_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening", proc.stderr.read() if proc.poll() is not None else ""
    yield pod_ip(layout, "demo/db-0")
    proc.terminate()
    proc.wait(10)


def hold(layout, ip: str, count: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal", "exec", "demo/client-0", "--", sys.executable, "-c",
                             HOLD_CLIENT, ip, str(ECHO_PORT), str(count), str(seconds)],
                            env={**os.environ, "SHOAL_CLUSTER": layout.name},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def summary(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=240)
    assert out.strip(), err[-800:]
    return json.loads(out.strip().splitlines()[-1])


def held_per_worker(layout, expected: int) -> dict[int, int]:
    """Each node-1 worker's live connections once all ``expected`` are open (polled each second)."""
    def counts():
        found = {w["index"]: w["connections"] for w in workers(layout, "node-1")["workers"]}
        return found if sum(found.values()) >= expected else None
    return eventually(counts, f"{expected} connections live on node-1's workers", timeout=60, interval=0.5)


def all_ready(report: dict) -> dict | None:
    """The workers report when every worker in it is ready, else None."""
    return report if all(w["health"] == "ready" for w in report["workers"]) else None


def test_status_shows_both_workers_serving_every_pod(cluster):
    layout = cluster.layout
    for node in ("node-1", "node-2"):
        # A worker reports ready once its certificates and config arrived, which may follow
        # the cluster's own readiness by a moment on a busy machine: wait for it, bounded.
        report = eventually(lambda node=node: all_ready(workers(layout, node)),
                            f"{node}'s workers ready", timeout=30, interval=0.5)
        assert [w["index"] for w in report["workers"]] == [0, 1]
        assert all(w["health"] == "ready" for w in report["workers"]), report
        assert len({w["pid"] for w in report["workers"]}) == 2
        assert report["workers"][0]["pods"] == report["workers"][1]["pods"] != []
        assert metric(layout, node, "shoal_proxy_workers") == 2
    text = shoal_cli(layout, "status").stdout
    assert "workers: 2/2 ready" in text, text


def test_one_config_stream_per_node_feeds_both_workers_which_load_no_grpc_nor_cryptography(cluster):
    layout = cluster.layout
    streams = json.loads(shoal_cli(layout, "status", "-o", "json").stdout)["controller"]["agents"]
    for node in ("node-1", "node-2"):
        proxies = [s for s in streams if s["node"] == node and s["component"] == "proxy" and s["connected"]]
        assert len(proxies) == 1, streams   # the supervisor's, whatever the number of workers
        report = eventually(lambda node=node: all_ready(workers(layout, node)), f"{node}'s workers ready", timeout=30)
        fed = eventually(lambda node=node: (lambda f: f if f[0] == f[1] and f[0]["certs"] else None)(
            fed_alike(layout, node)), f"{node}'s workers fed alike", timeout=30)
        assert fed[0]["workloads"], fed
        for w in report["workers"]:
            maps = open(f"/proc/{w['pid']}/maps").read()
            assert "cygrpc" not in maps and "/cryptography/" not in maps, f"worker {w['pid']} loaded grpc/cryptography"
            print(f"{node} worker {w['index']} (pid {w['pid']}): RSS {rss_mb(w['pid']):.1f} MB")
        supervisor = int((layout.run_dir / f"proxy-{node}.pid").read_text())
        print(f"{node} supervisor (pid {supervisor}): RSS {rss_mb(supervisor):.1f} MB")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


def test_debug_memory_shows_the_supervisor_and_each_workers_data_path(cluster):
    page = json.loads(node_get(cluster.layout, "node-1", 15000, "/debug/memory"))
    assert page["supervisor"]["rss_kib"] > 0 and page["supervisor"]["structures"]["workers"] == 2
    assert sorted(page["workers"]) == ["0", "1"]
    for worker in page["workers"].values():
        assert worker["rss_kib"] > 0 and "connection_records" in worker["structures"]
        assert worker["structures"]["served_pods"] >= 1 and "gc" not in worker
    objects = json.loads(node_get(cluster.layout, "node-1", 15000, "/debug/memory/objects"))
    assert all(worker["gc"]["objects_by_type"] for worker in objects["workers"].values()), objects.keys()


def test_new_connections_spread_over_both_workers(cluster, echo):
    layout = cluster.layout
    before = {w["index"]: w["handled"] for w in workers(layout, "node-1")["workers"]}
    client = hold(layout, echo, HELD, 6)
    live = held_per_worker(layout, HELD)
    result = summary(client)
    assert result["ok"] == HELD and result["lost"] == [], result
    assert all(n > 0 for n in live.values()), live   # SO_REUSEPORT: both took some
    after = {w["index"]: w["handled"] for w in workers(layout, "node-1")["workers"]}
    assert all(after[i] > before[i] for i in before), (before, after)
    # One set of metrics for the node proxy: the per-worker counts add up in the usual series.
    assert metric(layout, "node-1", "shoal_proxy_enrolled_pods") == len(workers(layout, "node-1")["workers"][0]["pods"])


def test_killed_worker_is_restarted_and_only_its_connections_are_lost(cluster, echo):
    layout = cluster.layout
    lost_before = metric(layout, "node-1", "shoal_proxy_worker_lost_connections_total")
    restarts_before = metric(layout, "node-1", "shoal_proxy_worker_restarts_total")
    client = hold(layout, echo, HELD, 14)
    live = held_per_worker(layout, HELD)
    time.sleep(1.5)   # one more poll: the supervisor's view is the one we read
    report = workers(layout, "node-1")
    victim = max(report["workers"], key=lambda w: w["connections"])
    held_by_victim = victim["connections"]
    assert 0 < held_by_victim < HELD, live
    os.kill(victim["pid"], signal.SIGKILL)
    # Right away, new connections go to the surviving worker: none is refused.
    answers = [pod_exec(layout, "demo/client-0", "curl", "-s", "--max-time", "5", "http://web.demo:8080/",
                        check=False).stdout for _ in range(5)]
    assert all("hello from" in a for a in answers), answers
    result = summary(client)
    # The demo's own short connections may add one or two to a worker's live count.
    assert result["ok"] == HELD and 0 < len(result["lost"]) <= held_by_victim <= len(result["lost"]) + 2, \
        (result, held_by_victim)
    assert len(result["lost"]) < HELD   # the other worker's connections carried on

    def restarted():
        now = {w["index"]: w for w in workers(layout, "node-1")["workers"]}
        fresh = now[victim["index"]]
        return fresh["pid"] != victim["pid"] and fresh["health"] == "ready" and fresh["pods"] == victim["pods"]
    eventually(restarted, "the killed worker to be back, serving every pod", timeout=60)
    # A fresh worker gets the full snapshot and every SVID from its supervisor.
    eventually(lambda: (lambda f: f[0] == f[1] and f[0]["certs"])(fed_alike(layout, "node-1")),
               "the restarted worker fed as the other", timeout=30)
    assert metric(layout, "node-1", "shoal_proxy_worker_restarts_total") == restarts_before + 1
    # Restarting forked no process that died before it became the worker (gRPC's fork
    # handlers aborted such children: a restart then counted twice).
    log = (layout.log_dir / "proxy-node-1.log").read_text()
    assert "Fatal Python error" not in log and "Check failed" not in log, log[-3000:]
    counted = metric(layout, "node-1", "shoal_proxy_worker_lost_connections_total") - lost_before
    assert len(result["lost"]) <= counted <= len(result["lost"]) + 2, (counted, result)
    text = shoal_cli(layout, "status").stdout
    assert "1 restart" in text and f"{int(lost_before + counted)} connections lost" in text, text


def test_pod_add_and_remove_reach_both_workers(cluster):
    layout = cluster.layout

    def served_by_both(present: bool):
        report = workers(layout, "node-1")["workers"]
        return all(("demo/extra-0" in w["pods"]) == present for w in report) and len(report) == 2
    shoal_cli(layout, "apply", "-f", "-", input=EXTRA_POD)
    try:
        eventually(lambda: served_by_both(True), "extra-0 enrolled in both workers", timeout=60)
        certs = json.loads(node_get(layout, "node-1", 15000, "/certs"))["certificates"]
        extra = {c["worker"]: c["not_after"] for c in certs if c["identity"].endswith("/ns/demo/sa/extra")}
        assert set(extra) == {0, 1} and len(set(extra.values())) == 1, certs   # the supervisor's one SVID, in each
        # The config change (the new workload) reached both workers too.
        eventually(lambda: all(any(x["name"] == "extra-0" for x in worker_page(layout, "node-1", w["pid"],
                                                                                "/config_dump")["workloads"])
                               for w in workers(layout, "node-1")["workers"]), "extra-0 in both workers' config")
        ip = pod_ip(layout, "demo/extra-0")
        eventually(lambda: pod_exec(layout, "demo/client-0", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    "--max-time", "5", f"http://{ip}:8081/", check=False).stdout == "200",
                   "client-0 to reach extra-0 through the mesh")
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=EXTRA_POD)
    eventually(lambda: served_by_both(False), "extra-0 released by both workers", timeout=60)
    # Its identity's last pod left the node: no worker keeps that key.
    eventually(lambda: not any(c["identity"].endswith("/ns/demo/sa/extra") for c in json.loads(
        node_get(layout, "node-1", 15000, "/certs"))["certificates"]), "the extra SVID dropped by both workers")


def test_restart_of_a_two_worker_proxy_refuses_nothing(cluster, echo):
    from tests.agent.ztunnel.test_app_cluster import LOAD

    layout = cluster.layout
    web0 = pod_ip(layout, "demo/web-0")   # same node as client-0: both ends on node-1's proxy
    old_pid = int((layout.run_dir / "proxy-node-1.pid").read_text())
    old_workers = {w["pid"] for w in workers(layout, "node-1")["workers"]}
    load = subprocess.Popen([sys.executable, "-m", "shoal", "exec", "demo/client-0", "--", sys.executable,
                             "-c", LOAD, web0, "8080", "30", "8"],
                            env={**os.environ, "SHOAL_CLUSTER": layout.name},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    component = next(c for c in cluster.node_components("node-1") if c.name == "proxy-node-1")
    cluster.start(component)   # the successor supervisor retires the old one
    out, err = load.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["failed"] == [] and result["ok"] == 240, (result, err[-500:])
    eventually(lambda: subprocess.run(["kill", "-0", str(old_pid)], capture_output=True).returncode != 0,
               "the old supervisor to exit", timeout=60)
    assert all(subprocess.run(["kill", "-0", str(p)], capture_output=True).returncode != 0 for p in old_workers)
    report = workers(layout, "node-1")
    assert {w["pid"] for w in report["workers"]}.isdisjoint(old_workers)
    assert all(w["health"] == "ready" for w in report["workers"]), report

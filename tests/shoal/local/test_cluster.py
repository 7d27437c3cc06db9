"""The local cluster: real namespaces, veths, cgroups and processes; clean removal."""
from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shoal.config import ClusterLayout
from shoal.local import network
from shoal.local.linux import Cgroup, Netns
from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = pytest.mark.cluster


def pods_by_name(layout):
    listing = json.loads(shoal_cli(layout, "get", "pods", "-o", "json").stdout)
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in listing["items"]}


def test_demo_pods_run_on_two_nodes_with_ips_from_their_node_cidr(demo_cluster):
    layout = demo_cluster.layout
    pods = pods_by_name(layout)
    assert set(pods) == {"demo/web-0", "demo/web-1", "demo/client-0", "demo/db-0", "legacy/client-0"}
    assert pods["demo/web-0"]["spec"]["nodeName"] != pods["demo/web-1"]["spec"]["nodeName"]
    for pod in pods.values():
        node = pod["spec"]["nodeName"]
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"].startswith(network.pod_cidr(node).rsplit(".", 2)[0] + ".")
    table = shoal_cli(layout, "get", "pods").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "NODE", "IP", "STATUS", "MESHED", "RESTARTS"]
    assert any(row.split()[:2] == ["legacy", "client-0"] and row.split()[5] == "False" for row in table[1:])
    meshed = {name: p["meshed"] for name, p in pods.items()}
    assert meshed["demo/client-0"] is True and meshed["legacy/client-0"] is False


def test_pod_to_pod_across_nodes(demo_cluster):
    layout = demo_cluster.layout
    pods = pods_by_name(layout)
    client_node = pods["legacy/client-0"]["spec"]["nodeName"]
    remote = next(p for n, p in pods.items() if n.startswith("demo/web-") and p["spec"]["nodeName"] != client_node)
    out = pod_exec(layout, "legacy/client-0", "curl", "-s", "--max-time", "5",
                   f"http://{remote['status']['podIP']}:8080/").stdout
    assert f"hello from {remote['metadata']['name']} on {remote['spec']['nodeName']}" in out


def test_service_names_resolve_inside_pods(demo_cluster):
    layout = demo_cluster.layout
    services = json.loads(shoal_cli(layout, "get", "services", "-o", "json").stdout)["items"]
    web = next(s["spec"] for s in services if s["metadata"]["name"] == "web")
    v4, v6 = web["clusterIPs"]   # the demo's Services are PreferDualStack: one per family
    assert web["ipFamilies"] == ["IPv4", "IPv6"] and web["clusterIP"] == v4
    for database, address in (("ahostsv4", v4), ("ahostsv6", v6)):
        out = pod_exec(layout, "legacy/client-0", "getent", database, "web.demo.svc.cluster.local").stdout
        assert out.split()[0] == address
    short = pod_exec(layout, "demo/client-0", "getent", "ahostsv4", "db").stdout
    assert short.split()[0].startswith("10.96.")


def test_pod_processes_live_in_their_own_netns_and_cgroup(demo_cluster):
    layout = demo_cluster.layout
    pods = pods_by_name(layout)
    node = pods["demo/web-0"]["spec"]["nodeName"]
    cgroup = Cgroup(layout.pod_cgroup(node, "demo", "web-0"))
    pids = cgroup.pids()
    assert pids, "web-0 has no process in its cgroup"
    netns_inode = os.stat(Netns(layout.pod_netns("demo", "web-0")).path).st_ino
    for pid in pids:
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode
        assert Path(f"/proc/{pid}/cgroup").read_text().count(f"/{layout.name}/{node}/pods/demo.web-0") == 1
    # Root netns untouched: the pod's eth0 is not visible from here.
    assert os.stat("/proc/self/ns/net").st_ino != netns_inode


def test_a_pod_whose_process_dies_is_restarted(demo_cluster):
    layout = demo_cluster.layout
    node = pods_by_name(layout)["demo/db-0"]["spec"]["nodeName"]
    cgroup = Cgroup(layout.pod_cgroup(node, "demo", "db-0"))
    before = set(cgroup.pids())
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = set(cgroup.pids())
        if now and not now & before:
            break
        time.sleep(0.2)
    else:
        pytest.fail("db-0 was not restarted")
    while time.monotonic() < deadline and pods_by_name(layout)["demo/db-0"]["status"].get("restartCount", 0) < 1:
        time.sleep(0.2)
    assert pods_by_name(layout)["demo/db-0"]["status"]["restartCount"] >= 1


def test_invalid_manifest_is_refused_whole_with_object_and_field(demo_cluster, tmp_path):
    layout = demo_cluster.layout
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("""
apiVersion: v1
kind: Pod
metadata: {name: fine, namespace: demo}
spec: {containers: [{name: c, command: [sleep, "60"]}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: demo}
spec: {ports: [{port: 99999}]}
""")
    proc = shoal_cli(layout, "apply", "-f", str(manifest), check=False)
    assert proc.returncode == 1
    assert "Service demo/broken: spec.ports[0].port" in proc.stderr
    assert "demo/fine" not in pods_by_name(layout)
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("kind: [unclosed")
    proc = shoal_cli(layout, "apply", "-f", str(garbage), check=False)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_exec_into_a_missing_pod_is_a_clear_error(demo_cluster):
    proc = shoal_cli(demo_cluster.layout, "exec", "demo/nope", "--", "true", check=False)
    assert proc.returncode == 1 and "pod demo/nope is not running" in proc.stderr
    proc = shoal_cli(demo_cluster.layout, "exec", "no-slash", "--", "true", check=False)
    assert proc.returncode == 2 and "NAMESPACE/POD" in proc.stderr


def test_logs_show_component_and_pod_output(demo_cluster):
    out = shoal_cli(demo_cluster.layout, "logs", "controller", "--tail", "5").stdout
    written = (demo_cluster.layout.log_dir / "controller.log").read_text().splitlines()
    assert out.splitlines() == written[-5:] and "shoal.controller" in out
    web0 = pods_by_name(demo_cluster.layout)["demo/web-0"]["status"]["podIP"]
    pod_exec(demo_cluster.layout, "legacy/client-0", "curl", "-s", f"http://{web0}:8080/logs-probe")
    pod_log = shoal_cli(demo_cluster.layout, "logs", "demo/web-0").stdout
    assert "GET /logs-probe" in pod_log


def root_netns_fingerprint() -> str:
    parts = [subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout,
             subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout,
             Path("/proc/sys/net/ipv4/ip_forward").read_text()]
    # Interface counters and states of unrelated links change on their own; names and routes must not.
    links = sorted(line.split(":")[1].strip() for line in parts[0].splitlines())
    return json.dumps([links, sorted(parts[1].splitlines()), parts[2]])


def test_up_and_down_leave_the_machine_as_it_was(tmp_path):
    layout = ClusterLayout(name=f"shoal-test-updown-{os.getpid()}")
    before = root_netns_fingerprint()
    shoal_cli(layout, "up", "--nodes", "2", timeout=180)
    try:
        assert len(Netns.list(layout.netns_prefix)) == 3
        assert Cgroup(layout.cgroup).pids()  # the controller (and node components) run
        controller_pid = int((layout.run_dir / "controller.pid").read_text())
        proxy_pid = int((layout.run_dir / "proxy-node-1.pid").read_text())
        # A crash: the controller is gone, everything else is left behind.
        os.kill(controller_pid, signal.SIGKILL)
        # (and a node proxy, as the OOM killer would): neither can write a line, their
        # monitors do, as Kubernetes shows a container's last state.
        os.kill(proxy_pid, signal.SIGKILL)
        for name, pid in (("controller", controller_pid), ("proxy-node-1", proxy_pid)):
            line = f"{name} (pid {pid}) was killed by SIGKILL after "
            log = layout.log_dir / f"{name}.log"
            eventually(lambda: line in log.read_text(), f"the end of {name} in its log", timeout=20)  # noqa: B023
        out = shoal_cli(layout, "up", "--nodes", "1", timeout=180).stdout
        assert "cleaning leftovers" in out
        assert len(Netns.list(layout.netns_prefix)) == 2
        pids = Cgroup(layout.cgroup).pids()
    finally:
        shoal_cli(layout, "down")
    assert Netns.list(layout.netns_prefix) == []
    assert not layout.cgroup.exists() and not layout.run_dir.exists()
    assert not (Path("/etc/netns").exists() and any(Path("/etc/netns").glob(f"{layout.netns_prefix}*")))
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert root_netns_fingerprint() == before
    assert "Nothing to remove" in shoal_cli(layout, "down").stdout


def test_up_refuses_without_root():
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           str(Path(os.sys.executable).parent / "shoal"), "--cluster", "shoal-test-nobody",
                           "up"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "must run as root" in proc.stderr


UNUSED_DENY = """
apiVersion: security.shoal.io/v1
kind: AuthorizationPolicy
metadata: {name: status-version-probe, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/nowhere/sa/nobody"]}}]
"""


def status_when_every_component_acked(layout, newer_than: int = -1):
    """Polls ``shoal status -o json`` until every node's agent and proxy is connected, healthy
    and has ACKed the controller's current config version (which is above ``newer_than``)."""
    def in_sync():
        report = json.loads(shoal_cli(layout, "status", "-o", "json").stdout)
        version = report["controller"]["version"]
        peers = [a for a in report["controller"]["agents"] if a["component"] in ("agent", "proxy")]
        done = int(version) > newer_than and all(
            a["version"] == version and a["health"] == "healthy" and a["connected"] for a in peers)
        return report if done else None
    return eventually(in_sync, f"every agent and proxy to ACK a config version above {newer_than}", timeout=30)


def test_status_shows_each_nodes_components_with_build_and_applied_config_version(demo_cluster):
    layout = demo_cluster.layout
    package_version = importlib.metadata.version("shoal")
    report = status_when_every_component_acked(layout)
    version = report["controller"]["version"]
    assert report["controller"]["build_version"] == package_version
    seen = {(a["node"], a["component"]): a for a in report["controller"]["agents"]
            if a["component"] != "waypoint"}
    assert set(seen) == {(n, c) for n in ("node-1", "node-2") for c in ("agent", "proxy")}
    assert {a["build_version"] for a in seen.values()} == {package_version}
    assert report["flows"]["nodes"]["connected"] == 2
    text = shoal_cli(layout, "status").stdout
    for node in ("node-1", "node-2"):
        line = next(line for line in text.splitlines() if line.strip().startswith(node))
        expected = f"{package_version}, config v{version}, healthy"
        assert f"agent: {expected}" in line and f"proxy: {expected}" in line, text
    # A policy change: every node's agent and proxy ACKs the new config version.
    shoal_cli(layout, "apply", "-f", "-", input=UNUSED_DENY)
    try:
        after = status_when_every_component_acked(layout, newer_than=int(version))
        assert int(after["controller"]["version"]) > int(version)
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=UNUSED_DENY, check=False)


def test_service_vip_answers_from_meshed_and_unmeshed_clients(demo_cluster):
    for client in ("demo/client-0", "legacy/client-0"):
        out = pod_exec(demo_cluster.layout, client, "curl", "-s", "--max-time", "5", "http://web.demo:8080/").stdout
        assert out.startswith("hello from web-"), (client, out)


def test_config_stream_is_tls_verified_with_the_cluster_ca(demo_cluster):
    layout = demo_cluster.layout
    node = Netns(layout.node_netns("node-1"))

    def handshake(*extra: str) -> subprocess.CompletedProcess:
        # "-alpn h2" as every gRPC client offers: gRPC servers drop a TLS connection that did not
        # negotiate h2 right after the handshake (without close_notify), which openssl reports as
        # "unexpected eof" and exit 1 whenever the drop beats its own shutdown on stdin EOF.
        return subprocess.run(node.exec_argv(["openssl", "s_client", "-connect", network.CONTROLLER_ADDRESS,
                                              "-alpn", "h2", "-verify_return_error", "-brief", *extra]),
                              capture_output=True, text=True, errors="replace", timeout=20, input="")  # h2 SETTINGS are binary

    trusted = handshake("-CAfile", str(layout.ca_bundle_path), "-verify_ip", network.CONTROLLER_IP)
    assert trusted.returncode == 0, trusted.stderr
    assert "Verification: OK" in trusted.stderr
    untrusted = handshake()  # the machine's CAs do not vouch for the controller
    assert untrusted.returncode != 0


def test_components_get_memory_tracing_from_the_caller_but_no_other_shoal_setting(monkeypatch):
    """``SHOAL_TRACEMALLOC=N shoal up``: the node proxies' /debug/memory then names the lines
    that allocate; the caller's other SHOAL_* settings are not the components' business."""
    from shoal.local.cluster import LocalCluster

    monkeypatch.setenv("SHOAL_TRACEMALLOC", "3")
    monkeypatch.setenv("SHOAL_PROXY_WORKERS", "4")
    env = LocalCluster(ClusterLayout(name="envcheck")).component_env("node-1")
    assert env["SHOAL_TRACEMALLOC"] == "3" and env["SHOAL_NODE"] == "node-1"
    assert "SHOAL_PROXY_WORKERS" not in env

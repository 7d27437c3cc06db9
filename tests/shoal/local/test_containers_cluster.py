"""``shoal up --containers``: the controller and every node's agent and proxy run as podman
containers of the rendered Deployment and DaemonSet, with their exact privileges; the demo's
meshed traffic flows over mTLS; a killed controller container comes back with its CA root and
identities, and live connections keep flowing.

Needs root, podman (scripts/install.sh --images) and the images of `make images`. The test
does not build them: the first build takes minutes (debootstrap, apt, pip), longer than
the whole suite may spend, so without them it skips and says so. Once they exist, the
cluster runs this checkout's code on them (a source layer made in seconds, see
shoal/local/podman.py), so the test never checks stale code.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from shoal.config import ClusterLayout
from shoal.local import podman
from tests.conftest import container_manifests, containers_missing, eventually, pod_exec, shoal_cli

pytestmark = pytest.mark.cluster



@pytest.fixture(scope="module")
def container_cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = containers_missing()
    if missing:
        pytest.skip(missing)
    from shoal.local.cluster import LocalCluster
    from shoal.local.demo import deploy_demo

    layout = ClusterLayout(name=f"shoal-ctr-{os.getpid()}")
    cluster = LocalCluster(layout, node_manifests=container_manifests(layout))
    try:
        cluster.up(2)
        deploy_demo(cluster, echo=lambda _: None, settle=20)
        yield cluster
    finally:
        cluster.down()
        assert not cluster.leftovers(), cluster.leftovers()
        assert podman.cluster_containers(layout.name) == [], "containers left behind"


def daemonset_container(objects, name: str) -> dict:
    ds = next(o for o in objects if o["kind"] == "DaemonSet" and o["metadata"]["name"] == "shoal-agent")
    return next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == name)


@pytest.mark.parametrize("node", ["node-1", "node-2"])
@pytest.mark.parametrize("name", ["agent", "proxy"])
def test_each_node_container_has_exactly_the_rendered_privileges(container_cluster, node, name):
    layout = container_cluster.layout
    info = podman.inspect(f"{layout.name}.{node}.{name}")
    assert info["State"]["Running"], podman.logs(info["Id"])[-2000:]
    # The manifest the cluster was started from (its image carries this checkout's sources).
    image_tag = info["Config"]["Image"].rsplit(":", 1)[1]
    manifest = daemonset_container(container_manifests(layout)(image_tag), name)
    sc = manifest["securityContext"]
    assert info["Config"]["Image"] == manifest["image"]
    assert sorted(info["EffectiveCaps"]) == sorted(f"CAP_{c}" for c in sc["capabilities"]["add"])
    assert sorted(info["HostConfig"]["CapAdd"]) == sorted(f"CAP_{c}" for c in sc["capabilities"]["add"])
    assert "NET_RAW" not in sc["capabilities"]["add"]
    assert info["HostConfig"]["ReadonlyRootfs"] is sc["readOnlyRootFilesystem"] is True
    assert not info["HostConfig"]["Privileged"]
    assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
    assert info["Config"]["User"] == str(sc["runAsUser"])
    assert info["Config"]["Cmd"] == manifest["command"] + manifest.get("args", [])
    # hostNetwork: the node's namespace; shareProcessNamespace: the sandbox's PID namespace.
    assert info["HostConfig"]["NetworkMode"] == f"ns:/run/netns/{layout.node_netns(node)}"
    assert info["HostConfig"]["PidMode"].startswith("container:")
    # Every volumeMount, and nothing else but the emptyDir tmpfs and podman's own files.
    destinations = {m["Destination"]: m for m in info["Mounts"]}
    assert {m["mountPath"] for m in manifest["volumeMounts"]} - {"/tmp"} == set(destinations)
    for mount in manifest["volumeMounts"]:
        if mount["mountPath"] in destinations:
            assert destinations[mount["mountPath"]]["RW"] is not mount.get("readOnly", False), mount
    env = dict(item.split("=", 1) for item in info["Config"]["Env"])
    assert env["SHOAL_MODE"] == "kubernetes" and env["SHOAL_NODE"] == node
    assert env["SHOAL_CLUSTER"] == layout.name
    # The kernel's view of the running process agrees with podman's.
    pid = info["State"]["Pid"]
    cap_eff = next(int(line.split()[1], 16) for line in open(f"/proc/{pid}/status") if line.startswith("CapEff"))
    assert cap_eff == sum(1 << CAP_NUMBERS[c] for c in sc["capabilities"]["add"])
    # The machine's root cgroup is never the agent's: it attached to its node's own cgroup.
    if name == "agent":
        assert f"/{layout.name}/{node}" in destinations["/host/sys/fs/cgroup"]["Source"]


CAP_NUMBERS = {"NET_RAW": 13, "NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "PERFMON": 38, "BPF": 39}


def test_no_node_component_runs_outside_its_container(container_cluster):
    layout = container_cluster.layout
    assert not (layout.run_dir / "controller.pid").exists(), "the controller was started as a host process"
    for node in ("node-1", "node-2"):
        for name in ("agent", "proxy"):
            pidfile = layout.run_dir / f"{name}-{node}.pid"
            assert not pidfile.exists(), f"{name}-{node} was started as a host process"


def test_meshed_traffic_across_nodes_is_mtls_only(container_cluster):
    layout = container_cluster.layout
    answered = eventually(lambda: pod_exec(layout, "demo/client-0", "curl", "-s", "--max-time", "5",
                                           "http://web.demo:8080/", check=False).stdout,
                          "web.demo answering demo/client-0", timeout=60)
    assert "hello from web-" in answered
    pods = {p["metadata"]["name"]: p for p in container_cluster.api.list("Pod") if p["metadata"]["namespace"] == "demo"}
    client_node = pods["client-0"]["spec"]["nodeName"]
    remote = next(p for n, p in pods.items() if n.startswith("web-") and p["spec"]["nodeName"] != client_node)
    remote_ip = remote["status"]["podIP"]
    capture = subprocess.Popen(["ip", "netns", "exec", layout.control_netns, "tcpdump", "-i", "fabric0", "-nn",
                                "-A", "-s", "0", "-c", "400", f"host {pods['client-0']['status']['podIP']}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
    try:
        time.sleep(1)
        answers = [pod_exec(layout, "demo/client-0", "curl", "-s", "--max-time", "5",
                            f"http://{remote_ip}:8080/", check=False).stdout for _ in range(3)]
        time.sleep(1)
    finally:
        capture.terminate()
        dump = capture.communicate(timeout=10)[0]
    assert all(f"hello from {remote['metadata']['name']}" in a for a in answers), answers
    assert f"{remote_ip}.15008" in dump        # the HBONE tunnel crossed the fabric...
    assert f"{remote_ip}.8080" not in dump     # ...never the app port...
    assert "GET / HTTP" not in dump and "hello from" not in dump   # ...and no plaintext


def test_the_agent_in_its_container_serves_the_node_proxy_and_hubble(container_cluster):
    """The proxy's sockets are recognised by its cgroup through the shared PID namespace
    (without it PIDFD_GET_INFO answers EREMOTE and no pod is handed over)."""
    layout = container_cluster.layout
    out = subprocess.run([sys.executable, "-m", "shoal", "--cluster", layout.name, "logs", "agent",
                          "--node", "node-1"], capture_output=True, text=True, timeout=30).stdout
    assert "its sockets are exempt from capture" in out
    assert "cannot learn the node proxy's cgroup" not in out


def test_the_controller_container_has_the_deployments_privileges_and_runs_the_store(container_cluster):
    layout = container_cluster.layout
    info = podman.inspect(f"{layout.name}.control.controller")
    image_tag = info["Config"]["Image"].rsplit(":", 1)[1]
    objects = container_manifests(layout)(image_tag)
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "shoal-controller")
    pod = deployment["spec"]["template"]["spec"]
    manifest = pod["containers"][0]
    assert info["Config"]["Image"] == manifest["image"]
    assert info["EffectiveCaps"] in (None, []) and info["HostConfig"]["CapDrop"]   # drop ALL, add nothing
    assert info["HostConfig"]["ReadonlyRootfs"] and "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
    assert info["Config"]["User"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert info["Config"]["Cmd"] == manifest["command"] + manifest["args"]
    assert "--source=local" in manifest["args"] and f"--cluster={layout.name}" in manifest["args"]
    status = next(line for line in open(f"/proc/{info['State']['Pid']}/status") if line.startswith("Uid:"))
    assert status.split()[1:3] == ["1337", "1337"]
    # Its state lives in the cluster's run dir (the store, the CA, the identities), written as 1337.
    assert (layout.ca_dir / "root-cert.pem").stat().st_uid == 1337
    assert (layout.run_dir / "identities").stat().st_uid == 1337


def test_killing_the_controller_container_keeps_root_identities_and_live_traffic(container_cluster):
    """SIGKILL of the controller's container, then `podman start` (what the kubelet does):
    the CA root and every identity come back from the state it persisted (the run dir,
    its state volume), and a db session opened before keeps flowing across the outage."""
    from tests.controller.test_app_cluster import controller_outage_keeps_state_and_traffic

    name = f"{container_cluster.layout.name}.control.controller"

    def podman_do(*argv: str) -> None:
        subprocess.run(["podman", *podman.PODMAN_GLOBAL, *argv, name], check=True, capture_output=True)

    controller_outage_keeps_state_and_traffic(container_cluster, lambda: podman_do("kill", "--signal", "KILL"),
                                              lambda: podman_do("start"))


def test_a_waypoint_runs_as_the_templates_container_enforces_l7_and_goes_refusing_nothing(container_cluster):
    """`shoal waypoint apply -n demo --enroll-namespace`: the waypoint is the rendered
    template's container (uid 1337, no capabilities, read-only root, in the pod's netns and
    cgroup); demo/client-0's requests go through it, an L7 DENY answers 403 while other
    requests pass; `shoal waypoint delete` then restores L4 with no request refused."""
    from shoal.local.waypoints import volume_dir
    from tests.shoal.cli.test_waypoint_delete_cluster import delete_refusing_nothing
    from tests.waypoint.test_app_cluster import l7_deny_in_force, load, waypoint_requests

    layout = container_cluster.layout
    shoal_cli(layout, "waypoint", "apply", "-n", "demo", "--enroll-namespace")
    name = f"{layout.name}.pod.demo.waypoint-0.waypoint"
    try:
        eventually(lambda: load(layout, 5)["statuses"].get("200") == 5 and waypoint_requests(layout) > 0,
                   "requests of demo/client-0 through the waypoint", timeout=120, interval=0.5)
        info = podman.inspect(name)
        template = yaml.safe_load_all(next(
            o for o in container_manifests(layout)(info["Config"]["Image"].rsplit(":", 1)[1])
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "shoal-waypoint-template")["data"]["template.yaml"])
        pod = next(d for d in template if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]
        manifest = pod["containers"][0]
        assert info["Config"]["Image"] == manifest["image"] and info["Config"]["Cmd"] == manifest["command"] + manifest.get("args", [])
        assert info["EffectiveCaps"] in (None, []) and manifest["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert info["HostConfig"]["ReadonlyRootfs"] and "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
        assert info["Config"]["User"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        assert info["HostConfig"]["NetworkMode"] == f"ns:/run/netns/{layout.pod_netns('demo', 'waypoint-0')}"
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        assert set(mounts) == {m["mountPath"] for m in manifest["volumeMounts"]} - {"/tmp"}
        assert mounts["/var/run/secrets/shoal/tokens"]["Source"] == str(volume_dir(layout, "demo", "waypoint"))
        assert not any(m["RW"] for m in mounts.values())
        pid = info["State"]["Pid"]
        assert next(line for line in open(f"/proc/{pid}/status") if line.startswith("CapEff")).split()[1] == "0" * 16
        assert "/pods/demo.waypoint-0/" in open(f"/proc/{pid}/cgroup").read()
        # L7: enforced by the waypoint, which only an HTTP-aware hop can do.
        with l7_deny_in_force(layout):
            assert load(layout, 3, "--method", "DELETE", "--path", "/admin/x")["statuses"] == {"403": 3}
            assert load(layout, 3, "--method", "GET", "--path", "/admin/x")["statuses"] == {"200": 3}
        delete_refusing_nothing(layout)
        eventually(lambda: not podman.exists(name), "the waypoint container to go", timeout=30, interval=0.5)
    finally:
        shoal_cli(layout, "waypoint", "delete", "-n", "demo", "--wait", "60", check=False, timeout=120)


def test_replacing_the_node_proxy_container_under_load_refuses_nothing_and_drains(container_cluster):
    """Scaled down from perf/scenarios/upgrade.py: a client on node-1 opens 50 new
    connections a second to an echo app on node-2, and holds 20 long-lived ones, while
    node-1's proxy container is replaced (what an upgrade does to it). The successor takes
    over through the restart handover before the old proxy stops accepting: no new
    connection fails, every held one survives the drain, and the old container is gone.

    Why 50/s and 30 s per connection: on the shared 2-core machine the successor's start
    (podman, then three Python processes importing) starves the old proxy, which then
    answers in seconds (measured at 100/s under load 14: p50 2.8 s, max 6.3 s, against
    0.2 s without a replacement). At 100/s that delay stood long enough for the proxy's
    shedding on queueing delay (agent/ztunnel/shedding.py) to reset 139 of 1,000: an
    overload answer, not the handover's, and what perf/scenarios/upgrade.py measures at
    the issue's 200/s. Slow is reported here; refused, reset or never answered fails."""
    from shoal.perf.connscripts import SOAK_CLIENT
    from shoal.perf.scenarios.load import parse_refusals
    from tests.agent.ztunnel.test_app_cluster import ECHO_PORT, _hold, _start_echo, _summary, probe
    from tests.conftest import pod_ip

    def refusals(node):
        return parse_refusals(subprocess.run(
            ["ip", "netns", "exec", layout.node_netns(node), "curl", "-s", "-m", "20", "http://127.0.0.1:15020/metrics"],
            capture_output=True, text=True, timeout=30).stdout)

    layout = container_cluster.layout
    name = f"{layout.name}.node-1.proxy"
    old_id = podman.inspect(name)["Id"]
    echo = _start_echo(layout, "demo/db-0")
    try:
        db = pod_ip(layout, "demo/db-0")
        hold = _hold(layout, "demo/client-0", db, 20, 16)
        time.sleep(3)   # all 20 open and pinging
        load = subprocess.Popen([sys.executable, "-m", "shoal", "exec", "demo/client-0", "--", sys.executable,
                                 "-c", SOAK_CLIENT, db, str(ECHO_PORT), "50", "12", "30"],
                                env={**os.environ, "SHOAL_CLUSTER": layout.name},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        before = refusals("node-2")
        started = time.monotonic()
        new_id = container_cluster.replace_proxy("node-1")
        replaced = time.monotonic() - started
        new_connections, held = _summary(load), _summary(hold)
    finally:
        echo.terminate()
        echo.wait(10)
    previous = (layout.log_dir / "proxy-node-1.previous.log").read_text()
    # Who refused what, if anything: the new node-1 proxy's and node-2's counters, the old one's log.
    refused = {"node-1 (new)": refusals("node-1"),
               "node-2 (since the replacement)": {k: v - before.get(k, 0) for k, v in refusals("node-2").items()
                                                  if v > before.get(k, 0)},
               "node-1 (old)": [line[-200:] for line in previous.splitlines() if "overloaded" in line or "busy" in line]}
    print(f"replacement took {replaced:.1f} s; new connections {new_connections}; held {held}; refusals {refused}")
    assert new_connections["reasons"] == {}, (new_connections, refused)
    assert new_connections["failed"] == 0 and new_connections["ok"] == 600, new_connections
    assert held["ok"] == 20 and held["lost"] == [] and held["n_failed"] == 0, held
    assert new_id != old_id and podman.inspect(name)["Id"] == new_id
    assert podman.inspect(name)["State"]["Running"]
    assert not podman.exists(old_id) and not podman.exists(f"{name}.next")
    assert "handover: asking proxy" not in previous and "drain: carried" in previous, previous[-2000:]
    assert "handover: asking proxy" in (layout.log_dir / "proxy-node-1.log").read_text()
    # The new container serves: a fresh connection through it.
    eventually(lambda: "reply: db" in probe(layout, "demo/client-0", "db.demo", 7000, "hello"),
               "db through the new proxy")

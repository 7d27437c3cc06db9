"""The dual-stack local cluster: IPv6 beside IPv4 on every node and pod, routed across the
fabric; delivery to the pod IP (loopback-only listeners stay private, an app bound to its
pod IP works and sees the real client); curl -4 / -6 to a dual-stack Service."""
from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from shoal.local import network
from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

APP = str(Path(__file__).resolve().parent / "ipapp.py")


def _pod(namespace: str, name: str, node: str, *listen: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                                            "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "command": ["python3", APP, "serve", *listen]}]}}


def _pods(layout) -> dict:
    listing = json.loads(shoal_cli(layout, "get", "pods", "-o", "json").stdout)["items"]
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in listing}


def _ips(pod: dict) -> dict[int, str]:
    return {ipaddress.ip_address(e["ip"]).version: e["ip"] for e in pod["status"].get("podIPs", [])}


@pytest.fixture(scope="module")
def apps(demo_cluster, tmp_path_factory):
    """demo/ipapp-0 (meshed) and legacy/ipapp-0 (not) on node-2, clients on node-1."""
    layout = demo_cluster.layout
    listen = ("loopback4:9999", "loopback6:9999", "pod4:9100", "pod6:9100")
    manifest = tmp_path_factory.mktemp("dualstack") / "apps.yaml"
    docs = [_pod("demo", "ipapp-0", "node-2", *listen), _pod("legacy", "ipapp-0", "node-2", *listen)]
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    shoal_cli(layout, "apply", "-f", str(manifest))
    try:
        pods = eventually(lambda: (p := _pods(layout)) and all(
            p.get(k, {}).get("status", {}).get("phase") == "Running" and len(_ips(p[k])) == 2
            for k in ("demo/ipapp-0", "legacy/ipapp-0")) and p, "the dual-stack apps to run")
        eventually(lambda: "listening on ::1:9999" in shoal_cli(layout, "logs", "demo/ipapp-0").stdout,
                   "demo/ipapp-0 to listen")
        yield pods
    finally:
        shoal_cli(layout, "delete", "-f", str(manifest), check=False)


def _connect(layout, where: str, host: str, port: int) -> str:
    argv = ("python3", APP, "connect", host, str(port))
    if where == "control":
        return subprocess.run(["ip", "netns", "exec", layout.control_netns, *argv], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    return pod_exec(layout, where, *argv).stdout.strip()


def test_nodes_and_pods_are_dual_stack_and_ipv6_is_routed_across_nodes(demo_cluster, apps):
    layout = demo_cluster.layout
    for key, pod in _pods(layout).items():
        ips = _ips(pod)
        node = pod["spec"]["nodeName"]
        assert pod["status"]["podIP"] == ips[4], f"{key}: IPv4 is the primary family"
        assert ipaddress.ip_address(ips[6]) in ipaddress.ip_network(network.pod_cidrs(node)[1]), key
    hosts = Path(f"/etc/netns/{layout.pod_netns('demo', 'client-0')}/hosts").read_text()
    assert _ips(_pods(layout)["demo/client-0"])[6] in hosts
    # IPv6 between unmeshed pods on different nodes, and from the control netns over the fabric.
    server6 = _ips(apps["legacy/ipapp-0"])[6]
    client6 = _ips(_pods(layout)["legacy/client-0"])[6]
    assert _pods(layout)["legacy/client-0"]["spec"]["nodeName"] != "node-2"
    assert _connect(layout, "legacy/client-0", server6, 9100) == f"from {client6}"
    assert _connect(layout, "control", server6, 9100) == f"from {network.CONTROLLER_IPS[1]}"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("where", ["demo/client-0", "legacy/client-0", "control"])
def test_loopback_only_listener_is_not_reachable_through_the_pod_ip(demo_cluster, apps, where, family):
    """Issue 11: an app on 127.0.0.1:9999 in a meshed pod answered meshed pods, an unmeshed
    pod and the control netns, because the proxy delivered to the pod's loopback."""
    layout = demo_cluster.layout
    answer = _connect(layout, where, _ips(apps["demo/ipapp-0"])[family], 9999)
    assert answer.startswith("error"), f"{where} reached a loopback-only listener: {answer}"
    assert "9999: connection" not in shoal_cli(layout, "logs", "demo/ipapp-0").stdout


def test_app_bound_only_to_its_pod_ip_answers_through_the_mesh_with_the_real_client(demo_cluster, apps):
    layout = demo_cluster.layout
    pods = _pods(layout)
    server4 = _ips(apps["demo/ipapp-0"])[4]
    for client in ("demo/client-0", "legacy/client-0"):
        assert _connect(layout, client, server4, 9100) == f"from {_ips(pods[client])[4]}", client
    flows = shoal_cli(layout, "observe", "--namespace", "demo", "--to-port", "9100", "--last", "50").stdout
    assert "mTLS spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/default" in flows


def test_app_bound_only_to_its_pod_ipv6_answers_through_the_mesh_with_the_real_client(demo_cluster, apps):
    layout = demo_cluster.layout
    client6 = _ips(_pods(layout)["demo/client-0"])[6]
    assert _connect(layout, "demo/client-0", _ips(apps["demo/ipapp-0"])[6], 9100) == f"from {client6}"


def test_curl_ipv4_to_the_dual_stack_service(demo_cluster):
    out = pod_exec(demo_cluster.layout, "demo/client-0", "curl", "-4", "-s", "--max-time", "5",
                   "http://web.demo:8080/").stdout
    assert out.startswith("hello from web-")


def test_curl_ipv6_to_the_dual_stack_service(demo_cluster):
    out = pod_exec(demo_cluster.layout, "demo/client-0", "curl", "-6", "-s", "--max-time", "5",
                   "http://web.demo:8080/").stdout
    assert out.startswith("hello from web-")

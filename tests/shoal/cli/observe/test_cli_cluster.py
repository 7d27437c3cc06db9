"""`shoal observe` on the real local cluster: agents, proxies, relay in the controller."""
from __future__ import annotations

import json

import pytest

from tests.conftest import eventually, pod_exec, pod_ip, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

DENY_DB = """
apiVersion: security.shoal.io/v1
kind: AuthorizationPolicy
metadata: {name: observe-deny-client-db, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
      to: [{operation: {ports: ["7000"]}}]
"""


def flows(layout, *args):
    out = shoal_cli(layout, "observe", "-o", "jsonpb", *args, check=False)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_demo_flows_with_identities_and_mtls(demo_cluster):
    layout = demo_cluster.layout

    def client_to_web():
        found = [d for d in flows(layout, "--namespace", "demo", "--last", "20")
                 if d.get("flow", {}).get("source", {}).get("pod_name") == "client-0"
                 and d["flow"].get("destination", {}).get("pod_name", "").startswith("web-")]
        mtls = [d for d in found if d["flow"]["IP"].get("encrypted") and "auth_type" not in d["flow"]]
        return found if mtls else None

    found = eventually(client_to_web, "client -> web flows with mTLS", timeout=60)
    flow = found[-1]["flow"]
    assert flow["source"]["identity"] and flow["destination"]["identity"]
    assert "k8s:app=client" in flow["source"]["labels"]
    assert found[-1]["node_name"] in ("node-1", "node-2")
    nodes = shoal_cli(layout, "list", "nodes").stdout.splitlines()
    assert [row.split()[:2] for row in nodes[1:]] == [["node-1", "Connected"], ["node-2", "Connected"]]


def test_policy_drop_shows_dropped_with_reason(demo_cluster):
    layout = demo_cluster.layout
    shoal_cli(layout, "apply", "-f", "-", input=DENY_DB)
    try:
        def dropped():
            pod_exec(layout, "demo/client-0", "curl", "-s", "--max-time", "2", "telnet://db:7000", check=False)
            # The deny hits connect() to the ClusterIP: the destination is the db service.
            out = shoal_cli(layout, "observe", "--verdict", "DROPPED", "--from-pod", "demo/client-0",
                            "--to-service", "demo/db", "--last", "5", check=False).stdout
            return out if "DROPPED" in out else None

        line = eventually(dropped, "a DROPPED flow to db", timeout=60).splitlines()[-1]
        assert "demo/client-0" in line and "demo/db:7000" in line and "Policy denied" in line
        assert "denied by demo/observe-deny-client-db" in line        # the kernel's rule_id, named
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=DENY_DB, check=False)


def test_status_shows_a_real_flow_rate_and_each_nodes_flow_server(demo_cluster):
    layout = demo_cluster.layout

    def rate():
        report = json.loads(shoal_cli(layout, "status", "-o", "json").stdout)
        return report if report["flows"]["flows"]["rate"] > 0 else None

    report = eventually(rate, "a non-zero flow rate in shoal status", timeout=30)
    per_node = report["flows"]["per_node"]
    assert {name: node["state"] for name, node in per_node.items()} == {
        "node-1": "NODE_CONNECTED", "node-2": "NODE_CONNECTED"}
    assert all(node["version"].startswith("shoal-") for node in per_node.values())
    text = shoal_cli(layout, "status").stdout
    assert "0.0 flows/s" not in text and text.count("flows: healthy (shoal-") == 2


def test_last_n_is_n_in_total(demo_cluster):
    """`--last 20` is the cluster's 20 newest, merged across nodes, not 20 per node. Which
    nodes the newest 20 of all traffic come from depends on what ran last (a burst of
    same-node traffic fills them with node-1's); flows to web-1 (node-2) all come from
    clients on node-1, so each connection shows on both nodes: 8 of them just before make
    sure both are among the newest 20 to it."""
    layout = demo_cluster.layout
    script = ("import socket,sys\n"
              "for _ in range(8):\n"
              "    s = socket.create_connection((sys.argv[1], 8080), timeout=5)\n"
              "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.recv(4096); s.close()\n")
    pod_exec(layout, "demo/client-0", "python3", "-c", script, pod_ip(layout, "demo/web-1"))
    out = shoal_cli(layout, "observe", "--last", "20", "--to-pod", "demo/web-1").stdout
    lines = out.splitlines()
    assert len(lines) == 20, out
    assert {"[node-1]", "[node-2]"} <= {line.split()[3].rstrip(":") for line in lines}, out


POD_PROBE = """
import sys, grpc
from shoal.api.observer import observer_pb2, observer_pb2_grpc
for target in sys.argv[1:]:
    try:
        observer_pb2_grpc.ObserverStub(grpc.insecure_channel(target)).ServerStatus(
            observer_pb2.ServerStatusRequest(), timeout=3)
        print(target, "ANSWERED")
    except grpc.RpcError as error:
        print(target, error.code().name)
"""


def test_pods_cannot_read_flows_and_the_relay_dials_agents_with_mtls(demo_cluster):
    """No plaintext flow API is reachable from a pod: agents' 4244 and the relay's 4245
    take only mTLS with a Hubble CA certificate. The CLI's certificate reads through."""
    import sys

    from shoal.config import PORT_HUBBLE, PORT_HUBBLE_RELAY
    from shoal.local import network

    layout = demo_cluster.layout
    targets = [f"{network.node_ip('node-1')}:{PORT_HUBBLE}", f"{network.pod_gateway('node-1')}:{PORT_HUBBLE}",
               f"{network.CONTROLLER_IP}:{PORT_HUBBLE_RELAY}"]
    out = pod_exec(layout, "demo/client-0", sys.executable, "-c", POD_PROBE, *targets).stdout
    assert "ANSWERED" not in out and out.count("UNAVAILABLE") == 3, out
    # The relay reaches the agents over TCP 4244 with its client certificate ...
    nodes = shoal_cli(layout, "list", "nodes", "-o", "json").stdout
    assert nodes.count("NODE_CONNECTED") == 2 and f":{PORT_HUBBLE}" in nodes
    # ... and the CLI reads 4245 over mTLS with the cluster's CLI certificate.
    import os
    import subprocess

    over_tcp = subprocess.run(
        ["ip", "netns", "exec", layout.control_netns, sys.executable, "-m", "shoal", "observe",
         "--server", f"{network.CONTROLLER_IP}:{PORT_HUBBLE_RELAY}", "--last", "3"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SHOAL_CLUSTER": layout.name})
    assert over_tcp.returncode == 0 and len(over_tcp.stdout.splitlines()) == 3, over_tcp


def test_unmeshed_pods_connections_show_with_their_identities(demo_cluster):
    """legacy/client-0 is outside the mesh: nothing captures its connections, but the
    kernel reports each one at its source (from-endpoint), with the ipcache's identities."""
    layout = demo_cluster.layout

    def reported():
        found = [d["flow"] for d in flows(layout, "--from-pod", "legacy/client-0", "--last", "50")
                 if d["flow"].get("trace_observation_point") == "FROM_ENDPOINT"]
        return found or None

    flow = eventually(reported, "legacy/client-0's own connections in the flows", timeout=60)[-1]
    assert flow["source"]["identity"] and flow["source"]["namespace"] == "legacy"
    assert flow["destination"]["pod_name"].startswith("web-") and flow["verdict"] == "FORWARDED"
    assert not flow["IP"].get("encrypted")

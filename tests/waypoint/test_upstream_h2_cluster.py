"""Issue 14's gRPC "shows when done", on the real local cluster: a grpcio client with its
default settings (in demo/client-0, meshed) calls a grpcio service in another namespace
through that namespace's waypoint, which speaks HTTP/2 to the pods (Service port
``appProtocol: grpc``) over HBONE; a 90/10 GRPCRoute splits the calls, and errors carry
the right grpc-status: the server's own (with its trailers), and the waypoint's (no
route: UNIMPLEMENTED; a message over the size limit: RESOURCE_EXHAUSTED)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

ECHO = str(Path(__file__).resolve().parent / "grpcecho.py")
NAMESPACE = "grpc"
CALLS = 400   # binomial sd of the v2 share ~1.5 %: the +-5 % tolerance is 3.3 sd


def manifest() -> str:
    pods = "".join(f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-{version}-0, namespace: {NAMESPACE}, labels: {{app: echo, version: {version}}}}}
spec:
  nodeName: {node}
  containers:
    - name: echo
      command: [python3, {ECHO}, serve, echo-{version}, "50051"]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-{version}, namespace: {NAMESPACE}}}
spec:
  selector: {{app: echo, version: {version}}}
  ports: [{{name: rpc, port: 50051, targetPort: 50051, appProtocol: grpc}}]
""" for version, node in (("v1", "node-2"), ("v2", "node-1")))
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}, labels: {{shoal.io/mesh: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NAMESPACE}}}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {{app: echo}}
  ports: [{{name: grpc, port: 50051, targetPort: 50051}}]
{pods}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: echo-split, namespace: {NAMESPACE}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: 50051}}]
  rules:
    - matches: [{{method: {{service: demo.Echo}}}}]
      backendRefs:
        - {{name: echo-v1, port: 50051, weight: 90}}
        - {{name: echo-v2, port: 50051, weight: 10}}
"""


def run_client(layout, calls: int, target: str = f"echo.{NAMESPACE}:50051") -> dict:
    out = pod_exec(layout, "demo/client-0", sys.executable, ECHO, "call", target, str(calls),
                   timeout=240, check=False)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"client failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def echo(demo_cluster):
    layout = demo_cluster.layout
    objects = manifest()
    shoal_cli(layout, "apply", "-f", "-", input=objects)
    try:
        shoal_cli(layout, "waypoint", "apply", "-n", NAMESPACE, "--enroll-namespace", "--wait", "90", timeout=150)
        for version in ("v1", "v2"):
            eventually(lambda version=version: "serving" in shoal_cli(
                layout, "logs", f"{NAMESPACE}/echo-{version}-0", check=False).stdout,
                f"the echo-{version} gRPC server", timeout=90, interval=0.5)
        # Both backends answer through the waypoint once the route reached it.
        eventually(lambda: len(run_client(layout, 30)["backends"]) == 2, "both backends through the GRPCRoute",
                   timeout=120, interval=1)
        yield layout
    finally:
        shoal_cli(layout, "waypoint", "delete", "-n", NAMESPACE, "--wait", "60", check=False, timeout=150)
        shoal_cli(layout, "delete", "-f", "-", input=objects, check=False, timeout=150)


def test_grpcio_client_through_the_waypoint_splits_90_10_and_gets_grpc_statuses(echo):
    result = run_client(echo, CALLS)
    print("grpcio through the waypoint:", json.dumps(result))
    backends = result["backends"]
    assert result["errors"] == {} and sum(backends.values()) == CALLS, result
    share = backends.get("echo-v2", 0) / CALLS
    assert abs(share - 0.10) <= 0.05, result
    # Server streaming through the HTTP/2 upstream.
    assert result["stream"][:1] and len(result["stream"]) == 3, result
    # The server's own status, message and trailing metadata, end to end.
    assert result["server_error"]["code"] == "NOT_FOUND", result
    assert result["server_error"]["trailers"].get("x-failed-by", "").startswith("echo-v"), result
    # The waypoint's own answers, as gRPC statuses over HTTP 200.
    assert result["no_route"]["code"] == "UNIMPLEMENTED", result
    assert result["too_large"]["code"] == "RESOURCE_EXHAUSTED", result
    # The waypoint saw them as gRPC: its Istio metrics carry each grpc-status.
    metrics = pod_exec(echo, f"{NAMESPACE}/waypoint-0", "curl", "-s", "http://127.0.0.1:15020/metrics").stdout
    statuses = {line.split('grpc_response_status="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("istio_requests_total{") and 'request_protocol="grpc"' in line}
    assert {"0", "5", "8", "12"} <= statuses, metrics[-3000:]


def test_an_ipv6_client_reaches_the_dual_stack_waypoint_over_ipv6(echo):
    """The echo Service's IPv6 ClusterIP: the node proxy tunnels to the waypoint's IPv6
    address (the waypoint listens on both families), and the waypoint, trusting the
    node proxy's ``forwarded`` for client-0's own identity, reports client-0's IPv6 address."""
    services = json.loads(shoal_cli(echo, "get", "services", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    spec = next(s["spec"] for s in services if s["metadata"]["name"] == "echo")
    vip6 = next(ip for ip in spec["clusterIPs"] if ":" in ip)
    result = run_client(echo, 20, target=f"ipv6:[{vip6}]:50051")
    assert result["errors"] == {} and sum(result["backends"].values()) == 20, result
    pods = json.loads(shoal_cli(echo, "get", "pods", "-n", "demo", "-o", "json").stdout)["items"]
    client = next(p for p in pods if p["metadata"]["name"] == "client-0")
    client6 = next(a["ip"] for a in client["status"]["podIPs"] if ":" in a["ip"])
    logs = shoal_cli(echo, "logs", f"{NAMESPACE}/waypoint-0", "--tail", "100000", check=False).stdout
    sources = {json.loads(line)["downstream_remote_address"] for line in logs.splitlines()
               if line.startswith("{") and '"downstream_remote_address"' in line}
    assert f"{client6}:0" in sources, sorted(sources)

"""Issue 12's real clients, on the shared local cluster, with their default settings:
grpcio (unary and bidi streaming), a Java client on Debian's JRE and a Node.js client reach
a Service on the other node, from the meshed `demo` (their flows show mTLS) and from the
unmeshed `legacy` namespace.

gRPC's C core and the JVM dial IPv4 through AF_INET6 sockets (``::ffff:a.b.c.d``): that
takes the agent's cgroup/connect6 program (an IPv4-mapped destination takes the IPv4 path).
Node.js dials the name's IPv6 address here (the Services are PreferDualStack)."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

CLIENTS = Path(__file__).resolve().parent / "clients"
SERVERS = [
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "grpc-0", "namespace": "demo", "labels": {"app": "grpc"}},
     "spec": {"nodeName": "node-2", "containers": [
         {"name": "grpc", "command": ["python3", str(CLIENTS / "grpc_echo.py"), "serve", "50051"]}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "grpc", "namespace": "demo"},
     "spec": {"selector": {"app": "grpc"}, "ipFamilyPolicy": "PreferDualStack",
              "ports": [{"name": "grpc", "port": 50051, "targetPort": 50051}]}},
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "far-0", "namespace": "demo", "labels": {"app": "far"}},
     "spec": {"nodeName": "node-2", "containers": [
         {"name": "web", "command": ["python3", "-m", "shoal.local.demo.apps", "web", "--port", "8080"]}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "far", "namespace": "demo"},
     "spec": {"selector": {"app": "far"}, "ipFamilyPolicy": "PreferDualStack",
              "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}},
]
CLIENT_PODS = ("demo/client-0", "legacy/client-0")   # both on node-1


@pytest.fixture(scope="module")
def servers(demo_cluster, tmp_path_factory):
    layout = demo_cluster.layout
    manifest = tmp_path_factory.mktemp("realclients") / "servers.json"
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": SERVERS}))
    shoal_cli(layout, "apply", "-f", str(manifest))
    try:
        pods = {p["metadata"]["name"]: p for p in json.loads(
            shoal_cli(layout, "get", "pods", "-n", "demo", "-o", "json").stdout)["items"]}
        assert pods["client-0"]["spec"]["nodeName"] != "node-2", "clients and servers on different nodes"
        eventually(lambda: "serving on 50051" in shoal_cli(layout, "logs", "demo/grpc-0", check=False).stdout,
                   "the gRPC server", timeout=60)
        for family in ("-4", "-6"):   # a new pod's both families, through the mesh
            eventually(lambda family=family: pod_exec(layout, "demo/client-0", "curl", family, "-s", "--max-time", "3",
                                        "http://far.demo:8080/", check=False).stdout.startswith("hello"),
                       f"the far web server ({family})", timeout=60)
        yield layout
    finally:
        shoal_cli(layout, "delete", "-f", str(manifest), check=False)


def _mtls_flow_seen(layout, port: int) -> bool:
    flows = shoal_cli(layout, "observe", "--namespace", "demo", "--to-port", str(port), "--last", "200").stdout
    return any("demo/client-0" in line and "mTLS spiffe://cluster.local/ns/demo/sa/client" in line
               for line in flows.splitlines())


def _run(layout, pod: str, *argv: str) -> str:
    return pod_exec(layout, pod, *argv, timeout=60, check=False).stdout.strip()


@pytest.mark.parametrize("pod", CLIENT_PODS)
def test_grpcio_unary_and_bidi_streaming_with_default_settings(servers, pod):
    out = _run(servers, pod, sys.executable, str(CLIENTS / "grpc_echo.py"), "call", "grpc.demo:50051")
    result = json.loads(out.splitlines()[-1]) if out.startswith("{") else {"error": out}
    assert result.get("unary", "").startswith("echo hello") and result.get("chat") == ["echo 1", "echo 2", "echo 3"], out
    if pod.startswith("demo/"):
        assert eventually(lambda: _mtls_flow_seen(servers, 50051), "an mTLS flow for the gRPC client", timeout=10)


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory):
    if not shutil.which("javac") or not shutil.which("java"):
        pytest.fail("java/javac missing: scripts/install.sh installs Debian's JDK")
    out = tmp_path_factory.mktemp("java")
    subprocess.run(["javac", "-d", str(out), str(CLIENTS / "HttpGet.java")], check=True, timeout=120)
    return out


def _tar_base64(folder: Path) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=".")
    return base64.b64encode(buffer.getvalue()).decode()


# The pod runs as its own uid with a private /tmp: the classes are copied in over stdin (as
# kubectl cp does with tar), then run from there.
JAVA_IN_POD = 'd=$(mktemp -d) && base64 -d | tar -x -C "$d" && exec java -cp "$d" "$@"'


@pytest.mark.parametrize("pod", CLIENT_PODS)
def test_java_client_on_debians_jre(servers, java_classes, pod):
    out = pod_exec(servers, pod, "sh", "-c", JAVA_IN_POD, "java", "HttpGet", "http://far.demo:8080/",
                   timeout=60, check=False, input=_tar_base64(java_classes))
    out = out.stdout.strip() or out.stderr
    assert out.startswith("200 hello from far-0"), out
    if pod.startswith("demo/"):
        assert eventually(lambda: _mtls_flow_seen(servers, 8080), "an mTLS flow for the Java client", timeout=10)


@pytest.mark.parametrize("pod", CLIENT_PODS)
def test_nodejs_client(servers, pod):
    out = _run(servers, pod, "node", str(CLIENTS / "http_get.js"), "http://far.demo:8080/")
    assert out.startswith("200 hello from far-0"), out
    if pod.startswith("demo/"):
        assert eventually(lambda: _mtls_flow_seen(servers, 8080), "an mTLS flow for the Node.js client", timeout=10)

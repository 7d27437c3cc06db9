"""The real controller process (`python -m shoal.controller`, local source, no kubelet) on
loopback: apply through the local API, stream with the real ConfigClient, survive a restart."""
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from shoal.config import ClusterLayout
from shoal.local.apiclient import ApiClient
from shoal.xds.client import ConfigClient
from shoal.xds.state import ConfigState

pytestmark = pytest.mark.timeout(90)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def layout():
    layout = ClusterLayout(name=f"shoal-t{os.getpid()}-ctl")
    yield layout
    shutil.rmtree(layout.run_dir, ignore_errors=True)


class ControllerProcess:
    def __init__(self, layout, grpc_port, admin_port):
        self.layout, self.grpc_port, self.admin_port = layout, grpc_port, admin_port
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.controller", "--cluster", self.layout.name,
             "--no-kubelet", "--grpc-address", f"127.0.0.1:{self.grpc_port}",
             "--admin-address", f"127.0.0.1:{self.admin_port}", "--relay-address", "",
             "--cert-ttl", "2h", "--tls"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        api = ApiClient(self.layout.api_socket, timeout=5)
        deadline = time.time() + 30
        while not api.healthy():
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.time() < deadline, "controller did not come up"
            time.sleep(0.1)
        return api

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def controller(layout):
    proc = ControllerProcess(layout, free_port(), free_port())
    yield proc
    proc.stop()


def objects():
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}
    ns = {"apiVersion": "v1", "kind": "Namespace",
          "metadata": {"name": "demo", "labels": {"shoal.io/mesh": "enabled"}}}

    def pod(name, ip):
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "demo", "labels": {"app": "web"}},
                "spec": {"nodeName": "node-1", "serviceAccountName": "web",
                         "containers": [{"name": "main", "command": ["sleep", "1"]}]},
                "status": {"phase": "Running", "podIP": ip}}
    return [node, ns, pod("web-0", "10.244.1.2")], pod


async def until(predicate, timeout=15):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_controller_process_streams_survives_restart_and_reports_status(controller, layout):
    api = controller.start()
    base, pod = objects()
    api.apply(base[:1])   # the store checks spec.nodeName against existing Nodes
    api.apply(base[1:])
    token = layout.bootstrap_token_path.read_text().strip()
    assert oct(layout.bootstrap_token_path.stat().st_mode & 0o777) == "0o600"
    state = ConfigState()
    client = ConfigClient(f"127.0.0.1:{controller.grpc_port}", "node-1", token, state,
                          component="agent", min_backoff=0.05, max_backoff=0.3,
                          ca_bundle=layout.ca_dir / "root-cert.pem")   # --tls
    task = asyncio.ensure_future(client.run())
    try:
        await until(lambda: state.workload_by_ip("10.244.1.2") is not None)
        workload = state.workload("demo/web-0")
        assert workload.meshed and workload.identity >= 256
        status = api.status()
        await until(lambda: [a["version"] for a in api.status()["agents"]] == [api.status()["version"]])
        status = api.status()
        assert status["agents"][0]["node"] == "node-1" and status["ready"]
        assert "resourceVersion" in status
        with urllib.request.urlopen(f"http://127.0.0.1:{controller.admin_port}/metrics") as r:
            metrics = r.read().decode()
        assert 'pilot_xds{component="agent"} 1.0' in metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{controller.admin_port}/ready") as r:
            assert r.status == 200

        # Controller down: the node keeps its config.
        controller.stop()
        await until(lambda: not client.connected)
        assert state.workload_by_ip("10.244.1.2").identity == workload.identity
        # Back up (same store, CA, identities): a change applied now reaches the node.
        version_before = int(status["version"])
        api = controller.start()
        assert int(api.status()["version"]) >= version_before   # versions keep growing
        api.apply([pod("web-1", "10.244.1.3")])
        await until(lambda: state.workload_by_ip("10.244.1.3") is not None)
        assert state.workload("demo/web-1").identity == workload.identity
        # The certificate TTL flag is honoured; identities on the node only.
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        spiffe = "spiffe://cluster.local/ns/demo/sa/web"
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                              critical=True)
               .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))
        chain, roots = await client.sign_certificate(csr.public_bytes(serialization.Encoding.PEM))
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        hours = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() / 3600
        assert 2 <= hours <= 2.1
        assert roots == (layout.ca_dir / "root-cert.pem").read_text()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_controller_process_kubernetes_mode_with_token_review(tmp_path):
    """`--source kubernetes` against the fake API server: list/watch feeds the stream and
    nodes authenticate with ServiceAccount tokens through TokenReview."""
    from .fake_apiserver import FakeApiServer
    from .objects import namespace, pod

    server = await FakeApiServer().start()
    server.put(namespace("demo"))
    server.put(pod("demo", "web-0", node="node-7", ip="10.244.7.2", sa="web"))
    server.tokens["agent-7"] = {"username": "system:serviceaccount:shoal-system:shoal-agent",
                                "extra": {"authentication.kubernetes.io/node-name": ["node-7"]}}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: controller, user: {{token: controller-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: controller}}}}]
current-context: fake
""")
    grpc_port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.controller", "--source", "kubernetes",
         "--kubeconfig", str(kubeconfig), "--state-dir", str(tmp_path / "state"),
         "--grpc-address", f"127.0.0.1:{grpc_port}", "--admin-address", f"127.0.0.1:{admin_port}",
         "--relay-address", ""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = ConfigState()
    client = ConfigClient(f"127.0.0.1:{grpc_port}", "node-7", "agent-7", state,
                          component="agent", min_backoff=0.05, max_backoff=0.3)
    # The same token claiming another node is refused: the node comes from the token.
    liar = ConfigClient(f"127.0.0.1:{grpc_port}", "node-1", "agent-7", ConfigState(),
                        component="agent", min_backoff=0.05, max_backoff=0.3)
    task = asyncio.ensure_future(client.run())
    liar_task = asyncio.ensure_future(liar.run())
    try:
        await until(lambda: state.workload("demo/web-0") is not None)
        server.put(pod("demo", "web-1", node="node-7", ip="10.244.7.3", sa="web"))
        await until(lambda: state.workload_by_ip("10.244.7.3") is not None)

        def ready():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status") as r:
                    import json
                    return json.loads(r.read())
            except OSError:
                return None
        status = ready()
        assert [a["node"] for a in status["agents"]] == ["node-7"] and status["ready"]
        assert liar.reconnects >= 1 and not liar.synced.is_set()
        # Its state lives in the API: the CA Secret, the trust bundle, the identity table.
        secret = server.stored[("secrets", "shoal-system", "shoal-ca")]
        assert {"ca-cert.pem", "ca-key.pem", "root-cert.pem"} <= set(secret["data"])
        roots = server.stored[("configmaps", "shoal-system", "shoal-ca-root")]["data"]["root-cert.pem"]
        identities = server.stored[("configmaps", "shoal-system", "shoal-identities")]["data"]
        assert identities == {"demo.web": str(state.workload("demo/web-0").identity)}
        # Another controller (new pod, empty disk) keeps the root and the numbers.
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        shutil.rmtree(tmp_path / "state")
        server.tokens["agent-7"]["extra"] = {"authentication.kubernetes.io/node-name": ["node-7"]}
        proc = subprocess.Popen(proc.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server.put(pod("demo", "db-0", node="node-7", ip="10.244.7.4", sa="db"))
        await until(lambda: state.workload_by_ip("10.244.7.4") is not None, timeout=30)
        assert state.workload("demo/web-0").identity == int(identities["demo.web"])
        assert server.stored[("configmaps", "shoal-system", "shoal-ca-root")]["data"]["root-cert.pem"] == roots
        new_ids = server.stored[("configmaps", "shoal-system", "shoal-identities")]["data"]
        assert new_ids["demo.web"] == identities["demo.web"] and "demo.db" in new_ids
        assert state.workload("demo/db-0").identity == int(new_ids["demo.db"])
    finally:
        task.cancel()
        liar_task.cancel()
        await asyncio.gather(task, liar_task, return_exceptions=True)
        await client.close()
        await liar.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await server.stop()

"""Suite-wide fixtures and markers.

``demo_cluster`` is one real local cluster (2 nodes, the demo deployed, every component
running) shared by all cluster-level tests of the session: bringing one up costs seconds
of CPU on this 2-core machine. Tests that change it (labels, policies) undo their change.

``SHOAL_TEST_CONTAINERS=1`` brings that cluster up as ``shoal up --containers`` does: the
controller, every agent and proxy, and the waypoints as podman containers of the rendered
manifests (it needs the images of `make images`, and fails saying so without them).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Callable

import pytest

from shoal.config import ClusterLayout

ENV_CONTAINERS = "SHOAL_TEST_CONTAINERS"


@dataclasses.dataclass(frozen=True)
class CompiledModule:
    """A module of pyproject's [tool.shoal] compiled: its source, where it sits as installed
    (``waypoint/h1.py`` is ``shoal/waypoint/h1.py``), and the extensions built beside it."""
    source: Path
    installed: Path
    built: list[Path]

    @property
    def name(self) -> str:
        return ".".join(self.installed.with_suffix("").parts)


def compiled_modules() -> list[CompiledModule]:
    repo = Path(__file__).resolve().parents[1]
    modules = []
    for relative in map(Path, tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["shoal"]["compiled"]):
        source = repo / relative
        installed = relative if relative.parts[0] == "shoal" else Path("shoal", relative)
        modules.append(CompiledModule(source, installed, sorted(source.parent.glob(f"{source.stem}.cpython-*.so"))))
    return modules


def pytest_sessionstart(session):
    """An extension built from other source than the file beside it would run old code in the
    tests' place. setup.py compiles copies staged in build/mypyc-src (laid out as installed),
    so the copy is what the extension was built from."""
    stage = Path(__file__).resolve().parents[1] / "build/mypyc-src"
    stale = [str(m.installed) for m in compiled_modules()
             if m.built and (not (stage / m.installed).exists()
                             or (stage / m.installed).read_bytes() != m.source.read_bytes())]
    if stale:
        pytest.exit(f"compiled modules built from other source than theirs: {', '.join(stale)}; "
                    "`make install` (or `bash scripts/install.sh`) rebuilds them", returncode=3)


def pytest_report_header(config):
    built = sum(1 for m in compiled_modules() if m.built)
    return f"shoal: {built} of {len(compiled_modules())} hot-path modules compiled (mypyc)"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces, cgroups and eBPF")
    for item in items:
        if "root" in item.keywords or "cluster" in item.keywords:
            item.add_marker(skip)


def shoal_cli(layout: ClusterLayout, *args: str, check: bool = True, timeout: float = 120,
              input: str | None = None) -> subprocess.CompletedProcess:
    """Runs the real `shoal` command against ``layout``'s cluster."""
    env = {**os.environ, "SHOAL_CLUSTER": layout.name}
    proc = subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"shoal {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


async def until(condition: Callable[[], object], what: str | Callable[[], object] = "the condition",
                timeout: float = 30.0, interval: float = 0.02):
    """Polls ``condition`` from a coroutine until it returns something truthy (returned), or
    fails after ``timeout`` seconds naming ``what`` (a callable is asked at that moment: the
    state it describes). What a test awaits instead of a fixed sleep: on a loaded machine the
    next step of the code under test comes later than any sleep short enough to keep the
    suite fast."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval)
    return value


def eventually(check, what: str, timeout: float = 30.0, interval: float = 0.2):
    """Polls ``check`` until it returns something truthy (returned), or fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def strict_web_manifest(namespace: str, pod: str, node: str | None = None) -> str:
    """A meshed namespace under STRICT mTLS with one demo web server pod (port 8080, Service
    ``server``): a plaintext connection that reaches it is refused, a captured one answers."""
    placement = f"\n  nodeName: {node}" if node else ""
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {namespace}, labels: {{shoal.io/mesh: enabled}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: server, namespace: {namespace}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: {namespace}}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {namespace}, labels: {{app: server}}}}
spec:{placement}
  serviceAccountName: server
  containers:
    - name: web
      command: [python3, -m, shoal.local.demo.apps, web, --port, "8080"]
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {namespace}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
"""


def pod_ip(layout: ClusterLayout, target: str) -> str:
    """The IP of pod ``target`` ('namespace/name'), as `shoal get pods` reports it."""
    namespace, name = target.split("/")
    listing = json.loads(shoal_cli(layout, "get", "pods", "-n", namespace, "-o", "json").stdout)
    return next(p["status"]["podIP"] for p in listing["items"] if p["metadata"]["name"] == name)


def pod_exec(layout: ClusterLayout, target: str, *argv: str, timeout: float = 30,
             check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """`shoal exec` (the pod's uid and filesystem: host files reach it on ``input``, as with kubectl)."""
    return shoal_cli(layout, "exec", target, "--", *argv, timeout=timeout, check=check, input=input)


@contextlib.contextmanager
def running_demo_cluster(name: str, **options):
    """A 2-node local cluster named ``name`` with the demo (``options``: LocalCluster's),
    removed at the end, also when the block fails. ``SHOAL_KEEP_LOGS=<folder>`` copies its
    logs there first (diagnosing a cluster test)."""
    from shoal.local.cluster import LocalCluster
    from shoal.local.demo import deploy_demo

    layout = ClusterLayout(name=name)
    cluster = LocalCluster(layout, **options)
    try:
        cluster.up(2)
        deploy_demo(cluster, echo=lambda _: None, settle=20)
        yield cluster
    finally:
        if os.environ.get("SHOAL_KEEP_LOGS"):
            shutil.copytree(layout.log_dir, os.environ["SHOAL_KEEP_LOGS"], dirs_exist_ok=True)
        cluster.down()
        assert not cluster.leftovers(), cluster.leftovers()
        if options.get("node_manifests") is not None:
            from shoal.local import podman
            assert podman.cluster_containers(name) == [], "containers left behind"


def containers_missing() -> str | None:
    """Why ``shoal up --containers`` cannot run here (podman or the images), or None."""
    from shoal.cli.deploy.render import RenderOptions
    from shoal.local import podman

    image = RenderOptions().image("shoal-agent")
    return podman.available() or (None if podman.image_exists(image) else
                                  f"image {image} is not built: `make images` takes minutes, "
                                  "more than the suite may spend, so make test does not build it")


def container_manifests(layout: ClusterLayout):
    """What `shoal up --containers` renders: `shoal install --render` for this local cluster."""
    from shoal.cli.main import local_manifests

    return local_manifests(layout)


@pytest.fixture(scope="session")
def demo_cluster():
    """A 2-node local cluster with the demo, shared by the session; removed at the end.
    In containers mode (``SHOAL_TEST_CONTAINERS=1``) with every component in podman."""
    name = f"shoal-test-{os.getpid()}"
    options = {}
    if os.environ.get(ENV_CONTAINERS) == "1":
        missing = containers_missing()
        if missing:
            pytest.fail(f"{ENV_CONTAINERS}=1 asks for containers: {missing}")
        options["node_manifests"] = container_manifests(ClusterLayout(name=name))
    with running_demo_cluster(name, **options) as cluster:
        yield cluster


@pytest.fixture
def sockdir():
    """A private folder for the Unix sockets of one test (flows, Hubble, relay)."""
    path = Path(tempfile.mkdtemp(prefix="shoal-obs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)

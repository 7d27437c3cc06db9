"""``shoal up`` and ``shoal down``: a multi-node cluster on this one machine.

Nodes and pods are network namespaces, every process lives in a cgroup below the
cluster's own cgroup, and the real controller, agents and node proxies run as long-lived
processes. Nothing touches the root network namespace or the root cgroup.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from shoal.config import ENV_CLUSTER, ClusterLayout
from shoal.credentials import NodeCredentials
from shoal.hubbletls import HubbleCertificates
from shoal.local import network
from shoal.local.apiclient import ApiClient
from shoal.local.linux import Cgroup, LinuxError, Netns
from shoal.local.topology import Topology
from shoal.memdebug import TRACE_ENV

if TYPE_CHECKING:
    from shoal.local.nodepods import RenderManifests

Progress = Callable[[str], None]
# An agent container compiles its programs before it serves (the DaemonSet allows 300 s).
AGENT_START_TIMEOUT = 240.0
# The components' monitors (shoal/local/runner.py), beside the nodes, never in a component's.
RUNNERS_CGROUP = "runners"


class PreflightError(RuntimeError):
    """The machine cannot run a local cluster; the message says what is missing."""


@dataclass(frozen=True)
class Component:
    """A long-running process of the cluster: which module, where, and its log name."""

    name: str            # log and pid file name: controller, agent-node-1, proxy-node-1
    module: str          # python -m <module>
    netns: str
    cgroup: Path
    args: tuple[str, ...] = ()


def preflight(layout: ClusterLayout) -> None:
    problems = []
    if os.geteuid() != 0:
        raise PreflightError("shoal up must run as root: it creates network namespaces, cgroups and eBPF programs")
    if shutil.which("ip") is None:
        problems.append("the `ip` command (iproute2) is missing: apt-get install iproute2")
    if not _is_mounted(layout.cgroup_root, "cgroup2"):
        problems.append(f"no cgroup v2 hierarchy at {layout.cgroup_root}")
    if not _is_mounted(layout.bpffs_root, "bpf"):
        problems.append(f"bpffs is not mounted on {layout.bpffs_root}: mount -t bpf bpf {layout.bpffs_root}")
    kernel = os.uname().release
    if not Path(f"/lib/modules/{kernel}/build").exists():
        problems.append(f"no kernel headers at /lib/modules/{kernel}/build (bcc needs them): run scripts/install.sh")
    config = _kernel_config()
    for option in ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF", "CONFIG_NET_CLS_ACT", "CONFIG_VETH", "CONFIG_BRIDGE"):
        if config and config.get(option) not in ("y", "m"):
            problems.append(f"the kernel lacks {option}")
    if problems:
        raise PreflightError("cannot bring up a local cluster:\n  - " + "\n  - ".join(problems))


def _is_mounted(path: Path, fstype: str) -> bool:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[1] == str(path) and fields[2] == fstype:
            return True
    return False


def _kernel_config() -> dict[str, str]:
    for candidate in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        if candidate.exists():
            if candidate.suffix == ".gz":
                import gzip
                text = gzip.decompress(candidate.read_bytes()).decode()
            else:
                text = candidate.read_text()
            return dict(line.split("=", 1) for line in text.splitlines() if line.startswith("CONFIG_") and "=" in line)
    return {}


class LocalCluster:
    def __init__(self, layout: ClusterLayout, progress: Progress = lambda _: None,
                 node_manifests: "RenderManifests | None" = None, proxy_workers: int = 1):
        """proxy_workers: worker processes per node proxy (0: one per core). Every node of
        the local cluster runs on this machine's cores, so one worker each is the default."""
        self.layout = layout
        self.proxy_workers = proxy_workers
        self.progress = progress
        # With the DaemonSet rendered for this cluster: node components run as podman
        # containers from the images, under exactly its privileges (shoal/local/nodepods.py).
        self.node_manifests = node_manifests
        self.topology = Topology(layout)
        self.api = ApiClient(layout.api_socket)

    # -- state -------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        found = [f"netns {n.name}" for n in Netns.list(self.layout.netns_prefix)]
        if self.layout.cgroup.exists():
            found.append(f"cgroup {self.layout.cgroup}")
        if self.layout.run_dir.exists():
            found.append(f"run dir {self.layout.run_dir}")
        if (self.layout.bpffs_root / self.layout.name).exists():
            found.append(f"bpf pins {self.layout.bpffs_root / self.layout.name}")
        return found

    def nodes(self) -> list[str]:
        return sorted((n.name.split(".", 1)[1] for n in Netns.list(self.layout.netns_prefix)
                       if n.name.count(".") == 1 and n.name.split(".", 1)[1].startswith("node-")),
                      key=ClusterLayout.node_index)

    # -- up ----------------------------------------------------------------------------

    def up(self, nodes: int, components: Iterable[str] | None = None) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"--nodes must be between 1 and 200, got {nodes}")
        preflight(self.layout)
        if self.node_manifests is not None:
            from shoal.local import podman
            missing = podman.available()
            if missing:
                raise PreflightError(f"--containers: {missing}")
        leftovers = self.leftovers()
        if leftovers:
            self.progress(f"cleaning leftovers of cluster {self.layout.name!r}: {', '.join(leftovers[:4])}"
                          + (" ..." if len(leftovers) > 4 else ""))
            self.down()
        node_names = [f"node-{i}" for i in range(1, nodes + 1)]
        wanted = set(components) if components is not None else self.available_components()
        try:
            self._up(node_names, wanted)
        except BaseException:
            self.progress("bring-up failed; removing what was made")
            self.down()
            raise

    @staticmethod
    def available_components() -> set[str]:
        """The node components whose code is present (the agent, the node proxy)."""
        found = set()
        for name, module in (("agent", "shoal.agent.__main__"), ("proxy", "shoal.agent.ztunnel.__main__")):
            try:
                if importlib.util.find_spec(module) is not None:
                    found.add(name)
            except ModuleNotFoundError:
                continue
        return found

    def _up(self, node_names: list[str], components: set[str]) -> None:
        layout = self.layout
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        layout.log_dir.mkdir(parents=True, exist_ok=True)
        # One key for the cluster (the controller's); each node gets a credential naming it,
        # written only into its own state directory (shoal/credentials.py).
        layout.credential_key_path.unlink(missing_ok=True)
        credentials = NodeCredentials.load_or_create(layout.credential_key_path)
        # The flow APIs' mTLS material (4244 on each agent, the relay's 4245), before anyone starts.
        HubbleCertificates(layout.hubble_tls_dir).ensure(
            layout.name, {node: network.node_ip(node) for node in node_names}, [network.CONTROLLER_IP])
        self.progress(f"fabric: netns {layout.control_netns}, bridge fabric0 {network.CONTROLLER_IP}")
        self.topology.build_control()
        Cgroup(layout.cgroup / "control").create()
        for node in node_names:
            self.progress(f"node {node}: netns {layout.node_netns(node)}, {network.node_ip(node)}, "
                          f"pods {network.pod_cidr(node)}")
            self.topology.build_node(node, node_names)
            for part in ("pods", "system"):
                Cgroup(layout.node_cgroup(node) / part).create()
            layout.node_dir(node).mkdir(parents=True, exist_ok=True, mode=0o700)
            credentials.issue_file(node, layout.node_credential_path(node))
        if self.node_manifests is not None:
            self._up_in_containers(self.node_manifests, node_names, components)
            return
        self.progress("controller: starting")
        self.start(self.controller_component())
        self._wait(self.api.healthy, 30, "the controller did not become ready (see `shoal logs controller`)")
        self.api.apply([self._node_object(n) for n in node_names])
        for node in node_names:
            for component in self.node_components(node):
                if component.name.split("-")[0] in components:
                    self.progress(f"{component.name}: starting")
                    self.start(component)

    def _up_in_containers(self, render: "RenderManifests", node_names: list[str], components: set[str]) -> None:
        """The controller and every node's agent and proxy as the rendered manifests'
        containers; the kubelet and the waypoint launcher as a host process beside them."""
        from shoal.local.nodepods import NodeContainers
        pods = NodeContainers(self.layout, render)
        pods.prepare_images(self.progress)
        self.progress(f"controller: starting container {pods.controller_image}")
        pods.start_controller()
        self._wait(self.api.healthy, 60, "the controller did not become ready (see `shoal logs controller`)")
        # Waypoints run from the rendered template, as the controller instantiates it on Kubernetes.
        from shoal.local.waypoints import template_path
        template_path(self.layout).write_text(pods.waypoint_template)
        self.progress("kubelet: starting (host process)")
        self.start(self.kubelet_component())
        self.api.apply([self._node_object(n) for n in node_names])
        for node in node_names:
            for container in ("agent", "proxy"):
                if container in components:
                    self.progress(f"{container}-{node}: starting container {pods.image}")
                    pods.start(node, container)
        if "agent" in components:
            # As a DaemonSet's startupProbe: bcc compiles first, which takes long on a busy machine.
            for node in node_names:
                self._wait(self.layout.hubble_socket(node).exists, AGENT_START_TIMEOUT,
                           f"the agent of {node} did not start (see `shoal logs agent --node {node}`)")

    def replace_proxy(self, node: str, image_tag: str | None = None) -> str:
        """``--containers``: replaces ``node``'s proxy container, refusing no connection
        (``NodeContainers.replace_proxy``); returns the new container's ID."""
        from shoal.local import podman
        from shoal.local.nodepods import NodeContainers
        if self.node_manifests is None:
            raise ValueError("replacing a proxy container needs the rendered manifests (a --containers cluster)")
        pods = NodeContainers(self.layout, self.node_manifests)
        if not podman.exists(pods.container_name(node, "proxy")):
            raise podman.PodmanError(f"no proxy container on {node} of cluster {self.layout.name!r} "
                                     "(is it a `shoal up --containers` cluster?)")
        pods.prepare_images(self.progress)
        return pods.replace_proxy(node, image_tag)

    def kubelet_component(self) -> Component:
        """The local kubelet and waypoint launcher alone (the controller runs in a container);
        pods whose containers name an image (the waypoints) run as podman containers."""
        return Component("kubelet", "shoal.local.controller", self.layout.control_netns,
                         self.layout.cgroup / "control", ("node-side", "--cluster", self.layout.name, "--containers"))

    def _node_object(self, node: str) -> dict:
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
                "spec": {"podCIDR": network.pod_cidr(node)},
                "status": {"addresses": [{"type": "InternalIP", "address": network.node_ip(node)}]}}

    def controller_component(self) -> Component:
        return Component("controller", "shoal.local.controller", self.layout.control_netns,
                         self.layout.cgroup / "control",
                         ("--cluster", self.layout.name, "--grpc-address", network.CONTROLLER_ADDRESS,
                          "--tls"))

    def node_components(self, node: str) -> list[Component]:
        layout = self.layout
        return [
            Component(f"agent-{node}", "shoal.agent", layout.node_netns(node),
                      layout.system_cgroup(node, "agent"), ("--node", node)),
            Component(f"proxy-{node}", "shoal.agent.ztunnel", layout.node_netns(node),
                      layout.system_cgroup(node, "proxy"), ("--node", node, "--workers", str(self.proxy_workers))),
        ]

    def component_env(self, node: str | None = None) -> dict[str, str]:
        # The caller's SHOAL_* settings are not the components' (a test's cluster name is not
        # the one it starts), except memory tracing, asked for at ``shoal up`` (shoal.memdebug).
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_") or k == TRACE_ENV}
        env.update({
            ENV_CLUSTER: self.layout.name,
            "SHOAL_CONTROLLER": network.CONTROLLER_ADDRESS,
            # The config stream and the CA are served over TLS from the workload CA's root.
            "SHOAL_CA_BUNDLE": str(self.layout.ca_bundle_path),
            "PYTHONUNBUFFERED": "1",
        })
        if node:
            env["SHOAL_NODE"] = node
            env["SHOAL_TOKEN_FILE"] = str(self.layout.node_credential_path(node))
        return env

    def start(self, component: Component) -> int:
        """Starts a component in its netns and cgroup, detached, logging to a file, under a
        monitor (``shoal.local.runner``, in the cluster's ``runners`` cgroup) that appends
        how it ended to that log. The component's pid (also in its pid file)."""
        cgroup = Cgroup(component.cgroup).create()
        argv = cgroup.join_argv(Netns(component.netns).enter_argv(
            [sys.executable, "-m", component.module, *component.args]))
        node = component.name.split("-", 1)[1] if "-" in component.name else None
        log_path = self.layout.log_dir / f"{component.name}.log"
        runners = Cgroup(self.layout.cgroup / RUNNERS_CGROUP).create()
        monitor = runners.join_argv([sys.executable, "-m", "shoal.local.runner", component.name, str(log_path),
                                     "--", *argv])
        with open(log_path, "ab") as log:   # the monitor's own errors, if any
            proc = subprocess.Popen(monitor, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                    env=self.component_env(node), start_new_session=True, cwd="/")
        assert proc.stdout is not None
        with proc.stdout:
            reported = proc.stdout.readline().strip()
        if not reported.isdigit():
            raise LinuxError(f"{component.name} did not start (its monitor exited {proc.wait()}); see {log_path}")
        pid = int(reported)
        (self.layout.run_dir / f"{component.name}.pid").write_text(str(pid))
        return pid

    def stop(self, component: Component, kill: bool = False) -> None:
        Cgroup(component.cgroup).kill_all(grace=0.0 if kill else 5.0)

    def container_of(self, component: Component) -> str | None:
        """The podman container that runs ``component`` in a ``--containers`` cluster, else None."""
        from shoal.local.nodepods import container_name

        if self.node_manifests is None:
            return None
        if component.name == "controller":
            return container_name(self.layout, "control", "controller")
        kind, _, node = component.name.partition("-")
        return container_name(self.layout, node, kind)

    def crash(self, component: Component) -> None:
        """SIGKILLs ``component``: its process (and anything left in its cgroup), or its
        container in a ``--containers`` cluster. ``recover`` brings it back."""
        from shoal.local import podman

        container = self.container_of(component)
        if container is not None:
            podman.kill(container)
            if not podman.wait_stopped(container, 30):
                raise LinuxError(f"container {container} still runs after SIGKILL")
            return
        pid_file = self.layout.run_dir / f"{component.name}.pid"
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.stop(component, kill=True)

    def recover(self, component: Component) -> None:
        """Starts ``component`` again after ``crash``: a new process, or in a ``--containers``
        cluster the same container again (``podman start``), as the kubelet restarts a
        container that exited: same name, flags, mounts and pod."""
        from shoal.local import podman

        container = self.container_of(component)
        if container is None:
            self.start(component)
        else:
            podman.start(container)

    @staticmethod
    def _wait(ready: Callable[[], bool], timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.1)
        raise LinuxError(message)

    def wait_pods_running(self, timeout: float = 60.0) -> list[dict]:
        def running() -> bool:
            pods = self.api.list("Pod")
            return all(p.get("status", {}).get("phase") == "Running" for p in pods)
        self._wait(running, timeout, "pods did not reach Running (see `shoal get pods` and `shoal logs`)")
        return self.api.list("Pod")

    # -- down --------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Removes every process, namespace, cgroup, pin and file of this cluster; idempotent."""
        removed = []
        layout = self.layout
        # The controller and kubelet first, so that the kubelet restarts no pod (process or
        # container) we are stopping; then the containers; then every other process.
        removed += self._kill(Cgroup(layout.cgroup / "control"))
        removed += self._remove_containers()
        removed += self._kill(Cgroup(layout.cgroup))
        for node in self.nodes():
            self._uninstall_node_datapath(node)
        pins = layout.bpffs_root / layout.name
        if pins.exists():
            shutil.rmtree(pins)  # unlinking a pin drops our reference to the program or map
            removed.append(f"bpf pins {pins}")
        for netns in Netns.list(layout.netns_prefix):
            netns.delete()
            removed.append(f"netns {netns.name}")
        if layout.cgroup.exists():
            Cgroup(layout.cgroup).remove()
            removed.append(f"cgroup {layout.cgroup}")
        if layout.run_dir.exists():
            shutil.rmtree(layout.run_dir)
        return removed

    @staticmethod
    def _kill(cgroup: Cgroup) -> list[str]:
        if not cgroup.exists() or not cgroup.pids():
            return []
        found = f"{len(cgroup.pids())} processes in {cgroup.path}"
        cgroup.kill_all()
        return [found]

    def _remove_containers(self) -> list[str]:
        """Every podman container labelled with this cluster (``shoal up --containers``)."""
        from shoal.local import podman
        if podman.available() is not None:
            return []
        layout = self.layout
        found = podman.cluster_containers(layout.name)
        podman.remove(found)
        podman.remove_v1_mirrors(layout.cgroup_root, str(layout.cgroup.relative_to(layout.cgroup_root)))
        return [f"container {c[:12]}" for c in found]

    def _uninstall_node_datapath(self, node: str) -> None:
        try:
            from shoal.agent.uninstall import remove_node
        except ImportError:
            return
        remove_node(self.layout, node)

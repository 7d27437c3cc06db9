"""A local cluster's node pods as podman containers (``shoal up --containers``).

Each node runs the agent DaemonSet's pod: the ``agent`` and ``proxy`` containers of
``shoal install --render --local-cluster NAME``, with exactly their capabilities,
read-only root, user, hostPath mounts, env and command (``containers.py``). The render
option only moves the host paths to this cluster's (its run dir, its cgroup, its named
pod namespaces); everything else is what a Kubernetes node gets.

What the kubelet would supply is staged here, per node, outside the node's run dir:
the projected token (the node's own credential), the CA ConfigMap (the root only, never
the key) and the Hubble Secret (the Hubble CA and this node's server pair, never the CA
key). The pod shares the node's network namespace (``hostNetwork``); the cluster's DNS
name of the controller Service is given as a host entry.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from shoal.config import LOCAL_CONTROLLER_IP, ClusterLayout
from shoal.credentials import write_secret_file
from shoal.local import podman
from shoal.local.containers import PODMAN_GLOBAL, ContainerRun, container_run, pod_container_run, ulimits

DAEMONSET = "shoal-agent"
WAYPOINT_TEMPLATE = "shoal-waypoint-template"
CONTROLLER = "shoal-controller"
CONTROLLER_SERVICE = "shoal-controller.shoal-system.svc"
CONTROLLER_REPLICAS = "shoal-controller-replicas.shoal-system.svc"   # what nodes dial
# The sandbox's process, as Kubernetes' pause: holds the pod's PID namespace and reaps
# the orphans that land on it (PID 1), nothing else.
PAUSE = ("import os, signal\n"
         "signal.signal(signal.SIGTERM, lambda *_: os._exit(0))\n"
         "signal.signal(signal.SIGCHLD, lambda *_: None)\n"
         "while True:\n"
         "    signal.pause()\n"
         "    try:\n"
         "        while os.waitpid(-1, os.WNOHANG)[0]:\n"
         "            pass\n"
         "    except ChildProcessError:\n"
         "        pass\n")


LABEL_POD = "shoal.io/pod"   # <namespace>.<name> of a workload pod's containers


def container_name(layout: ClusterLayout, node: str, container: str) -> str:
    """A node pod's container (``node`` is "control" for the controller's)."""
    return f"{layout.name}.{node}.{container}"


def controller_hosts() -> dict[str, str]:
    """The controller's Service names, as the cluster's DNS would resolve them for a pod."""
    return {CONTROLLER_SERVICE: LOCAL_CONTROLLER_IP, CONTROLLER_REPLICAS: LOCAL_CONTROLLER_IP}


def logged(argv: list[str], path: Path) -> list[str]:
    """``podman run`` argv whose output goes to ``path``, where `shoal logs` reads a process's."""
    at = argv.index("--detach") + 1
    return [*argv[:at], "--log-driver", "k8s-file", "--log-opt", f"path={path}", *argv[at:]]


# ``shoal install --render --local-cluster NAME [--image-tag TAG]``: the caller renders
# (the CLI owns the manifests); None keeps the rendered default tag.
RenderManifests = Callable[[str | None], list[dict[str, Any]]]


class NodeContainers:
    def __init__(self, layout: ClusterLayout, render: RenderManifests):
        self.layout = layout
        self.render = render
        self.objects = render(None)

    @property
    def image(self) -> str:
        template = next(o for o in self.objects if o.get("kind") == "DaemonSet"
                        and o["metadata"]["name"] == DAEMONSET)["spec"]["template"]
        return template["spec"]["containers"][0]["image"]

    def prepare_images(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Runs this checkout's code: the built image plus a layer of the current sources."""
        root = podman.source_root()
        if root is None:
            if not podman.image_exists(self.image):
                raise podman.PodmanError(f"image {self.image} is not built: run `make images`")
            return
        progress(f"images: {self.image}, {self.controller_image} and {self.waypoint_image} "
                 "with this checkout's sources")
        sources = podman.snapshot_sources(root)   # read once: one tag, and the bytes it names
        tagged = podman.source_image(self.image, sources)
        for image in (self.controller_image, self.waypoint_image):
            podman.source_image(image, sources)
        self.objects = self.render(tagged.rsplit(":", 1)[1])

    @property
    def waypoint_template(self) -> str:
        """The rendered waypoint template (ConfigMap ``shoal-waypoint-template``), as YAML."""
        return next(o for o in self.objects if o.get("kind") == "ConfigMap"
                    and o["metadata"]["name"] == WAYPOINT_TEMPLATE)["data"]["template.yaml"]

    @property
    def waypoint_image(self) -> str:
        found = re.search(r"^\s*image:\s*(\S+)", self.waypoint_template, re.MULTILINE)
        if found is None:
            raise podman.PodmanError(f"the rendered {WAYPOINT_TEMPLATE} names no image")
        return found.group(1)

    @property
    def controller_image(self) -> str:
        return self._template("Deployment", CONTROLLER)["spec"]["containers"][0]["image"]

    def _template(self, kind: str, name: str) -> dict[str, Any]:
        return next(o for o in self.objects if o.get("kind") == kind
                    and o["metadata"]["name"] == name)["spec"]["template"]

    def start_controller(self) -> str:
        """The controller Deployment's container, in the control namespace. Its user (1337)
        owns the cluster's run dir, where it keeps the store, the CA and the identities;
        the Hubble CA's key stays root's."""
        layout = self.layout
        run = container_run(self.objects, "Deployment", CONTROLLER, "controller", "control",
                            {"shoal-hubble-tls": str(layout.hubble_tls_dir)})
        uid, gid = (int(part) for part in (run.user or "0:0").split(":"))
        for path in (layout.run_dir, layout.credential_key_path, layout.hubble_tls_dir,
                     *(p for p in layout.hubble_tls_dir.iterdir() if p.name != "ca-key.pem")):
            os.chown(path, uid, gid)
        argv = run.argv(self.container_name("control", "controller"), f"ns:/run/netns/{layout.control_netns}",
                        labels=self.labels("control"))
        return podman.run(self._logged(argv, "controller"))

    def _logged(self, argv: list[str], name: str) -> list[str]:
        return logged(argv, self.layout.log_dir / f"{name}.log")

    def container_name(self, node: str, container: str) -> str:
        return container_name(self.layout, node, container)

    def run_of(self, node: str, container: str) -> ContainerRun:
        return container_run(self.objects, "DaemonSet", DAEMONSET, container, node, self.volumes(node))

    def volumes(self, node: str) -> dict[str, str]:
        base = self.layout.run_dir / "volumes"
        return {"shoal-token": str(base / node / "tokens"), "shoal-ca": str(base / "ca"),
                "shoal-hubble-tls": str(base / node / "hubble-tls")}

    def stage(self, node: str) -> None:
        """The kubelet's part: per-volume folders, and the subPathExpr folders it would create."""
        layout, volumes = self.layout, self.volumes(node)
        write_secret_file(Path(volumes["shoal-token"]) / "shoal-token",
                          layout.node_credential_path(node).read_text())
        ca = Path(volumes["shoal-ca"])
        ca.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout.ca_bundle_path, ca / "root-cert.pem")
        hubble = Path(volumes["shoal-hubble-tls"])
        hubble.mkdir(parents=True, exist_ok=True, mode=0o700)
        for source in layout.hubble_tls_dir.iterdir():
            if source.name == "ca.pem" or source.name.startswith(f"server-{node}"):
                shutil.copy2(source, hubble / source.name)
        layout.node_dir(node).mkdir(parents=True, exist_ok=True, mode=0o700)

    def labels(self, node: str) -> dict[str, str]:
        return {podman.LABEL_CLUSTER: self.layout.name, "shoal.io/node": node}

    def network(self, node: str) -> str:
        """hostNetwork: the node's namespace."""
        return f"ns:/run/netns/{self.layout.node_netns(node)}"

    def start_sandbox(self, node: str) -> str:
        """The pod sandbox (the pause container): owns the PID namespace the containers share."""
        name = self.container_name(node, "sandbox")
        labels = [flag for key, value in self.labels(node).items() for flag in ("--label", f"{key}={value}")]
        podman.run(["podman", *PODMAN_GLOBAL, "run", "--detach", "--pull=never", "--name", name,
                    "--network", self.network(node), *ulimits(), *labels, "--cap-drop", "ALL",
                    "--read-only", "--security-opt", "no-new-privileges", "--user", "65535:65535",
                    self.image, "python", "-c", PAUSE])
        return name

    def start(self, node: str, container: str, run: ContainerRun | None = None,
              name: str | None = None) -> str:
        self.stage(node)
        name = name or self.container_name(node, container)
        run = run or self.run_of(node, container)
        sandbox = self.container_name(node, "sandbox")
        if run.share_process_namespace and not podman.exists(sandbox):
            self.start_sandbox(node)
        argv = run.argv(name, self.network(node), labels=self.labels(node),
                        hosts=controller_hosts(), sandbox=sandbox)
        return podman.run(self._logged(argv, f"{container}-{node}"))

    def termination_grace(self) -> float:
        """The DaemonSet's terminationGracePeriodSeconds: how long a stopping container
        may take before it is killed, as the kubelet allows."""
        return float(self._template("DaemonSet", DAEMONSET)["spec"].get("terminationGracePeriodSeconds", 30))

    def replace_proxy(self, node: str, image_tag: str | None = None) -> str:
        """Replaces ``node``'s proxy container (a restart, or ``image_tag``'s image as an
        upgrade renders it) without refusing a connection; returns the new container's ID.

        The successor starts beside the old container in the same pod (its PID namespace,
        the node directory): the proxy's restart handover (agent/ztunnel/handover.py) has
        it take over the ZDS socket and open its in-pod listeners with SO_REUSEPORT, and
        only once it serves every pod does the old proxy stop accepting and drain its live
        connections (``--drain-grace`` in the manifest). The old container is waited for
        up to the pod's terminationGracePeriodSeconds, killed after it as the kubelet
        would, and removed; the successor takes its name. The old container's log is kept
        as ``proxy-<node>.previous.log`` (``kubectl logs --previous``)."""
        objects = self.render(image_tag) if image_tag else self.objects
        run = container_run(objects, "DaemonSet", DAEMONSET, "proxy", node, self.volumes(node))
        current = self.container_name(node, "proxy")
        successor = f"{current}.next"
        log = self.layout.log_dir / f"proxy-{node}.log"
        if log.exists():   # the old container's logger keeps writing to the renamed file
            log.replace(log.with_suffix(".previous.log"))
        new_id = self.start(node, "proxy", run=run, name=successor)
        if not podman.wait_stopped(current, self.termination_grace()):
            podman.kill(current)
        podman.remove([current], grace=0)
        podman.rename(successor, current)
        return new_id


class PodContainers:
    """The local kubelet's container runtime (``--containers``): a Pod whose containers name
    an image runs them as podman containers, in the pod's network namespace and below its
    cgroup, with the flags its spec asks for (``containers.pod_container_run``), as a CRI
    runtime would. The kubelet keeps judging liveness by the pod's cgroup."""

    def __init__(self, layout: ClusterLayout):
        self.layout = layout

    @staticmethod
    def wants(pod: dict[str, Any]) -> bool:
        containers = (pod.get("spec") or {}).get("containers") or []
        return bool(containers) and all(isinstance(c, dict) and c.get("image") for c in containers)

    def container_name(self, namespace: str, pod: str, container: str) -> str:
        return f"{self.layout.name}.pod.{namespace}.{pod}.{container}"

    def start(self, pod: dict[str, Any], ips: tuple[str, ...], cgroup: Path) -> list[str]:
        """Starts (or replaces) every container of ``pod``; returns their IDs."""
        meta, spec = pod["metadata"], pod["spec"]
        fields = {"spec.nodeName": spec["nodeName"], "metadata.namespace": meta["namespace"],
                  "metadata.name": meta["name"], "status.podIP": ips[0],
                  "spec.serviceAccountName": spec.get("serviceAccountName", "default")}
        netns = f"ns:/run/netns/{self.layout.pod_netns(meta['namespace'], meta['name'])}"
        parent = "/" + str(cgroup.relative_to(self.layout.cgroup_root))
        log_dir = self.layout.log_dir / "pods"
        log_dir.mkdir(parents=True, exist_ok=True)
        started = []
        for container in spec["containers"]:
            run = pod_container_run(spec, container["name"], f"Pod {meta['namespace']}/{meta['name']}", fields, {})
            name = self.container_name(meta["namespace"], meta["name"], container["name"])
            for folder in run.create_dirs:   # as the kubelet does (the waypoint's node flows folder)
                Path(folder).mkdir(parents=True, exist_ok=True)
            podman.remove_named([name])   # an exited run of the same container
            argv = run.argv(name, netns, cgroup_parent=parent,
                            labels={podman.LABEL_CLUSTER: self.layout.name, LABEL_POD: f"{meta['namespace']}.{meta['name']}"},
                            hosts=controller_hosts())
            started.append(podman.run(logged(argv, log_dir / f"{meta['namespace']}_{meta['name']}_{container['name']}.log")))
        return started

    def exec_argv(self, namespace: str, name: str, argv: list[str]) -> list[str] | None:
        """`shoal exec` into a running container of the pod (``podman exec``: its user, its
        capabilities, its namespaces, as kubectl exec), or None if it has none."""
        if podman.available() is not None:
            return None
        running = podman.cluster_containers(self.layout.name, {LABEL_POD: f"{namespace}.{name}"}, running=True)
        return ["podman", *PODMAN_GLOBAL, "exec", "--interactive", running[0], *argv] if running else None

    def stop(self, namespace: str, name: str, grace: int = 5) -> None:
        """SIGTERM, ``grace`` seconds, SIGKILL, then removes the pod's containers."""
        podman.remove(podman.cluster_containers(self.layout.name, {LABEL_POD: f"{namespace}.{name}"}), grace)
        layout = self.layout
        podman.remove_v1_mirrors(layout.cgroup_root, f"{layout.cgroup.relative_to(layout.cgroup_root)}/*/pods/{namespace}.{name}")

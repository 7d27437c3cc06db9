"""Kubernetes mode's node layout, shared by the agent and the node proxy.

In a local cluster every name follows from ``ClusterLayout``. On a Kubernetes node the
DaemonSet's env tells both processes where the host paths are mounted; they must agree,
so both build their layout here (``layout_from_env``). What only the agent needs to find
pods on a real node stays in ``shoal.agent.k8s``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from shoal.config import ClusterLayout, cluster_name

CGROUP2_MARKER = "cgroup.controllers"


class KubernetesModeError(RuntimeError):
    """The node does not look as the agent needs it to (with what to fix)."""


@dataclass(frozen=True)
class KubernetesLayout(ClusterLayout):
    """``ClusterLayout`` for a Kubernetes node: one node per machine, host paths mounted.

    The agent and the proxy share ``run_root`` (an emptyDir in the DaemonSet pod);
    ``cgroup_root`` is where the host's cgroups are mounted (``node_cgroup`` finds v2 there);
    pins live under ``bpffs_root/<cluster>/<node>``
    as in a local cluster (whose nodes, run from this DaemonSet, share one bpffs).
    """

    name: str = "shoal"
    run_root: Path = Path("/var/run/shoal")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    bpffs_root: Path = Path("/sys/fs/bpf")
    proc_root: Path = Path("/proc")
    # Named pod namespaces (``ip netns``), for a local cluster's nodes run from the DaemonSet
    # (``shoal up --containers``); None on a Kubernetes node, where pods are found via proc_root.
    netns_dir: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "KubernetesLayout":
        """From the DaemonSet's env: SHOAL_RUN_DIR, SHOAL_CGROUP_ROOT, SHOAL_BPFFS, SHOAL_HOST_PROC
        (and SHOAL_NETNS_DIR, set only when rendered for a local cluster)."""
        return cls(
            name=cluster_name(environ),
            run_root=Path(environ.get("SHOAL_RUN_DIR", "/var/run/shoal")),
            cgroup_root=Path(environ.get("SHOAL_CGROUP_ROOT", "/sys/fs/cgroup")),
            bpffs_root=Path(environ.get("SHOAL_BPFFS", "/sys/fs/bpf")),
            proc_root=Path(environ.get("SHOAL_HOST_PROC", "/proc")),
            netns_dir=Path(environ["SHOAL_NETNS_DIR"]) if environ.get("SHOAL_NETNS_DIR") else None,
        )

    @property
    def run_dir(self) -> Path:
        return self.run_root

    def node_dir(self, node: str) -> Path:
        return self.run_root

    def node_cgroup(self, node: str) -> Path:
        """The cgroup v2 root: every pod of the node (and the node itself) is below it.
        Found when asked, not at start: the proxy shares the env but mounts no cgroup."""
        return cgroup2_root(self.cgroup_root)

    def pod_cgroup(self, node: str, namespace: str, pod: str) -> Path:
        raise KubernetesModeError("pod cgroups belong to the kubelet: use pod_netns_path() to find a pod")

    def pod_netns(self, namespace: str, pod: str) -> str:
        raise KubernetesModeError("pod namespaces have no names here: use pod_netns_path(layout.proc_root, uid)")


def layout_from_env(environ: Mapping[str, str] = os.environ) -> ClusterLayout:
    """The layout the agent and the node proxy must share: Kubernetes when
    ``SHOAL_MODE=kubernetes`` (set by the DaemonSet), else the local cluster's."""
    if environ.get("SHOAL_MODE") == "kubernetes":
        return KubernetesLayout.from_env(environ)
    return ClusterLayout(name=cluster_name(environ))


def cgroup2_root(host_cgroup: Path) -> Path:
    """The cgroup v2 hierarchy under the host's mount: unified (v2) or hybrid (v1 + unified/)."""
    for candidate in (host_cgroup, host_cgroup / "unified"):
        if (candidate / CGROUP2_MARKER).is_file():
            return candidate
    raise KubernetesModeError(
        f"no cgroup v2 hierarchy at {host_cgroup} or {host_cgroup}/unified: Shoal needs cgroup v2 "
        "(unified or hybrid layout) mounted on the host at /sys/fs/cgroup")

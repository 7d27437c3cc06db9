"""The local Shoal cluster as a bench bed: ``SHOAL_CLUSTER=perf shoal up --nodes 2``.

Pods are made with ``shoal apply -f`` (a Namespace, a ServiceAccount and a Pod whose
command only sleeps, with ``nodeName`` set) and every benchmark process runs through
``shoal exec NS/POD -- ...``, i.e. in the pod's network namespace *and* cgroup, exactly
where the agent's capture applies. ``close`` always runs ``shoal down`` for this
cluster, which is never the default one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shoal.config import ENV_CLUSTER, LABEL_MESH, ClusterLayout
from shoal.perf import procstat
from shoal.perf.beds import procs

DEFAULT_CLUSTER = "perf"
PROTECTED_CLUSTERS = frozenset({"shoal"})     # the user's default cluster: never touched


class BedError(RuntimeError):
    """The cluster did not come up, or a pod did not start."""


def shoal_argv() -> list[str]:
    """The ``shoal`` console script of this interpreter's venv (or ``python -m shoal``)."""
    script = Path(sys.executable).parent / "shoal"
    if script.exists():
        return [str(script)]
    found = shutil.which("shoal")
    return [found] if found else [sys.executable, "-m", "shoal"]


def pod_manifests(namespace: str, name: str, node: str, *, meshed: bool, service_account: str,
                  labels: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """Namespace (labelled into the mesh or not), ServiceAccount and a sleeping Pod on ``node``."""
    ns_labels = {LABEL_MESH: "enabled"} if meshed else {}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": ns_labels}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": service_account, "namespace": namespace}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": namespace, "labels": {"app": name, **(labels or {})}},
         "spec": {"nodeName": node, "serviceAccountName": service_account,
                  "containers": [{"name": "bench", "command": ["sleep", "infinity"]}]}},
    ]


def find_pod(listing: str, namespace: str, name: str) -> tuple[str, str] | None:
    """(phase, podIP) of a pod in ``shoal get pods -o json`` output, or None when absent."""
    try:
        doc = json.loads(listing)
    except json.JSONDecodeError as exc:
        raise BedError(f"shoal get pods: not JSON: {exc}") from exc
    items = doc.get("items", []) if isinstance(doc, dict) else doc
    for item in items:
        meta = item.get("metadata", {})
        if meta.get("namespace") == namespace and meta.get("name") == name:
            status = item.get("status", {})
            return status.get("phase", "Pending"), status.get("podIP", "")
    return None


@dataclass
class ClusterPod:
    namespace: str
    name: str
    node: str
    ip: str
    shoal: list[str]
    env: dict[str, str]

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return [*self.shoal, "exec", f"{self.namespace}/{self.name}", "--", *argv]

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=timeout,
                              check=check, env=self.env)

    def spawn(self, argv: Sequence[str], *, log: Path | None = None) -> "subprocess.Popen[bytes]":
        return procs.spawn(self._argv(argv), log, env=self.env)


@dataclass
class ClusterBed:
    """``up`` makes the cluster and ``close`` removes it, unless ``attach``: then the bed
    uses a running cluster it does not own, and ``close`` only deletes the pods it made."""

    node_count: int = 2
    name: str = field(default_factory=lambda: os.environ.get("SHOAL_PERF_CLUSTER", DEFAULT_CLUSTER))
    log: Callable[[str], None] = print
    attach: bool = False
    kind: str = "cluster"
    containers: bool = False      # `shoal up --containers`: node pods as podman containers
    _pods: dict[tuple[str, str], ClusterPod] = field(default_factory=dict)
    _applied: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name in PROTECTED_CLUSTERS:
            raise BedError(f"the bench bed never uses cluster {self.name!r}; pick another SHOAL_PERF_CLUSTER")
        if not self.attach and not self.name.startswith(DEFAULT_CLUSTER):
            # This bed runs `shoal down` on its cluster: only ever on a bench cluster.
            raise BedError(f"the bench bed only creates (and removes) clusters named perf*, not {self.name!r}")
        self.layout = ClusterLayout(name=self.name)
        self.env = {**os.environ, ENV_CLUSTER: self.name}
        self.shoal = [*shoal_argv(), "--cluster", self.name]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(f"node-{i}" for i in range(1, self.node_count + 1))

    def _shoal(self, *args: str, timeout: float, input: str | None = None) -> "subprocess.CompletedProcess[str]":
        done = subprocess.run([*self.shoal, *args], capture_output=True, text=True, timeout=timeout,
                              input=input, env=self.env)
        if done.returncode != 0:
            raise BedError(f"shoal {' '.join(args)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-800:]}")
        return done

    def up(self) -> "ClusterBed":
        if self.attach:
            self.log(f"bed: using the running cluster {self.name!r}")
            self._shoal("get", "nodes", timeout=30)
            return self
        containers = ("--containers",) if self.containers else ()
        self.log(f"bed: shoal up --nodes {self.node_count} {' '.join(containers)}(cluster {self.name!r})")
        try:
            self._shoal("up", "--nodes", str(self.node_count), *containers, timeout=600)
        except BaseException:
            self.close()
            raise
        return self

    def pod(self, namespace: str, name: str, node: str, *, meshed: bool = False,
            service_account: str = "default", labels: Mapping[str, str] | None = None) -> ClusterPod:
        key = (namespace, name)
        if key in self._pods:
            return self._pods[key]
        if node not in self.nodes:
            raise ValueError(f"no node {node!r} in this bed ({', '.join(self.nodes)})")
        docs = pod_manifests(namespace, name, node, meshed=meshed, service_account=service_account,
                             labels=labels)
        self._shoal("apply", "-f", "-", timeout=60, input=yaml.safe_dump_all(docs))
        self._applied += [d for d in docs if d not in self._applied]
        deadline = time.monotonic() + 60
        while True:
            found = find_pod(self._shoal("get", "pods", "-n", namespace, "-o", "json", timeout=30).stdout,
                             namespace, name)
            if found and found[0] == "Running" and found[1]:
                break
            if time.monotonic() > deadline:
                raise BedError(f"pod {namespace}/{name} not Running with an IP after 60 s (last: {found})")
            time.sleep(0.3)
        pod = ClusterPod(namespace, name, node, found[1], self.shoal, self.env)
        self._pods[key] = pod
        return pod

    def stop(self, proc: "subprocess.Popen[bytes]") -> None:
        procs.stop(proc)

    def component_pids(self, component: str, nodes: Sequence[str] | None = None) -> list[int]:
        """PIDs of a node component ("proxy", "agent") on the given nodes (default: all),
        read from its cgroup ``<cluster>/<node>/system/<component>``."""
        pids: list[int] = []
        for node in nodes or self.nodes:
            cgroup = self.layout.system_cgroup(node, component)
            if cgroup.is_dir():
                pids += procstat.pids_in_cgroup(cgroup)
        return pids

    def close(self) -> None:
        self._pods.clear()
        if self.attach:
            # Pods first, then their service accounts and namespaces.
            order = {"Pod": 0, "ServiceAccount": 1, "Namespace": 2}
            for doc in sorted(self._applied, key=lambda d: order[d["kind"]]):
                done = subprocess.run([*self.shoal, "delete", "-f", "-"], input=yaml.safe_dump(doc),
                                      capture_output=True, text=True, timeout=60, env=self.env)
                if done.returncode != 0:
                    self.log(f"bed: deleting {doc['kind']} {doc['metadata']['name']} failed: "
                             f"{(done.stderr or done.stdout).strip()[-300:]}")
            self._applied.clear()
            return
        self.log(f"bed: shoal down (cluster {self.name!r})")
        done = subprocess.run([*self.shoal, "down"], capture_output=True, text=True, timeout=180, env=self.env)
        if done.returncode != 0:
            self.log(f"bed: shoal down failed: {(done.stderr or done.stdout).strip()[-500:]}")

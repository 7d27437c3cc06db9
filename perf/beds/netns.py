"""A throwaway two-node topology made of network namespaces, for runs without Shoal.

It has the shape of the local cluster's path (pod -> node bridge -> fabric -> node
bridge -> pod), so peers measured here see the same hops. Every name carries
``shoal-pf<tag>``; veths are created inside those namespaces, so the machine's root
namespace is never touched.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoal.perf.beds import procs


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NetnsPod:
    namespace: str
    name: str
    node: str
    ip: str
    netns: str

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def spawn(self, argv: Sequence[str], *, log: Path | None = None) -> "subprocess.Popen[bytes]":
        return procs.spawn(["ip", "netns", "exec", self.netns, *argv], log)


@dataclass
class NetnsBed:
    """Nodes ``node-1..node-N`` joined by a fabric bridge; pods on a ``cni0`` bridge per node."""

    node_count: int = 2
    tag: str = field(default_factory=lambda: f"shoal-pf{os.getpid()}")
    kind: str = "netns"
    _made: list[str] = field(default_factory=list)
    _pods: dict[tuple[str, str], NetnsPod] = field(default_factory=dict)
    _next_host: dict[str, int] = field(default_factory=dict)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(f"node-{i}" for i in range(1, self.node_count + 1))

    def _netns(self, name: str) -> str:
        netns = f"{self.tag}-{name}"
        _ip("netns", "add", netns)
        self._made.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def up(self) -> "NetnsBed":
        try:
            fabric = self._netns("fabric")
            _ip("-n", fabric, "link", "add", "fabric0", "type", "bridge")
            _ip("-n", fabric, "link", "set", "fabric0", "up")
            for i in range(1, self.node_count + 1):
                node = self._netns(f"node-{i}")
                _ip("-n", fabric, "link", "add", f"n{i}", "type", "veth", "peer", "name", "eth0", "netns", node)
                _ip("-n", fabric, "link", "set", f"n{i}", "master", "fabric0", "up")
                _ip("-n", node, "addr", "add", f"172.18.0.{10 + i}/24", "dev", "eth0")
                _ip("-n", node, "link", "set", "eth0", "up")
                _ip("-n", node, "link", "add", "cni0", "type", "bridge")
                _ip("-n", node, "addr", "add", f"10.244.{i}.1/24", "dev", "cni0")
                _ip("-n", node, "link", "set", "cni0", "up")
                subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
                for j in range(1, self.node_count + 1):
                    if j != i:
                        _ip("-n", node, "route", "add", f"10.244.{j}.0/24", "via", f"172.18.0.{10 + j}")
            return self
        except BaseException:
            self.close()
            raise

    def pod(self, namespace: str, name: str, node: str, *, meshed: bool = False,
            service_account: str = "default", labels: Mapping[str, str] | None = None) -> NetnsPod:
        if meshed:
            raise ValueError("the netns bed has no mesh: meshed pods need the cluster bed")
        key = (namespace, name)
        if key in self._pods:
            return self._pods[key]
        index = int(node.rsplit("-", 1)[1])
        host = self._next_host.get(node, 10)
        self._next_host[node] = host + 1
        netns = self._netns(f"{namespace}-{name}")
        node_ns = f"{self.tag}-{node}"
        veth = f"v{host}"
        _ip("-n", node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", node_ns, "link", "set", veth, "master", "cni0", "up")
        ip = f"10.244.{index}.{host}"
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "route", "add", "default", "via", f"10.244.{index}.1")
        pod = NetnsPod(namespace, name, node, ip, netns)
        self._pods[key] = pod
        return pod

    def stop(self, proc: "subprocess.Popen[bytes]") -> None:
        procs.stop(proc)

    def close(self) -> None:
        # Pods first: deleting a netns removes its veths (and their peers).
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._made.clear()
        self._pods.clear()

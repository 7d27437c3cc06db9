"""The local cluster's network: a fabric, nodes and pods, all in namespaces of our own.

    control netns   fabric0 172.18.0.1/24 (bridge; the controller listens here)
        |  veth per node
    node-i netns    eth0 172.18.0.(10+i)   cni0 10.244.i.1/24 (bridge)   routes to other pod CIDRs
        |  veth per pod
    pod netns       eth0 10.244.i.k/24, default via 10.244.i.1

Nothing is created in the root network namespace: each veth pair is created inside one of
our namespaces with its peer placed directly in another of ours.
"""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from shoal.config import ClusterLayout
from shoal.local.linux import Netns


def _veth_name(key: str) -> str:
    # Interface names are limited to 15 characters: a short stable hash of the pod.
    return "veth" + hashlib.sha1(key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Topology:
    layout: ClusterLayout

    # -- fabric and nodes --------------------------------------------------------------

    def build_control(self) -> Netns:
        control = Netns(self.layout.control_netns).create()
        if not control.has_link("fabric0"):
            control.ip("link", "add", "fabric0", "type", "bridge")
        prefix = ipaddress.ip_network(self.layout.FABRIC_CIDR).prefixlen
        control.ip("addr", "replace", f"{self.layout.CONTROLLER_IP}/{prefix}", "dev", "fabric0")
        control.ip("link", "set", "fabric0", "up")
        return control

    def build_node(self, node: str, all_nodes: list[str]) -> Netns:
        netns = Netns(self.layout.node_netns(node)).create()
        control = Netns(self.layout.control_netns)
        port = f"fab-{node}"
        if not netns.has_link("eth0"):
            netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", control.name)
        control.ip("link", "set", port, "master", "fabric0", "up")
        prefix = ipaddress.ip_network(self.layout.FABRIC_CIDR).prefixlen
        netns.ip("addr", "replace", f"{self.layout.node_ip(node)}/{prefix}", "dev", "eth0")
        netns.ip("link", "set", "eth0", "up")
        if not netns.has_link("cni0"):
            netns.ip("link", "add", "cni0", "type", "bridge")
        pod_prefix = ipaddress.ip_network(self.layout.pod_cidr(node)).prefixlen
        netns.ip("addr", "replace", f"{self.layout.pod_gateway(node)}/{pod_prefix}", "dev", "cni0")
        netns.ip("link", "set", "cni0", "up")
        netns.sysctl("net.ipv4.ip_forward", "1")
        # The control netns reaches pods (waypoints and webhooks dial the controller from pods).
        control.ip("route", "replace", self.layout.pod_cidr(node), "via", self.layout.node_ip(node))
        for other in all_nodes:
            if other != node:
                netns.ip("route", "replace", self.layout.pod_cidr(other), "via", self.layout.node_ip(other))
        return netns

    # -- pods --------------------------------------------------------------------------

    def attach_pod(self, node: str, namespace: str, pod: str, ip: str) -> Netns:
        netns = Netns(self.layout.pod_netns(namespace, pod)).create()
        node_netns = Netns(self.layout.node_netns(node))
        host_side = _veth_name(f"{namespace}/{pod}")
        if not netns.has_link("eth0"):
            netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", host_side, "netns", node_netns.name)
        node_netns.ip("link", "set", host_side, "master", "cni0", "up")
        prefix = ipaddress.ip_network(self.layout.pod_cidr(node)).prefixlen
        netns.ip("addr", "replace", f"{ip}/{prefix}", "dev", "eth0")
        netns.ip("link", "set", "eth0", "up")
        netns.ip("route", "replace", "default", "via", self.layout.pod_gateway(node))
        return netns

    def detach_pod(self, namespace: str, pod: str) -> None:
        # Deleting the namespace deletes eth0, and with it the veth peer in the node.
        Netns(self.layout.pod_netns(namespace, pod)).delete()

    def pod_ip_range(self, node: str) -> list[str]:
        """Addresses a pod on ``node`` may get (.1 is the node's gateway)."""
        net = ipaddress.ip_network(self.layout.pod_cidr(node))
        return [str(h) for h in net.hosts()][1:]

    def teardown(self) -> None:
        for netns in Netns.list(self.layout.netns_prefix):
            netns.delete()

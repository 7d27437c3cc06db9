"""The local cluster's address plan: the fabric, each node's address and pod CIDR.

Pure arithmetic on node names (``node-N``); ``shoal/local/topology.py`` builds it out of
namespaces and veths, the kubelet hands out pod addresses from it. No daemon imports this:
the local cluster passes each component the addresses it needs (``--grpc-address``,
``SHOAL_CONTROLLER``, the relay's node addresses), as a Kubernetes cluster would.

Dual-stack: every range has an IPv4 and an IPv6 (ULA, fd00::/8) form, IPv4 first.
The IPv6 forms spell the IPv4 numbers as hex groups (10.244.1.23 <-> fd00:10:244:1::23)
so an address reads the same in both families; IPv4 stays the primary family.
"""
from __future__ import annotations

from shoal.config import LOCAL_CONTROLLER_ADDRESS, LOCAL_CONTROLLER_IP, ClusterLayout

FABRIC_CIDRS = ("172.18.0.0/24", "fd00:172:18::/64")
CONTROLLER_IP = LOCAL_CONTROLLER_IP              # the control netns, on the fabric bridge
CONTROLLER_IPS = (CONTROLLER_IP, "fd00:172:18::1")
CONTROLLER_ADDRESS = LOCAL_CONTROLLER_ADDRESS   # the config stream and the CA, from every node


def node_ips(node: str) -> tuple[str, str]:
    """``node``'s addresses on the fabric."""
    index = 10 + ClusterLayout.node_index(node)
    return f"172.18.0.{index}", f"fd00:172:18::{index}"


def node_ip(node: str) -> str:
    return node_ips(node)[0]


def pod_cidrs(node: str) -> tuple[str, str]:
    """The pod addresses ``node`` hands out."""
    index = ClusterLayout.node_index(node)
    return f"10.244.{index}.0/24", f"fd00:10:244:{index}::/64"


def pod_cidr(node: str) -> str:
    return pod_cidrs(node)[0]


def pod_ips(node: str, ipv4: str) -> tuple[str, str]:
    """Both addresses of the pod (or gateway) that has ``ipv4`` on ``node``: the IPv6
    one is derived, so one allocator (IPv4's) serves both families."""
    return ipv4, f"fd00:10:244:{ClusterLayout.node_index(node)}::{ipv4.rsplit('.', 1)[1]}"


def pod_gateways(node: str) -> tuple[str, str]:
    """The addresses of ``node``'s pod bridge (cni0): its pods' default routes."""
    return pod_ips(node, pod_cidr(node).replace(".0/24", ".1"))


def pod_gateway(node: str) -> str:
    return pod_gateways(node)[0]

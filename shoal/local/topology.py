"""The local cluster's network: a fabric, nodes and pods, all in namespaces of our own.

    control netns   fabric0 172.18.0.1/24 fd00:172:18::1/64 (bridge; the controller listens here)
        |  veth per node
    node-i netns    eth0 172.18.0.(10+i) fd00:172:18::(10+i)
                    cni0 10.244.i.1/24 fd00:10:244:i::1/64 (bridge), routes to other pod CIDRs
        |  veth per pod
    pod netns       eth0 10.244.i.k/24 fd00:10:244:i::k/64, default routes via the cni0 gateways;
                    its MAC derived from its address (``stable_mac``: a recycled address keeps it)

Dual-stack: every address, route and forwarding sysctl exists once per family (the
address plan's ``*_cidrs``/``*_ips`` pairs in ``shoal/local/network.py``, IPv4 first). IPv6 addresses are added with
``nodad``: duplicate address detection would leave them unusable ("tentative") for a
second after creation, and the allocator already guarantees uniqueness.

Nothing is created in the root network namespace: each veth pair is created inside one of
our namespaces with its peer placed directly in another of ours.
"""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from shoal.agent.ztunnel.transparent import DELIVERY_SYSCTLS, HANDOVER_SYSCTL
from shoal.config import ClusterLayout
from shoal.local import network
from shoal.local.linux import Netns


def _add_address(netns: Netns, device: str, address: str, cidr: str) -> None:
    """``address`` with the prefix length of ``cidr`` on ``device`` (idempotent)."""
    prefix = ipaddress.ip_network(cidr).prefixlen
    extra = ("nodad",) if ipaddress.ip_address(address).version == 6 else ()
    netns.ip("addr", "replace", f"{address}/{prefix}", "dev", device, *extra)


def stable_mac(ipv4: str) -> str:
    """The MAC of the device whose IPv4 address is ``ipv4`` (a pod's eth0, a bridge): a
    function of the address, as Docker does (a fixed prefix + the IPv4 bytes). Peers keep a
    neighbour entry REACHABLE for 15-45 s, longer while traffic flows; a MAC that changes
    under an address black-holes everything sent to it meanwhile:

    - a pod given a released address (a waypoint deleted and applied again) came with a
      new random MAC: every new connection to it timed out;
    - a bridge without a MAC of its own takes the lowest MAC of its ports and another one
      when that port leaves: when a deleted pod had it, the other pods' gateway pointed
      nowhere, and established HBONE connections to other nodes got no answer to any stream.

    Prefix 02:5e: locally administered, unicast."""
    return "02:5e:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ipv4).packed)


def veth_name(key: str) -> str:
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
        control.ip("link", "set", "fabric0", "address", stable_mac(network.CONTROLLER_IP))
        for address, cidr in zip(network.CONTROLLER_IPS, network.FABRIC_CIDRS):
            _add_address(control, "fabric0", address, cidr)
        control.ip("link", "set", "fabric0", "up")
        return control

    def build_node(self, node: str, all_nodes: list[str]) -> Netns:
        netns = Netns(self.layout.node_netns(node)).create()
        control = Netns(self.layout.control_netns)
        port = f"fab-{node}"
        if not netns.has_link("eth0"):
            netns.ip("link", "add", "eth0", "address", stable_mac(network.node_ips(node)[0]), "type", "veth",
                     "peer", "name", port, "netns", control.name)
        control.ip("link", "set", port, "master", "fabric0", "up")
        for address, cidr in zip(network.node_ips(node), network.FABRIC_CIDRS):
            _add_address(netns, "eth0", address, cidr)
        netns.ip("link", "set", "eth0", "up")
        if not netns.has_link("cni0"):
            netns.ip("link", "add", "cni0", "type", "bridge")
        netns.ip("link", "set", "cni0", "address", stable_mac(network.pod_gateway(node)))
        for gateway, cidr in zip(network.pod_gateways(node), network.pod_cidrs(node)):
            _add_address(netns, "cni0", gateway, cidr)
        netns.ip("link", "set", "cni0", "up")
        netns.sysctl({"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        # The control netns reaches pods (waypoints and webhooks dial the controller from pods).
        for family in range(2):
            control.ip("route", "replace", network.pod_cidrs(node)[family],
                       "via", network.node_ips(node)[family])
            for other in all_nodes:
                if other != node:
                    netns.ip("route", "replace", network.pod_cidrs(other)[family],
                             "via", network.node_ips(other)[family])
        return netns

    # -- pods --------------------------------------------------------------------------

    def attach_pod(self, node: str, namespace: str, pod: str, ips: tuple[str, ...]) -> Netns:
        """Puts the pod on the node's bridge with every address in ``ips`` (one per family)."""
        netns = Netns(self.layout.pod_netns(namespace, pod)).create()
        node_netns = Netns(self.layout.node_netns(node))
        host_side = veth_name(f"{namespace}/{pod}")
        ipv4 = next(a for a in ips if ipaddress.ip_address(a).version == 4)
        if not netns.has_link("eth0"):
            netns.ip("link", "add", "eth0", "address", stable_mac(ipv4), "type", "veth",
                     "peer", "name", host_side, "netns", node_netns.name)
        node_netns.ip("link", "set", host_side, "master", "cni0", "up")
        families = {ipaddress.ip_address(g).version: (g, c) for g, c in
                    zip(network.pod_gateways(node), network.pod_cidrs(node))}
        for address in ips:
            _add_address(netns, "eth0", address, families[ipaddress.ip_address(address).version][1])
        netns.ip("link", "set", "eth0", "up")
        # As a CNI step would: the node proxy may run in a container, whose /proc/sys is
        # read-only, so the pod sysctls its delivery and handover need are set here first.
        netns.sysctl({name.replace("/", "."): "1" for name in (*DELIVERY_SYSCTLS, HANDOVER_SYSCTL)})
        for address in ips:
            version = ipaddress.ip_address(address).version
            netns.ip(f"-{version}", "route", "replace", "default", "via", families[version][0])
        return netns

    def detach_pod(self, namespace: str, pod: str) -> None:
        """Takes the pod off the network at once, then deletes its namespace. eth0 is
        deleted first (with its veth peer in the node) because a namespace dies
        asynchronously after its name is removed: until the kernel's cleanup runs, its eth0
        still holds the pod's addresses, and the next pod given them had its SYNs answered
        by the dying one (RST: "connection refused")."""
        netns = Netns(self.layout.pod_netns(namespace, pod))
        if netns.exists():
            netns.ip("link", "del", "eth0", check=False)   # absent if the pod never got one
        netns.delete()

    def pod_ip_range(self, node: str) -> list[str]:
        """Addresses a pod on ``node`` may get (.1 is the node's gateway)."""
        net = ipaddress.ip_network(network.pod_cidr(node))
        return [str(h) for h in net.hosts()][1:]

    def teardown(self) -> None:
        for netns in Netns.list(self.layout.netns_prefix):
            netns.delete()

"""The local cluster's pod network on real namespaces (no cluster daemons): a pod that
takes over a released address is reachable at once from pods that knew the old one."""
from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from shoal.config import ClusterLayout
from shoal.local import network
from shoal.local.linux import Netns
from shoal.local.topology import Topology, stable_mac, veth_name
from shoal.netns import in_netns

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
def topology():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    topo = Topology(ClusterLayout(name=f"shoal-topo-{os.getpid()}-{uuid.uuid4().hex[:4]}"))
    try:
        topo.build_control()
        topo.build_node("node-1", ["node-1"])
        yield topo
    finally:
        topo.teardown()


def _listener(path: str, family: int, address: str) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((address, 8080))
        sock.listen(8)
        return sock
    return in_netns(path, make)


def _connect(path: str, family: int, address: str, timeout: float) -> None:
    def dial() -> None:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((address, 8080))
    in_netns(path, dial)


@pytest.mark.parametrize("version", [4, 6])
def test_a_pod_on_a_recycled_address_is_reachable_at_once(topology, version):
    """The kubelet hands a released address to the next pod (a waypoint deleted and applied
    again gets its old IP). Before, the new veth had a new random MAC, and every neighbour
    that had talked to the old pod (the client pod, the node's bridge for other nodes) kept
    the old MAC as REACHABLE for 15-45 s: SYNs went to a MAC that no longer existed and
    every dial timed out (the node proxy's 5 s "TimeoutError" to the waypoint). The MAC
    is now derived from the address, so the neighbour entries stay right."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    client_ips = network.pod_ips("node-1", "10.244.1.2")
    server_ips = network.pod_ips("node-1", "10.244.1.3")
    target = server_ips[0 if version == 4 else 1]
    client = topology.attach_pod("node-1", "demo", "client-0", client_ips)
    old = topology.attach_pod("node-1", "demo", "waypoint-a", server_ips)
    listener = _listener(str(old.path), family, target)
    _connect(str(client.path), family, target, timeout=5)   # the client's neighbour cache knows it now
    listener.close()
    topology.detach_pod("demo", "waypoint-a")
    new = topology.attach_pod("node-1", "demo", "waypoint-b", server_ips)
    listener = _listener(str(new.path), family, target)
    try:
        _connect(str(client.path), family, target, timeout=3)
    finally:
        listener.close()


def test_stable_mac_is_a_function_of_the_address_and_locally_administered():
    assert stable_mac("10.244.1.5") == stable_mac("10.244.1.5") == "02:5e:0a:f4:01:05"
    assert stable_mac("10.244.1.5") != stable_mac("10.244.2.5")
    first = int(stable_mac("10.244.1.5").split(":")[0], 16)
    assert first & 0x02 and not first & 0x01      # locally administered, unicast


@pytest.mark.parametrize("version", [4, 6])
def test_the_pod_gateway_keeps_its_mac_when_a_pod_leaves(topology, version):
    """A Linux bridge without a MAC of its own takes the lowest MAC of its ports, and takes
    another when that port leaves. Pods kept the old one for their gateway (REACHABLE, 15-45 s)
    and everything they sent off the node went to a MAC nobody had: established HBONE
    connections to other nodes got no answer to any new stream (the peer saw none of them)
    and new ones timed out, whenever the pod that left (a deleted waypoint) had the lowest
    port MAC. The node's bridge now has a fixed MAC."""
    layout = topology.layout
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    client = topology.attach_pod("node-1", "demo", "client-0", network.pod_ips("node-1", "10.244.1.2"))
    topology.attach_pod("node-1", "demo", "waypoint-0", network.pod_ips("node-1", "10.244.1.5"))
    node = Netns(layout.node_netns("node-1"))
    # The leaving pod's port has the lowest MAC of the bridge (random MACs: about as likely
    # as not for a pod among a few).
    node.ip("link", "set", veth_name("demo/waypoint-0"), "address", "02:00:00:00:00:01")
    gateway = network.pod_gateways("node-1")[0 if version == 4 else 1]
    listener = _listener(str(node.path), family, gateway)   # the node itself, beyond the gateway
    try:
        _connect(str(client.path), family, gateway, timeout=5)
        topology.detach_pod("demo", "waypoint-0")
        # The namespace goes at once, its veth a moment later (the kernel cleans up
        # namespaces asynchronously): the bridge reconsiders its MAC only then.
        deadline = time.monotonic() + 10
        while node.has_link(veth_name("demo/waypoint-0")) and time.monotonic() < deadline:
            time.sleep(0.05)
        _connect(str(client.path), family, gateway, timeout=3)
    finally:
        listener.close()

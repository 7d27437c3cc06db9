"""Fixtures for the node proxy: a DevCA, two pod namespaces joined by a veth, an app."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest
import uvloop

from shoal.xds.model import ConfigDelta
from shoal.xds.state import ConfigState
from tests.agent.ztunnel.proxybed import CLIENT_IP, CLIENT_IP6, OTHER_IP, OTHER_IP6, SERVER_IP, SERVER_IP6, workload
from tests.devca import DevCA


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}  # the proxy runs on uvloop: test on it


@pytest.fixture(scope="session")
def ca():
    return DevCA()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pod_netns():
    """Three dual-stack pod namespaces on one veth segment: client, server, other.

    Names are unique (shoal-t<pid>-<tag>-x); removed even when tests fail.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    tag = f"shoal-t{os.getpid()}-{uuid.uuid4().hex[:4]}"
    names = {"client": f"{tag}-c", "server": f"{tag}-s", "other": f"{tag}-o"}
    try:
        for name in names.values():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        # server <-> client and server <-> other: a bridge in the server's namespace.
        _ip("-n", names["server"], "link", "add", "br0", "type", "bridge")
        for role, ip, ip6 in (("client", CLIENT_IP, CLIENT_IP6), ("other", OTHER_IP, OTHER_IP6)):
            _ip("-n", names[role], "link", "add", "eth0", "type", "veth", "peer", "name", f"v{role}",
                "netns", names["server"])
            _ip("-n", names[role], "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", names[role], "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            _ip("-n", names[role], "link", "set", "eth0", "up")
            _ip("-n", names["server"], "link", "set", f"v{role}", "master", "br0", "up")
        _ip("-n", names["server"], "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        _ip("-n", names["server"], "addr", "add", f"{SERVER_IP6}/64", "dev", "br0", "nodad")
        _ip("-n", names["server"], "link", "set", "br0", "up")
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def state():
    st = ConfigState()
    st.apply(ConfigDelta("1", upserted=(workload("client-0", CLIENT_IP, "client", ips=(CLIENT_IP, CLIENT_IP6)),
                                        workload("web-0", SERVER_IP, "web", ips=(SERVER_IP, SERVER_IP6)),
                                        workload("legacy-0", OTHER_IP, "default", ns="legacy", meshed=False,
                                                 protocol="TCP", ips=(OTHER_IP, OTHER_IP6)))))
    return st



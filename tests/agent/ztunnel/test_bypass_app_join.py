"""The app join through the node proxy, end to end: the agent's real programs (capture,
sockops, the verdict, the sk_msg program) attached to a cgroup of our own, a blocking
client app spawned into it in the client pod, captured to the proxy, whose own code (the
real origdst map, join, link, landed bytes, half-close, counts) serves it."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.config import ClusterLayout
from shoal.hbone.handshakes import HandshakeLimits
from tests.agent.ztunnel.proxybed import CLIENT_IP, SERVER_IP
from tests.agent.ztunnel.test_proxy import APP_PORT, metric, start_harness

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

APP = Path(__file__).parents[2] / "shoal" / "datapath" / "joinapp.py"
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


@pytest.fixture(scope="module")
def captured_layout(tmp_path_factory):
    """The agent's maps and programs for a node of a cluster of our own, the cgroup
    programs attached to a cgroup of our own (the client app runs in it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: eBPF, cgroups")
    from shoal.agent.loader import Datapath, FeatureFlags, detach_cgroup
    name = f"shoal-t{os.getpid()}-appjoin"
    layout = ClusterLayout(name=name, run_root=tmp_path_factory.mktemp("run"))
    cgroup = CGROUP_ROOT / name
    cgroup.mkdir()
    pin_dir = layout.bpf_pin_dir("node-1")
    datapath = Datapath(pin_dir, FeatureFlags(15001, 15006, 15008))
    try:
        datapath.start(cgroup)
        yield layout, cgroup
    finally:
        detach_cgroup(pin_dir, cgroup)
        datapath.close()
        cgroup.rmdir()
        shutil.rmtree(layout.bpffs_root / layout.name, ignore_errors=True)


@pytest.fixture
async def proxy(pod_netns, state, ca, captured_layout, caplog):
    """The proxy with the app join, the client pod enrolled (its connect()s captured), the
    server pod a meshed pod of this node in the ipcache."""
    from shoal.agent.compiler import Endpoint
    from shoal.agent.mapsync import DatapathMaps
    from shoal.agent.netns import netns_cookie
    from shoal.agent.ztunnel.config import ProxyConfig
    from shoal.datapath.origdst import OriginalDestinations
    from shoal.datapath.structs import ENDPOINT_LOCAL, ENDPOINT_MESHED
    caplog.set_level(logging.INFO, logger="shoal.proxy.access")
    layout, _cgroup = captured_layout
    pin_dir = layout.bpf_pin_dir("node-1")
    maps = DatapathMaps(pin_dir)
    client_cookie = netns_cookie(f"/run/netns/{pod_netns['client']}")
    maps.set_pod(client_cookie, 1001, CLIENT_IP, ns_id=7)
    maps.sync_endpoints({SERVER_IP: Endpoint(1002, 7, ENDPOINT_LOCAL | ENDPOINT_MESHED)})
    config = ProxyConfig(node="node-1", layout=layout, handshake_limits=HandshakeLimits(timeout=2.0),
                         connect_timeout=4.0, drain_grace=1.0, same_node_app_join=True)
    harness, agent = await start_harness(config, pod_netns, state, ca.sign)
    harness.app.ctx.origdst = OriginalDestinations(pin_dir)   # the real capture's answers
    yield harness
    await agent.close()
    harness.echo.close()
    await harness.app.stop()
    maps.remove_pod(client_cookie)
    maps.sync_endpoints({})
    maps.close()


async def _client_app(pod_netns, cgroup: Path, *args: str) -> dict:
    """joinapp.py as the client app, in the client pod and in our cgroup."""
    script = 'echo $$ > "$0" && exec ip netns exec "$@"'
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", script, str(cgroup / "cgroup.procs"), pod_netns["client"], sys.executable, str(APP),
        "client", SERVER_IP, str(APP_PORT), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()   # our cgroup must empty for the teardown
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.02)


async def test_a_blocking_client_app_sends_straight_to_the_server_side_through_the_real_proxy(
        proxy, pod_netns, captured_layout, caplog):
    """The client app greets at once (the verdict carries it), pauses, then streams 64 MiB
    blocking: its sends switch to direct ones; the echo comes back whole, the half-close is
    forwarded after the last direct byte, and metrics and access log count every byte."""
    _layout, cgroup = captured_layout
    app = proxy.app
    size = 64 << 20
    result = await _client_app(pod_netns, cgroup, "--greet", "2048", "--pause", "0.3", "--send", str(size))
    total = 2048 + size
    assert not result["error"], result
    assert result["sent"] == result["received"] == total
    assert result["sent_sha"] == result["received_sha"]   # the echo: every byte, in order
    await _until(lambda: not app.ctx.bypass.live)
    assert metric(app, "shoal_proxy_bypass_connections_total", outcome="joined") == 1
    assert metric(app, "shoal_proxy_bypass_app_directions_total", state="direct") == 1   # client -> server
    assert metric(app, "shoal_proxy_bypass_app_direct_bytes_total") >= size
    for reporter in ("source", "destination"):
        assert metric(app, "istio_tcp_received_bytes_total", reporter=reporter) == total
        assert metric(app, "istio_tcp_sent_bytes_total", reporter=reporter) == total
    lines = [json.loads(line) for r in caplog.records if r.name == "shoal.proxy.access"
             for line in r.getMessage().splitlines()]
    assert {(line["bytes_received"], line["bytes_sent"]) for line in lines if line["route"] == "bypass"} == \
        {(total, total)}


async def test_a_switched_client_apps_reset_resets_the_server_side(proxy, pod_netns, captured_layout):
    """The client app resets mid-stream after its sends switched: its RST reaches the
    proxy's socket, and the proxy ends the pair (the server app's connection closes)."""
    _layout, cgroup = captured_layout
    app = proxy.app
    result = await _client_app(pod_netns, cgroup, "--pause", "0.3", "--send", str(64 << 20),
                               "--reset-after", str(8 << 20))
    assert result.get("reset"), result
    await _until(lambda: not app.ctx.bypass.live)
    await _until(lambda: proxy.echo.finished == 1)
    assert metric(app, "shoal_proxy_bypass_app_directions_total", state="direct") == 1
    assert metric(app, "istio_tcp_sent_bytes_total", reporter="source") < 64 << 20

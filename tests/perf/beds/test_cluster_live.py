"""The cluster bed on the session's shared cluster: pods made by apply, commands by exec."""
import json

import pytest

from shoal.perf import peers, procstat
from shoal.perf.beds.cluster import ClusterBed
from tests.conftest import shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def test_pods_exec_spawn_and_cleanup(demo_cluster, monkeypatch):
    layout = demo_cluster.layout
    monkeypatch.setenv("SHOAL_PERF_CLUSTER", layout.name)
    bed = ClusterBed(attach=True, log=lambda m: None).up()
    try:
        client = bed.pod("perf-t", "client", "node-1")
        server = bed.pod("perf-t", "server", "node-2")
        assert bed.pod("perf-t", "client", "node-1") is client            # made once
        assert client.ip.startswith("10.244.1.") and server.ip.startswith("10.244.2.")
        # Commands run in the pod's cgroup (where the agent's capture applies).
        cgroup = client.run(["cat", "/proc/self/cgroup"], timeout=30).stdout
        assert f"/{layout.name}/node-1/pods/perf-t.client" in cgroup
        proc = server.spawn(["sockperf", "server", "--tcp", "--ip", "0.0.0.0", "--port", "11999"])
        try:
            peers.wait_listening(server, "0.0.0.0", 11999)
            assert procstat.pids_in_group(proc.pid, "sockperf")
        finally:
            bed.stop(proc)
        assert procstat.pids_in_group(proc.pid) == []
        proxies = bed.component_pids("proxy")
        on_node_1 = bed.component_pids("proxy", nodes=["node-1"])
        assert on_node_1 and set(on_node_1) < set(proxies)
    finally:
        bed.close()
    pods = json.loads(shoal_cli(layout, "get", "pods", "-n", "perf-t", "-o", "json").stdout)["items"]
    assert pods == []

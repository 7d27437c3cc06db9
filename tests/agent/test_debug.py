"""`shoal debug bpf` reads each pod's tc programs from the namespace the agent recorded; an
agent in a container records its own view of it (under /host), which the host's command
must map back to the local cluster's named namespace."""
from __future__ import annotations

from shoal.agent.debug import _host_netns_path
from shoal.config import ClusterLayout


def test_a_recorded_path_from_inside_the_agent_container_maps_to_the_named_namespace(monkeypatch):
    layout = ClusterLayout(name="dbg-1")
    named = f"/run/netns/{layout.pod_netns('demo', 'web-0')}"
    present = {named}
    monkeypatch.setattr("os.path.exists", lambda path: path in present)
    known = {"namespace": "demo", "name": "web-0", "netns_path": f"/host{named}"}
    assert _host_netns_path(layout, known) == named
    # A path the host sees (process mode, or /proc/PID/ns/net on a node) is kept as recorded.
    present.add(f"/host{named}")
    assert _host_netns_path(layout, known) == f"/host{named}"
    present.clear()
    assert _host_netns_path(layout, known) == f"/host{named}"   # nothing better: the error names it

"""Waypoint applies and deletes lose no request (issue 14), on the session's demo cluster.

While demo/client-0 sends a request every 0.2 s on a fresh connection, the waypoint is
applied (with --enroll-namespace) and deleted several times. Traffic must move to the
waypoint only once it is ready, and away from it before it exits: no failed request and
no stall. ``SHOAL_WAYPOINT_CYCLES`` sets the number of cycles (2 by default; the issue's
full run is 10).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

SAMPLE = str(Path(__file__).resolve().parents[2] / "waypoint" / "podsample.py")
CYCLES = int(os.environ.get("SHOAL_WAYPOINT_CYCLES", "2"))
DEMO_NS = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {shoal.io/mesh: enabled}}
"""


def waypoint_requests(layout) -> int:
    return shoal_cli(layout, "logs", "demo/waypoint-0", "--tail", "1000000", check=False).stdout.count('"response_code"')


def waypoint_gone(layout) -> bool:
    return not [p for p in json.loads(shoal_cli(layout, "get", "pods", "-n", "demo", "-o", "json").stdout)["items"]
                if p["metadata"]["name"].startswith("waypoint-")]


# From ~07:28 on 2026-12-02 about half the runs saw node-1's proxy time out (5 s) after a
# waypoint was deleted and applied again. Cause: the kubelet gives the next pod the lowest
# free address (the new waypoint got the old one's) with a new random MAC, and a bridge
# takes the lowest MAC of its ports: peers' neighbour entries pointed at MACs that no
# longer existed for 15-45 s. MACs are now derived from the address (shoal/local/topology.py).
def test_applies_and_deletes_lose_no_request(demo_cluster):
    layout = demo_cluster.layout
    duration = 30 + 25 * CYCLES
    result: dict = {}

    def sample() -> None:
        out = pod_exec(layout, "demo/client-0", "python3", SAMPLE, "web.demo", "8080", str(duration),
                       "--interval", "0.2", timeout=duration + 60).stdout
        result.update(json.loads(out.strip().splitlines()[-1]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    cycles_done = 0
    try:
        for _ in range(CYCLES):
            before = waypoint_requests(layout)
            out = shoal_cli(layout, "waypoint", "apply", "-n", "demo", "--enroll-namespace", "--wait", "60").stdout
            assert "ready: traffic goes through it" in out
            eventually(lambda before=before: waypoint_requests(layout) > before + 3, "traffic through the waypoint",
                       timeout=60, interval=0.5)
            shoal_cli(layout, "waypoint", "delete", "-n", "demo")
            eventually(lambda: waypoint_gone(layout), "the waypoint pod to go", timeout=30, interval=0.5)
            cycles_done += 1
    finally:
        sampler.join(duration + 90)
        shoal_cli(layout, "waypoint", "delete", "-n", "demo", "--wait", "60", check=False, timeout=120)
        shoal_cli(layout, "apply", "-f", "-", input=DEMO_NS, check=False)
    assert cycles_done == CYCLES
    assert result["sent"] >= duration * 2, result          # at most ~0.5 s per request on average
    if result["failed"] or result["slowest_s"] >= 2.0:
        raise AssertionError(f"{json.dumps(result)}\n{proxy_problems(layout)}")


def proxy_problems(layout) -> str:
    """The node proxies' access-log lines with a response flag, and their warnings (diagnosis)."""
    lines = []
    for path in sorted(layout.log_dir.glob("proxy-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if ('"response_flags":"-"' not in line and '"response_flags"' in line) or " WARNING " in line \
                    or " ERROR " in line:
                lines.append(f"{path.name}: {line[:400]}")
    return "\n".join(lines[-40:])

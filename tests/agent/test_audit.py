"""The capture audit (issue 11, item 4): drift in an enrolled pod's capture is found and put back.

Unit tests drive the audit's bookkeeping with stand-ins; the cluster tests break capture by hand
on the session's demo cluster, as an operator or a CNI restart would, and time the repair.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from shoal.agent.audit import CaptureAudit, Drift
from shoal.agent.metrics import AgentMetrics
from shoal.cli.main import render_capture
from tests.conftest import eventually, pod_exec, shoal_cli, strict_web_manifest

# -- unit: reporting ------------------------------------------------------------------------------


class StandInDatapath:
    def __init__(self, missing):
        self.missing = list(missing)
        self.attached = []

    def missing_cgroup_programs(self, cgroup):
        return self.missing

    def attach_cgroup(self, cgroup):
        self.attached.append(cgroup)
        self.missing = []

    def program_id(self, name):
        return 7


async def test_a_detached_cgroup_program_is_reattached_counted_published_and_recorded(tmp_path):
    metrics = AgentMetrics(CollectorRegistry(), lambda: {})
    published: list[tuple[Drift, list[str]]] = []
    enroller = SimpleNamespace(enrolled={}, programs=None)   # no pod: only the node-level check runs
    datapath = StandInDatapath(["connect4"])
    audit = CaptureAudit(enroller, datapath, Path("/cg"), tmp_path / "audit.json", metrics=metrics,
                         on_drift=lambda drift, ips: published.append((drift, ips)))
    found = await audit.check_once()
    assert [(d.kind, d.repaired) for d in found] == [("cgroup_program", True)]
    assert datapath.attached == [Path("/cg")]
    assert published and published[0][0].kind == "cgroup_program"
    value = metrics.registry.get_sample_value
    assert value("shoal_capture_drift_total", {"kind": "cgroup_program"}) == 1
    assert value("shoal_capture_drift_repaired_total", {"kind": "cgroup_program"}) == 1
    record = json.loads((tmp_path / "audit.json").read_text())
    assert record["drift"] == {"cgroup_program": 1} and record["recent"][0]["detail"].startswith("connect4")
    assert await audit.check_once() == []      # put back: the next pass finds nothing
    assert value("shoal_capture_drift_total", {"kind": "cgroup_program"}) == 1


def test_status_line_says_drift_and_staleness():
    now = 1000.0
    clean = {"time": now - 1, "interval": 3.0, "pods": 4, "drift": {}, "recent": []}
    assert render_capture("node-1", clean, now).endswith("4 pods audited 1.0s ago, no drift")
    drift = {**clean, "drift": {"tc_filter": 2},
             "recent": [{"kind": "tc_filter", "pod": "demo/web-0", "time": now - 1, "repaired": True}]}
    line = render_capture("node-1", drift, now)
    assert "drift: tc_filter 2" in line and "demo/web-0 tc_filter" in line and "repaired" in line
    assert "STALE" in render_capture("node-1", {**clean, "time": now - 60}, now)


# -- cluster: break capture by hand -----------------------------------------------------------------

TARGET = strict_web_manifest("audit", "target-0", node="node-1")

# Runs in the unmeshed legacy/client-0: tries a plaintext request to the target every 50 ms.
PROBER = textwrap.dedent("""
    import json, socket, sys, time
    ip, seconds = sys.argv[1], float(sys.argv[2])
    attempts = answered = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        attempts += 1
        try:
            with socket.create_connection((ip, 8080), timeout=0.5) as sock:
                sock.sendall(b"GET /plaintext HTTP/1.0\\r\\n\\r\\n")
                if sock.recv(64).startswith(b"HTTP/"):
                    answered += 1
        except OSError:
            pass
        time.sleep(0.05)
    print(json.dumps({"attempts": attempts, "answered": answered}))
""")


def audit_record(layout, node: str) -> dict:
    try:
        return json.loads(layout.capture_audit_state(node).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def tc_filters(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "show", "dev", "eth0", "ingress"],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_tc_filter_deleted_by_hand_is_repaired_within_10s_and_plaintext_stays_blocked(demo_cluster):
    layout = demo_cluster.layout
    netns = layout.pod_netns("audit", "target-0")
    try:
        shoal_cli(layout, "apply", "-f", "-", input=TARGET)
        eventually(lambda: pod_exec(layout, "audit/target-0", "true", check=False).returncode == 0,
                   "audit/target-0 running", timeout=60)
        listing = json.loads(shoal_cli(layout, "get", "pods", "-n", "audit", "-o", "json").stdout)
        ip = listing["items"][0]["status"]["podIP"]
        eventually(lambda: "shoal_tc_ingress" in tc_filters(netns), "the target's tc filter")
        before = audit_record(layout, "node-1").get("drift", {}).get("tc_filter", 0)
        # The prober gets answers where plaintext is allowed (demo is PERMISSIVE): a 0 below means blocked.
        web0 = next(p["status"]["podIP"] for p in json.loads(
            shoal_cli(layout, "get", "pods", "-n", "demo", "-o", "json").stdout)["items"] if p["metadata"]["name"] == "web-0")
        control = pod_exec(layout, "legacy/client-0", "python3", "-c", PROBER, web0, "1").stdout
        assert json.loads(control.strip().splitlines()[-1])["answered"] > 0, control

        prober = subprocess.Popen([sys.executable, "-m", "shoal.cli", "exec", "legacy/client-0", "--",
                                   "python3", "-c", PROBER, ip, "12"], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "SHOAL_CLUSTER": layout.name})
        time.sleep(1.0)
        subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "del", "dev", "eth0", "ingress"], check=True)
        removed = time.monotonic()
        assert "shoal_tc_ingress" not in tc_filters(netns)
        eventually(lambda: "shoal_tc_ingress" in tc_filters(netns), "the tc filter put back", timeout=15, interval=0.1)
        repaired_after = time.monotonic() - removed
        out, _ = prober.communicate(timeout=60)
        probes = json.loads(out.strip().splitlines()[-1])
        print(f"\ntc filter deleted by hand: put back after {repaired_after:.1f}s; "
              f"{probes['answered']}/{probes['attempts']} plaintext probes answered meanwhile")
        assert repaired_after < 10.0
        assert probes["attempts"] > 20 and probes["answered"] == 0, probes

        record = eventually(lambda: (r := audit_record(layout, "node-1")).get("drift", {}).get("tc_filter", 0) > before and r,
                            "the drift in the audit record")
        last = [d for d in record["recent"] if d["kind"] == "tc_filter"][-1]
        assert last["pod"] == "audit/target-0" and last["repaired"]
        assert "tc_filter" in shoal_cli(layout, "status").stdout
        flows = shoal_cli(layout, "observe", "--verdict", "AUDIT", "--namespace", "audit", "--last", "20").stdout
        assert "capture drift: tc_filter" in flows and "repaired" in flows
        metrics = subprocess.run(["ip", "netns", "exec", layout.node_netns("node-1"), "curl", "-s",
                                  "http://127.0.0.1:9962/metrics"], capture_output=True, text=True).stdout
        assert 'shoal_capture_drift_total{kind="tc_filter"}' in metrics
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=TARGET, check=False)
        # Later tests of the session's cluster count its pods: this one must be gone.
        eventually(lambda: not json.loads(shoal_cli(layout, "get", "pods", "-n", "audit", "-o", "json").stdout)["items"],
                   "audit/target-0 deleted", timeout=30)


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_a_cgroup_program_detached_by_hand_is_reattached_within_10s(demo_cluster):
    from shoal.agent.loader import CGROUP_PROGRAMS
    from shoal.datapath import bpfsys
    layout = demo_cluster.layout
    spec = next(s for s in CGROUP_PROGRAMS if s.name == "connect4")
    cgroup = layout.node_cgroup("node-2")
    prog_fd = bpfsys.obj_get(layout.bpf_pin_dir("node-2") / "prog_connect4")
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ours = bpfsys.prog_info(prog_fd).id
        assert ours in bpfsys.prog_query(cg_fd, spec.attach_type)
        before = audit_record(layout, "node-2").get("drift", {}).get("cgroup_program", 0)
        bpfsys.prog_detach(prog_fd, cg_fd, spec.attach_type)
        removed = time.monotonic()
        assert ours not in bpfsys.prog_query(cg_fd, spec.attach_type)
        eventually(lambda: bpfsys.prog_query(cg_fd, spec.attach_type), "connect4 attached again", timeout=15, interval=0.1)
        repaired_after = time.monotonic() - removed
        print(f"\nconnect4 detached by hand: attached again after {repaired_after:.1f}s")
        assert repaired_after < 10.0
        record = eventually(lambda: audit_record(layout, "node-2").get("drift", {}).get("cgroup_program", 0) > before,
                            "the drift recorded")
        assert record
        assert ours in bpfsys.prog_query(cg_fd, spec.attach_type)   # ours again, not some other program
    finally:
        os.close(cg_fd)
        os.close(prog_fd)


def test_drift_is_an_endpoint_regeneration_agent_event():
    from shoal.agent.hubble.agentevents import AgentEvents
    from shoal.api.flow import flow_pb2
    events = AgentEvents("node-1")
    events.capture_drift("demo/web-0", "tc_filter", "eth0 ingress has no bpf filter", True)
    events.capture_drift("", "cgroup_program", "connect4 not attached", False)
    first, second = (entry[1] for _, entry in events.store.range(events.store.oldest, events.store.head))
    assert first.type == flow_pb2.ENDPOINT_REGENERATE_SUCCESS
    assert (first.endpoint_update.namespace, first.endpoint_update.pod_name) == ("demo", "web-0")
    assert first.endpoint_update.error == "capture drift: tc_filter: eth0 ingress has no bpf filter"
    assert second.type == flow_pb2.ENDPOINT_REGENERATE_FAILURE and not second.endpoint_update.pod_name

"""Issue 3's "shows when done", on the real local cluster (the session's demo cluster).

Every test undoes what it changes (labels, policies, a killed agent is restarted).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

PROBE = str(Path(__file__).resolve().parent / "podprobe.py")

LEGACY_MESHED = """
apiVersion: v1
kind: Namespace
metadata: {name: legacy, labels: {shoal.io/mesh: enabled}}
"""
LEGACY_PLAIN = """
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"""
DENY = """
apiVersion: security.shoal.io/v1
kind: AuthorizationPolicy
metadata: {name: agent-deny-client-db, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
      to: [{operation: {ports: ["7000"]}}]
---
apiVersion: security.shoal.io/v1
kind: AuthorizationPolicy
metadata: {name: agent-deny-legacy-db, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
    - from: [{source: {namespaces: ["legacy"]}}]
"""


def probe(layout, pod: str, *args: str, timeout: float = 30) -> dict:
    out = pod_exec(layout, pod, "python3", PROBE, *args, timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def datapath(layout, node: str) -> dict:
    return json.loads(shoal_cli(layout, "debug", "bpf", "--node", node, "-o", "json").stdout)


def enrolled(layout, node: str) -> set[str]:
    return {pod["pod"] for pod in datapath(layout, node)["enrolled_pods"]}


def enrolled_in_process(layout, node: str) -> set[str]:
    from shoal.agent.debug import collect
    return {pod["pod"] for pod in collect(layout, node)["enrolled_pods"]}


def test_meshed_client_is_captured_and_legacy_is_not(demo_cluster):
    layout = demo_cluster.layout
    pods = enrolled(layout, "node-1")
    assert "demo/client-0" in pods and "legacy/client-0" not in pods
    vip = eventually(lambda: probe(layout, "demo/client-0", "connect", "web.demo", "8080"), "a connect")
    # captured: the proxy got it, and getpeername4 still shows the app its Service VIP
    assert vip["ok"] and vip["peer"][0].startswith("10.96.") and vip["peer"][1] == 8080
    plain = probe(layout, "legacy/client-0", "connect", "web.demo", "8080")
    # not captured: socket-LB alone, straight to a web pod
    assert plain["ok"] and plain["peer"][0].startswith("10.244.") and plain["peer"][1] == 8080
    counters = datapath(layout, "node-1")["counters"]
    assert counters["connect_redirected"] > 0 and counters["connect_balanced"] > 0


@pytest.mark.skipif(not (shutil.which("iptables-save") and shutil.which("nft")),
                    reason="iptables-save / nft not installed (apt-get install iptables nftables)")
def test_no_iptables_or_nftables_rules_in_pods(demo_cluster):
    layout = demo_cluster.layout
    for namespace, pod in (("demo", "client-0"), ("demo", "web-0"), ("legacy", "client-0")):
        netns = layout.pod_netns(namespace, pod)
        for argv in (["iptables-save"], ["nft", "list", "ruleset"]):
            out = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True)
            assert out.stdout.strip() == "", f"{' '.join(argv)} in {netns}: {out.stdout}"


def test_labelling_a_namespace_enrols_its_running_pod_within_2s(demo_cluster):
    layout = demo_cluster.layout
    try:
        shoal_cli(layout, "apply", "-f", "-", input=LEGACY_MESHED)
        # The clock starts once the label is in (apply returned) and the pinned map is read in-process
        # (the report `shoal debug bpf` prints): a CLI per poll measured its own start-up (2.8-4.7 s
        # under load for a ~0.35 s enrolment), not the property.
        started = time.monotonic()
        eventually(lambda: "legacy/client-0" in enrolled_in_process(layout, "node-1"),
                   "legacy/client-0 enrolled", timeout=10, interval=0.05)
        assert time.monotonic() - started < 2.0
        report = datapath(layout, "node-1")
        legacy = next(p for p in report["enrolled_pods"] if p["pod"] == "legacy/client-0")
        assert legacy["tc"] == ["shoal_tc_ingress"]
        shoal_cli(layout, "apply", "-f", "-", input=LEGACY_PLAIN)
        eventually(lambda: "legacy/client-0" not in enrolled(layout, "node-1"), "legacy/client-0 released")
        plain = probe(layout, "legacy/client-0", "connect", "web.demo", "8080")
        assert plain["ok"] and plain["peer"][0].startswith("10.244.")
    finally:
        shoal_cli(layout, "apply", "-f", "-", input=LEGACY_PLAIN, check=False)


def _dropped_flows(layout, *filters: str) -> list[dict]:
    out = shoal_cli(layout, "observe", "-o", "jsonpb", "--verdict", "DROPPED", "--last", "50", *filters,
                    check=False).stdout
    # jsonpb is Hubble's GetFlowsResponse stream: flows, and node_status/lost_events records too
    responses = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [response["flow"] for response in responses if "flow" in response]


def test_l4_deny_fails_connect_at_the_source_and_drops_syns_at_the_pod(demo_cluster):
    layout = demo_cluster.layout
    try:
        shoal_cli(layout, "apply", "-f", "-", input=DENY)
        eventually(lambda: len(datapath(layout, "node-1")["policy_deny"]) >= 2, "deny entries on node-1")
        eventually(lambda: len(datapath(layout, "node-2")["policy_deny"]) >= 2, "deny entries on node-2")
        denied = probe(layout, "demo/client-0", "connect", "db.demo", "7000")
        assert not denied["ok"] and denied["errno"] == 1 and denied["elapsed"] < 1.0   # EPERM, at once
        dropped = probe(layout, "legacy/client-0", "connect", "db.demo", "7000", "--timeout", "1")
        assert not dropped["ok"]
        assert datapath(layout, "node-2")["counters"]["tc_denied"] >= 1

        def recorded():
            # the connect()-time drop names the Service (its VIP) as destination, the tc drop the pod
            flows = [f for f in _dropped_flows(layout)
                     if f.get("l4", {}).get("TCP", {}).get("destination_port") == 7000]
            sources = {(f.get("source", {}).get("namespace"), f.get("source", {}).get("pod_name")) for f in flows}
            return flows if {("demo", "client-0"), ("legacy", "client-0")} <= sources else None
        flows = eventually(recorded, "DROPPED flows from both clients", timeout=30, interval=0.5)
        assert all(f.get("drop_reason_desc") for f in flows)
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=DENY, check=False)
    eventually(lambda: not datapath(layout, "node-1")["policy_deny"], "deny entries removed")
    # leave the cluster as found: the proxies drop their copy of the policy on their own stream
    eventually(lambda: _db_session_works(layout), "client-0 -> db allowed again", timeout=60, interval=0.5)


def _db_session_works(layout) -> bool:
    out = pod_exec(layout, "demo/client-0", "python3", PROBE, "session", "db.demo", "7000", check=False).stdout
    lines = out.strip().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("replies") == ["ok one", "ok two"]


def test_db_session_survives_sigkill_of_the_agent(demo_cluster):
    """SIGKILL of node-1's agent (its process, or with SHOAL_TEST_CONTAINERS=1 its container),
    then a new one (a process; the same container started again, as the kubelet does)."""
    layout = demo_cluster.layout
    component = next(c for c in demo_cluster.node_components("node-1") if c.name == "agent-node-1")
    env = {**os.environ, "SHOAL_CLUSTER": layout.name}
    eventually(lambda: _db_session_works(layout), "a working client-0 -> db path", timeout=60, interval=0.5)
    session = subprocess.Popen([sys.executable, "-m", "shoal", "exec", "demo/client-0", "--", "python3", PROBE,
                                "session", "db.demo", "7000", "--hold", "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    restarted = False
    try:
        time.sleep(2.5)   # the session is established and has had its first exchange
        programs_before = {p["name"]: p.get("id") for p in datapath(layout, "node-1")["programs"]}
        demo_cluster.crash(component)
        # no agent: capture keeps working from the pinned state
        during = probe(layout, "demo/client-0", "connect", "web.demo", "8080")
        assert during["ok"] and during["peer"][0].startswith("10.96.")
        demo_cluster.recover(component)
        restarted = True
        eventually(lambda: {p["name"]: p.get("id") for p in datapath(layout, "node-1")["programs"]}
                   != programs_before, "the new agent's programs attached", timeout=60, interval=0.5)
        out, err = session.communicate(timeout=60)
        assert out.strip(), f"session printed nothing: {err[-1500:]}"
        result = json.loads(out.strip().splitlines()[-1])
        assert result["replies"] == ["ok one", "ok two"], (result, err)
        after = probe(layout, "demo/client-0", "connect", "web.demo", "8080")
        assert after["ok"] and after["peer"][0].startswith("10.96.")
        assert "demo/client-0" in enrolled(layout, "node-1")
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        if not restarted:
            demo_cluster.recover(component)


UDP_ECHO = """
apiVersion: v1
kind: Pod
metadata:
  name: udp-echo-0
  namespace: demo
  labels: {app: udp-echo}
spec:
  nodeName: node-2
  serviceAccountName: default
  containers:
    - name: echo
      command: [python3, -c, "import socket\\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\\ns.bind(('0.0.0.0', 5353))\\nwhile True:\\n    d, p = s.recvfrom(64)\\n    s.sendto(b'pong:' + d, p)\\n"]
---
apiVersion: v1
kind: Service
metadata: {name: udp-echo, namespace: demo}
spec:
  selector: {app: udp-echo}
  ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP}]
"""
UDP_STRICT = """
apiVersion: security.shoal.io/v1
kind: PeerAuthentication
metadata: {name: agent-udp-strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
"""
PODCLIENT = str(Path(__file__).resolve().parent / "podclient.py")


def udp_client(layout, pod: str, host: str, mode: str) -> dict:
    out = pod_exec(layout, pod, "python3", PODCLIENT, host, "53", "--udp", mode, "--timeout", "2",
                   check=False).stdout
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {"ok": False, "error": "no output"}


def test_udp_service_is_programmed_and_answers_from_its_cluster_ip(demo_cluster):
    """Issue 12: UDP Services were listed but never programmed (`services (0)`)."""
    layout = demo_cluster.layout
    try:
        shoal_cli(layout, "apply", "-f", "-", input=UDP_ECHO)

        def programmed():
            rows = [s for s in datapath(layout, "node-1")["services"] if s["proto"] == "UDP"]
            return rows if rows and rows[0]["backends"] else None
        service = eventually(programmed, "the UDP service in node-1's map")[0]
        vip = service["service"].rsplit(":", 1)[0]
        for pod in ("demo/client-0", "legacy/client-0"):
            for host in (vip, f"::ffff:{vip}"):
                for mode in ("connect", "sendto"):
                    answer = eventually(lambda p=pod, h=host, m=mode: (r := udp_client(layout, p, h, m))["ok"] and r,
                                        f"{pod} -> {host} ({mode})")
                    assert answer["reply"] == "pong:ping" and answer["source"] == [host, 53]
        # STRICT (issue 11): plaintext UDP from outside the mesh no longer reaches the pod, in the
        # kernel; meshed sources still do (UDP is never tunnelled)
        shoal_cli(layout, "apply", "-f", "-", input=UDP_STRICT)
        eventually(lambda: any("strict" in e["flags"] for e in datapath(layout, "node-2")["identities"]),
                   "STRICT in node-2's ipcache")
        eventually(lambda: not udp_client(layout, "legacy/client-0", vip, "sendto")["ok"], "legacy UDP dropped")
        assert udp_client(layout, "demo/client-0", vip, "sendto")["ok"]
        assert datapath(layout, "node-2")["counters"]["tc_udp_strict"] > 0
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=UDP_STRICT, check=False)
        shoal_cli(layout, "delete", "-f", "-", input=UDP_ECHO, check=False)

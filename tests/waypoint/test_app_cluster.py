"""Issue 6's "shows when done", on the real local cluster (the session's demo cluster).

A waypoint for `demo`, the namespace labelled to use it; then: a 90/10 HTTPRoute split,
a 50 % abort fault recovered by retries, a 100 ms request timeout against a 1 s delay,
an L7 DENY answering 403 and visible in the flows, and the label removed sending traffic
back to the L4 path without a restart. Everything applied here is removed at the end.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

LOAD = str(Path(__file__).resolve().parent / "podload.py")

SPLIT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-v2, namespace: demo}
spec:
  replicas: 1
  template:
    metadata: {labels: {app: web, version: v2}}
    spec:
      serviceAccountName: web
      containers:
        - name: web
          command: [python3, -m, shoal.local.demo.apps, web, --port, "8080"]
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: demo}
spec:
  selector: {app: web, version: v1}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: demo}
spec:
  selector: {app: web, version: v2}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-split, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 8080}]
  rules:
    - backendRefs:
        - {name: web-v1, port: 8080, weight: 90}
        - {name: web-v2, port: 8080, weight: 10}
"""
FAULT_AND_RETRY = """
apiVersion: networking.shoal.io/v1
kind: TrafficPolicy
metadata: {name: wp-test-resilience, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: web}]
  faults: {abort: {httpStatus: 503, percentage: 50}}
  retries: {attempts: 3, retryOn: [5xx]}
"""
TIMEOUT = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wp-test-timeout, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      backendRefs: [{name: web, port: 8080}]
      timeouts: {request: 100ms}
---
apiVersion: networking.shoal.io/v1
kind: TrafficPolicy
metadata: {name: wp-test-delay, namespace: demo}
spec:
  targetRefs: [{kind: Service, name: web}]
  faults: {delay: {fixedDelay: 1s, percentage: 100}}
"""
DENY = """
apiVersion: security.shoal.io/v1
kind: AuthorizationPolicy
metadata: {name: wp-test-no-admin-delete, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]   # enforced by web's waypoint, not the node proxies
  action: DENY
  rules:
    - to: [{operation: {methods: [DELETE], paths: ["/admin*"]}}]
"""
DEMO_NS = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {shoal.io/mesh: enabled}}
"""


def load(layout, count: int, *extra: str, connections: int = 1, timeout: float = 240) -> dict:
    out = pod_exec(layout, "demo/client-0", "python3", LOAD, "web.demo", "8080", str(count),
                   "--connections", str(connections), *extra, timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def waypoint_requests(layout) -> int:
    return shoal_cli(layout, "logs", "demo/waypoint-0", "--tail", "1000000", check=False).stdout.count('"response_code"')


@pytest.fixture(scope="module")
def waypoint(demo_cluster):
    layout = demo_cluster.layout
    shoal_cli(layout, "waypoint", "apply", "-n", "demo", "--enroll-namespace")
    try:
        eventually(lambda: "Running" in shoal_cli(layout, "waypoint", "list").stdout, "the waypoint pod", timeout=60, interval=0.5)
        # Traffic of the demo client goes through the waypoint once config reached the nodes.
        try:
            eventually(lambda: load(layout, 5)["statuses"].get("200") == 5 and waypoint_requests(layout) > 0, "requests through the waypoint", timeout=90, interval=0.5)
        except AssertionError as err:
            logs = shoal_cli(layout, "logs", "demo/waypoint-0", check=False)
            raise AssertionError(f"{err}\nwaypoint log:\n{(logs.stdout + logs.stderr)[-3000:]}") from None
        yield layout
    finally:
        shoal_cli(layout, "apply", "-f", "-", input=DEMO_NS, check=False)
        # --wait: the pod drains after its Gateway goes; the next module must not find it.
        shoal_cli(layout, "waypoint", "delete", "-n", "demo", "--wait", "60", check=False, timeout=120)


def test_http_route_splits_90_10(waypoint):
    layout = waypoint
    shoal_cli(layout, "apply", "-f", "-", input=SPLIT)
    try:
        eventually(lambda: "web-v2-0" in load(layout, 20)["backends"], "web-v2 to serve", timeout=60, interval=0.5)
        result = load(layout, 2000, connections=4)
        assert result["statuses"] == {"200": 2000}, result
        v2 = result["backends"].get("web-v2-0", 0) / 2000
        assert abs(v2 - 0.10) <= 0.03, result
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=SPLIT, check=False)


def test_fault_abort_with_retries_succeeds(waypoint):
    layout = waypoint
    shoal_cli(layout, "apply", "-f", "-", input=FAULT_AND_RETRY)
    try:
        time.sleep(2)
        result = load(layout, 200)
        assert result["statuses"].get("200", 0) >= 198, result
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=FAULT_AND_RETRY, check=False)


def test_request_timeout_answers_504_in_about_100ms(waypoint):
    layout = waypoint
    shoal_cli(layout, "apply", "-f", "-", input=TIMEOUT)
    try:
        eventually(lambda: load(layout, 1, "--path", "/slow")["statuses"].get("504"), "the timeout route", timeout=30, interval=0.5)
        result = load(layout, 5, "--path", "/slow")
        assert result["statuses"] == {"504": 5}, result
        assert 90 <= result["p50_ms"] <= 400, result
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=TIMEOUT, check=False)


@contextlib.contextmanager
def l7_deny_in_force(layout) -> Iterator[None]:
    """The DENY policy applied and answering (a DELETE to /admin/users gets 403); removed after."""
    shoal_cli(layout, "apply", "-f", "-", input=DENY)
    try:
        eventually(lambda: load(layout, 1, "--method", "DELETE", "--path", "/admin/users")["statuses"].get("403"), "the L7 deny", timeout=30, interval=0.5)
        yield
    finally:
        shoal_cli(layout, "delete", "-f", "-", input=DENY, check=False)


def test_l7_deny_answers_403_and_shows_in_flows(waypoint):
    layout = waypoint
    with l7_deny_in_force(layout):
        assert load(layout, 3, "--method", "DELETE", "--path", "/admin/x")["statuses"] == {"403": 3}
        # Reported by the agent of the waypoint's node (whichever it is), through the relay.
        def denied_in_flows() -> bool:
            flows = shoal_cli(layout, "observe", "--namespace", "demo", "--last", "200", check=False).stdout
            return any("403" in line and "DELETE" in line and "DROPPED" in line for line in flows.splitlines())
        eventually(denied_in_flows, "the 403 as a DROPPED L7 flow in shoal observe", timeout=15, interval=0.5)


def test_l7_deny_leaves_other_requests_alone(waypoint):
    layout = waypoint
    with l7_deny_in_force(layout):
        assert load(layout, 3, "--method", "GET", "--path", "/admin/users")["statuses"] == {"200": 3}


def restarts(layout) -> dict[str, int]:
    pods = json.loads(shoal_cli(layout, "get", "pods", "-n", "demo", "-o", "json").stdout)["items"]
    return {p["metadata"]["name"]: (p.get("status") or {}).get("restartCount", 0) for p in pods}


def test_removing_the_label_goes_back_to_l4_without_restart(waypoint):
    layout = waypoint
    before_restarts = restarts(layout)
    shoal_cli(layout, "apply", "-f", "-", input=DEMO_NS)
    try:
        time.sleep(3)
        before = waypoint_requests(layout)
        result = load(layout, 10)
        assert result["statuses"] == {"200": 10}, result
        assert waypoint_requests(layout) == before  # straight through the L4 path
        assert restarts(layout) == before_restarts
    finally:
        shoal_cli(layout, "waypoint", "apply", "-n", "demo", "--enroll-namespace")


def metric_samples(text: str, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    """``name``'s samples (Prometheus text) whose labels include ``match``: (labels, value)."""
    import re

    found = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        end = line.rindex("}")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[len(name) + 1:end]))
        if all(labels.get(k) == v for k, v in match.items()):
            found.append((labels, float(line[end + 1:].split()[0])))
    return found


def metric_label_sets(text: str, name: str, **match: str) -> list[dict[str, str]]:
    """The label sets of ``name``'s samples whose labels include ``match``."""
    return [labels for labels, _ in metric_samples(text, name, **match)]


def grown_label_sets(before: str, after: str, name: str, **match: str) -> list[dict[str, str]]:
    """The label sets of ``name``'s samples that grew from ``before`` to ``after``: what the
    requests in between produced, not what the cluster recorded since it started. Summed
    per label set: both nodes' proxies may report the same one (web-0 and web-1)."""
    def totals(text: str) -> dict[tuple, float]:
        summed: dict[tuple, float] = {}
        for labels, value in metric_samples(text, name, **match):
            key = tuple(sorted(labels.items()))
            summed[key] = summed.get(key, 0.0) + value
        return summed
    old = totals(before)
    return [dict(key) for key, value in totals(after).items() if value > old.get(key, 0.0)]


METRICS_GET = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:15020/metrics', timeout=5).read().decode())"


def node_proxy_metrics(layout) -> str:
    import subprocess
    import sys

    return "\n".join(subprocess.run(["ip", "netns", "exec", layout.node_netns(node), sys.executable, "-c", METRICS_GET],
                                    capture_output=True, text=True, timeout=30).stdout
                     for node in ("node-1", "node-2"))


def test_node_proxy_and_waypoint_report_the_same_istio_labels(waypoint):
    """The same request (client-0 -> web), once on the L4 path only and once through the
    waypoint: the node proxy (destination reporter) and the waypoint label it alike."""
    from shoal.telemetry_labels import TCP_LABELS

    layout = waypoint
    client = {"source_workload": "client-0", "source_workload_namespace": "demo",
              "destination_service": "web.demo.svc.cluster.local",
              "destination_workload": "web"}
    shoal_cli(layout, "apply", "-f", "-", input=DEMO_NS)   # L4 only
    try:
        time.sleep(3)
        # The label sets these 5 requests produced: the cluster's earlier ones may include a
        # connection web-1's app refused while it was still starting (UF), which is right.
        metrics_before = node_proxy_metrics(layout)
        assert load(layout, 5)["statuses"] == {"200": 5}
        l4 = grown_label_sets(metrics_before, node_proxy_metrics(layout), "istio_tcp_connections_opened_total",
                              reporter="destination", **client)
    finally:
        shoal_cli(layout, "waypoint", "apply", "-n", "demo", "--enroll-namespace")
    before = waypoint_requests(layout)
    eventually(lambda: load(layout, 5)["statuses"] == {"200": 5} and waypoint_requests(layout) > before,
               "requests through the waypoint again", timeout=60, interval=0.5)
    out = pod_exec(layout, "demo/waypoint-0", "python3", "-c", METRICS_GET).stdout
    # Clean successes only: earlier tests of this module injected faults on this path (an
    # aborted attempt that a retry recovered is a 200 with flag FI).
    l7 = metric_label_sets(out, "istio_requests_total", reporter="waypoint", response_code="200",
                           response_flags="-", **client)
    assert l4 and l7, (l4, l7)
    per_protocol = {"reporter", "request_protocol", "response_flags"}
    shared = [k for k in TCP_LABELS if k not in per_protocol]
    assert {tuple(s[k] for k in shared) for s in l4} == {tuple(s[k] for k in shared) for s in l7}
    # Istio's semantics, not just agreement.
    sample = l7[0]
    assert set(TCP_LABELS) | {"response_code", "grpc_response_status"} <= set(sample)
    assert sample["source_principal"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert sample["destination_principal"] == "spiffe://cluster.local/ns/demo/sa/web"
    assert sample["source_workload_namespace"] == "demo" and sample["source_canonical_service"] == "client"
    assert sample["destination_canonical_service"] == "web" and sample["destination_canonical_revision"] == "v1"
    assert sample["destination_service_name"] == "web" and sample["destination_service_namespace"] == "demo"
    assert sample["connection_security_policy"] == "mutual_tls"
    assert {s["response_flags"] for s in l4} == {"-"}, [s["response_flags"] for s in l4]   # normal closes: no UR

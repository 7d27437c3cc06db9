"""The service map: edges counted once, denied and plaintext edges, rates, namespaces, bounds."""
from __future__ import annotations

import time

from shoal.cli.ui.graph import ServiceMap
from shoal.flows.records import http_flow, l4_flow

NOW = time.time_ns()



def endpoint(ep, namespace, pod, workload=None, identity=0, sa=None):
    ep.namespace, ep.pod_name, ep.identity = namespace, pod, identity
    if workload:
        ep.workloads.add(name=workload, kind="Deployment")
    if sa:
        ep.labels.append(f"k8s:io.cilium.k8s.policy.serviceaccount={sa}")



def proxied(port, ts, *, verdict="FORWARDED", mtls=True, service="web", backend="web-0"):
    flow = l4_flow("10.244.1.2", port, "10.244.2.3", 8080, event="open", verdict=verdict, mtls=mtls,
                   src_spiffe="spiffe://cluster.local/ns/demo/sa/client",
                   dst_spiffe="spiffe://cluster.local/ns/demo/sa/web", ts_ns=ts,
                   drop_reason=181 if verdict == "DROPPED" else 0)
    endpoint(flow.source, "demo", "client-0", "client", 256, "client")
    if backend:
        endpoint(flow.destination, "demo", backend, "web", 258, "web")
    if service:
        flow.destination_service.name, flow.destination_service.namespace = service, "demo"
    return flow



def edges_by_id(snapshot):
    return {edge["id"]: edge for edge in snapshot["edges"]}



def test_connections_are_counted_once_across_observation_points():
    graph = ServiceMap(window_s=10)
    for second in range(5):
        for _ in range(3):          # client proxy open, server proxy open, close: one socket
            graph.add(proxied(40000 + second, NOW - second * 10**9))
    edges = edges_by_id(graph.snapshot(NOW, None))
    client_web = edges["workload:demo/client->service:demo/web"]
    assert client_web["connections_per_s"] == 0.5
    assert client_web["mtls"] == "all" and client_web["verdict"] == "forwarded"
    assert "service:demo/web->workload:demo/web" in edges
    assert client_web["identities"] == [
        "spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/web"]



def test_a_drop_turns_the_edge_denied_and_forwarding_clears_it():
    graph = ServiceMap()
    graph.add(proxied(40000, NOW - 2 * 10**9))
    graph.add(proxied(40001, NOW - 10**9, verdict="DROPPED", mtls=False, backend=None))
    edge = edges_by_id(graph.snapshot(NOW, None))["workload:demo/client->service:demo/web"]
    assert edge["verdict"] == "denied" and edge["drop_reason"] == "POLICY_DENY"
    graph.add(proxied(40002, NOW))
    edge = edges_by_id(graph.snapshot(NOW, None))["workload:demo/client->service:demo/web"]
    assert edge["verdict"] == "forwarded"



def test_plaintext_and_error_rate():
    graph = ServiceMap()
    graph.add(proxied(40000, NOW, mtls=False))
    for code, port in ((200, 1), (503, 2), (200, 3), (500, 4)):
        response = http_flow("10.244.2.3", 8080, "10.244.1.2", 50000 + port, kind="response", method="GET",
                             url="/", code=code, ts_ns=NOW)
        endpoint(response.source, "demo", "web-0", "web")
        endpoint(response.destination, "demo", "client-0", "client")
        graph.add(response)
    edges = edges_by_id(graph.snapshot(NOW, None))
    assert edges["workload:demo/client->service:demo/web"]["mtls"] == "none"
    assert edges["workload:demo/client->workload:demo/web"]["error_rate"] == 0.5



def test_namespace_view_and_expiry():
    graph = ServiceMap(window_s=10, expire_s=60)
    graph.add(proxied(40000, NOW - 120 * 10**9))
    assert graph.snapshot(NOW, None)["edges"] == []          # idle longer than expire_s
    graph.add(proxied(40001, NOW))
    assert graph.snapshot(NOW, "other")["edges"] == []
    assert len(graph.snapshot(NOW, "demo")["edges"]) == 2



def test_edges_are_bounded():
    graph = ServiceMap(max_edges=10)
    for index in range(50):
        graph.add(proxied(40000 + index, NOW, service=f"svc-{index}", backend=None))
    assert len(graph.edges) <= 10

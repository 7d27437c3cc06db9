"""The agent's compiler: policies, services and endpoints to kernel map entries."""
from __future__ import annotations

import pytest

from shoal.agent import compiler
from shoal.xds import model as m


def wl(name, ns="demo", sa=None, ip="10.244.1.2", identity=100, node="node-1", meshed=True, labels=None):
    return m.Workload(uid=f"{ns}/{name}", name=name, namespace=ns, service_account=sa or name, node=node, ip=ip,
                      identity=identity, spiffe_id=f"spiffe://cluster.local/ns/{ns}/sa/{sa or name}",
                      meshed=meshed, labels=m.Labels(labels or {"app": name}))



CLIENT = wl("client-0", sa="client", ip="10.244.1.2", identity=100)



DB = wl("db-0", sa="db", ip="10.244.2.2", identity=200, node="node-2", labels={"app": "db"})



LEGACY = wl("client-0", ns="legacy", sa="default", ip="10.244.1.4", identity=300, meshed=False)



ALL = [CLIENT, DB, LEGACY]



def deny(rules, selector=None, ns="demo", name="deny-db"):
    return m.Authorization(name=name, namespace=ns, action="DENY", selector=m.Labels({"app": "db"} if selector is None else selector),
                           rules=tuple(rules))



def both(src, dst, port):
    """A DENY entry holds for TCP and UDP alike."""
    return {compiler.PolicyEntry(src, dst, port, 6), compiler.PolicyEntry(src, dst, port, 17)}



def test_deny_by_principal_and_port_compiles_to_identity_keys():
    policy = deny([m.Rule(sources=(m.Source(principals=("cluster.local/ns/demo/sa/client",)),),
                          operations=(m.Operation(ports=(7000,)),))])
    entries, skipped = compiler.deny_entries([policy], ALL)
    assert set(entries) == both(100, 200, 7000)
    assert set(entries.values()) == {compiler.rule_id(policy)} and not skipped



def test_deny_by_namespace_covers_every_identity_of_the_namespace_and_any_port():
    policy = deny([m.Rule(sources=(m.Source(namespaces=("legacy",)),))])
    entries, _ = compiler.deny_entries([policy], ALL)
    assert set(entries) == both(300, 200, 0)



def test_rule_without_sources_denies_any_source():
    entries, _ = compiler.deny_entries([deny([m.Rule(operations=(m.Operation(ports=(7000, 7001)),))])], ALL)
    assert set(entries) == both(0, 200, 7000) | both(0, 200, 7001)



@pytest.mark.parametrize("rule", [
    m.Rule(operations=(m.Operation(methods=("GET",)),)),
    m.Rule(sources=(m.Source(ip_blocks=("10.0.0.0/8",)),)),
    m.Rule(sources=(m.Source(not_namespaces=("demo",)),)),
    m.Rule(sources=(m.Source(principals=("*",)),)),
    m.Rule(conditions=(m.Condition("request.headers[x]", ("1",)),)),
])
def test_non_l4_rules_are_left_to_the_proxy(rule):
    entries, skipped = compiler.deny_entries([deny([rule])], ALL)
    assert entries == {} and skipped and skipped[0].policy == "demo/deny-db"



def test_allow_policies_and_ruleless_deny_compile_to_nothing():
    allow = m.Authorization(name="a", namespace="demo", action="ALLOW", rules=(m.Rule(),))
    entries, _ = compiler.deny_entries([allow, deny([])], ALL)
    assert entries == {}



def test_selector_narrower_than_an_identity_is_not_compiled():
    twin = wl("db-1", sa="db", ip="10.244.2.9", identity=200, labels={"app": "db", "canary": "yes"})
    policy = deny([m.Rule()], selector={"canary": "yes"})
    entries, skipped = compiler.deny_entries([policy], ALL + [twin])
    assert entries == {} and "narrower" in skipped[0].reason



def test_mesh_wide_policy_from_the_root_namespace():
    policy = deny([m.Rule(sources=(m.Source(namespaces=("legacy",)),))], selector={}, ns="shoal-system")
    entries, _ = compiler.deny_entries([policy], ALL)
    assert {e.dst_identity for e in entries} == {100, 200, 300}



def test_services_resolve_endpoints_to_target_ports():
    web0, web1 = wl("web-0", ip="10.244.1.3", identity=5), wl("web-1", ip="10.244.2.3", identity=5, node="node-2")
    service = m.Service(name="web", namespace="demo", vip="10.96.0.20",
                        ports=(m.ServicePort("http", 8080, 8080), m.ServicePort("alt", 80, 8080)),
                        endpoints=("demo/web-0", "demo/web-1", "demo/gone"))
    out = compiler.services([service], {w.uid: w for w in (web0, web1)})
    assert out == {("10.96.0.20", 8080, 6): (("10.244.1.3", 8080), ("10.244.2.3", 8080)),
                   ("10.96.0.20", 80, 6): (("10.244.1.3", 8080), ("10.244.2.3", 8080))}



def test_dual_stack_and_udp_services_pair_each_vip_with_backends_of_its_family():
    web0 = m.Workload(uid="demo/web-0", name="web-0", namespace="demo", service_account="web", node="node-1",
                      ip="10.244.1.3", ips=("10.244.1.3", "fd00:10:244:1::3"), identity=5, spiffe_id="x", meshed=True)
    web1 = wl("web-1", ip="10.244.2.3", identity=5)          # IPv4 only
    service = m.Service(name="dns", namespace="demo", vip="10.96.0.10", vips=("10.96.0.10", "fd00:10:96::a"),
                        ports=(m.ServicePort("dns", 53, 5353, "UDP"), m.ServicePort("dns-tcp", 53, 5353, "TCP"),
                               m.ServicePort("sctp", 9, 9, "SCTP")),
                        endpoints=("demo/web-0", "demo/web-1"))
    out = compiler.services([service], {w.uid: w for w in (web0, web1)})
    assert out == {("10.96.0.10", 53, 17): (("10.244.1.3", 5353), ("10.244.2.3", 5353)),
                   ("10.96.0.10", 53, 6): (("10.244.1.3", 5353), ("10.244.2.3", 5353)),
                   ("fd00:10:96::a", 53, 17): (("fd00:10:244:1::3", 5353),),
                   ("fd00:10:96::a", 53, 6): (("fd00:10:244:1::3", 5353),)}



def test_endpoints_mark_meshed_and_local():
    out = compiler.endpoints(ALL, "node-1")
    assert out["10.244.1.2"].flags == 3 and out["10.244.2.2"].flags == 1 and out["10.244.1.4"].flags == 2
    assert out["10.244.1.2"].ns_id == out["10.244.2.2"].ns_id != out["10.244.1.4"].ns_id
    strict = m.Workload(uid="demo/s-0", name="s-0", namespace="demo", service_account="s", node="node-1",
                        ip="10.244.1.9", ips=("10.244.1.9", "fd00:10:244:1::9"), identity=9, spiffe_id="x",
                        meshed=True, mtls_mode="STRICT")
    out = compiler.endpoints([strict], "node-1")
    assert out["10.244.1.9"] == out["fd00:10:244:1::9"] and out["10.244.1.9"].flags == 1 | 2 | 4



@pytest.mark.parametrize("resource", [
    wl("x", ip="not-an-ip"),
    wl("x", identity=2),
    m.Service(name="s", namespace="demo", vip="10.96.0.1", ports=(m.ServicePort("p", 0, 80),)),
    m.Service(name="s", namespace="demo", vip="nope"),
    m.Authorization(name="p", namespace="demo", action="MAYBE"),
    deny([m.Rule(operations=(m.Operation(ports=(70000,)),))]),
])
def test_malformed_resources_are_rejected(resource):
    with pytest.raises(ValueError):
        compiler.validate(resource)



def test_policies_attached_to_a_waypoint_or_service_stay_out_of_the_kernel():
    policy = m.Authorization(name="l7", namespace="demo", action="DENY",
                             rules=(m.Rule(sources=(m.Source(namespaces=("legacy",)),)),),
                             target_refs=(m.TargetRef(kind="Service", name="db"),))
    entries, _ = compiler.deny_entries([policy], ALL)
    assert entries == {}

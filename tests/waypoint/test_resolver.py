"""Services, endpoints, policies and source workloads from ConfigState."""
from shoal.waypoint.http import PeerInfo
from shoal.waypoint.resolver import StateResolver, service_name_from_host, split_host
from shoal.waypoint.routing import ServiceKey
from shoal.xds import model as m
from shoal.xds.state import ConfigState


def workload(name, ip, labels, meshed=True):
    return m.Workload(name, name, "demo", "web", "node-1", ip, 7, f"spiffe://cluster.local/ns/demo/sa/{name}",
                      meshed=meshed, labels=m.Labels(labels), canonical_service=labels.get("app", ""))


def state():
    s = ConfigState()
    s.apply(m.ConfigDelta("1", upserted=(
        workload("web-0", "10.244.1.3", {"app": "web"}),
        workload("web-1", "10.244.2.3", {"app": "web"}, meshed=False),
        workload("client-0", "10.244.1.2", {"app": "client"}),
        m.Service("web", "demo", "10.96.0.10", (m.ServicePort("http", 80, 8080),), ("web-0", "web-1")),
        m.Authorization("web-only", "demo", "DENY", selector=m.Labels({"app": "web"})),
        m.Authorization("client-only", "demo", "DENY", selector=m.Labels({"app": "client"})),
        m.Authorization("mesh-wide", "shoal-system", "ALLOW"),
    )))
    return s


def test_service_by_vip_then_by_host():
    r = StateResolver(state(), "demo")
    by_vip = r.service_for(PeerInfo("10.244.1.2", 0, destination_ip="10.96.0.10", destination_port=80), "ignored")
    assert by_vip.key == ServiceKey("demo", "web", 80) and by_vip.fqdn == "web.demo.svc.cluster.local"
    assert r.service_for(PeerInfo("1.2.3.4", 0), "web.demo.svc.cluster.local:80").key.name == "web"
    assert r.service_for(PeerInfo("1.2.3.4", 0), "web").key == ServiceKey("demo", "web", 80)
    assert r.service_for(PeerInfo("1.2.3.4", 0), "example.com") is None


def test_endpoints_use_target_ports_and_transport():
    eps = {e.name: e for e in StateResolver(state(), "demo").endpoints("demo", "web", 80)}
    assert eps["web-0"].port == 8080 and eps["web-0"].protocol == "HBONE" and eps["web-0"].app == "web"
    assert eps["web-1"].protocol == "TCP"  # not in the mesh: plain TCP
    assert StateResolver(state(), "demo").endpoints("demo", "nope", 80) is None


def test_policies_are_those_of_the_endpoints_and_mesh_wide():
    keys = sorted(p.key for p in StateResolver(state(), "demo").policies_for(ServiceKey("demo", "web", 80)))
    assert keys == ["demo/web-only", "shoal-system/mesh-wide"]


def test_source_workload_and_host_parsing():
    info = StateResolver(state(), "demo").workload_by_ip("10.244.1.2")
    assert (info.name, info.namespace, info.app) == ("client-0", "demo", "client")
    assert split_host("[fd00::1]:80") == ("fd00::1", 80) and split_host("Web.Demo") == ("web.demo", None)
    assert service_name_from_host("web.demo.svc", "x") == ("demo", "web")
    assert service_name_from_host("a.b.c.d", "x") is None


def test_lookups_are_remembered_until_the_next_config_push():
    s = state()
    r = StateResolver(s, "demo")
    peer = PeerInfo("10.244.1.2", 0, destination_ip="10.96.0.10", destination_port=80)
    key = ServiceKey("demo", "web", 80)
    first = r.endpoints("demo", "web", 80)
    assert r.endpoints("demo", "web", 80) is first           # no new Endpoint objects per request
    assert r.service_for(peer, "x") is r.service_for(peer, "x")
    assert {p.key for p in r.policies_for(key)} >= {"demo/web-only"}
    assert r.workload_by_ip("10.244.9.9") is None
    s.apply(m.ConfigDelta("2", upserted=(
        workload("web-2", "10.244.2.4", {"app": "web"}),
        workload("late", "10.244.9.9", {"app": "late"}),
        m.Service("web", "demo", "10.96.0.10", (m.ServicePort("http", 80, 9090),), ("web-0", "web-2")),
    ), removed=(m.resource_key(m.Authorization("web-only", "demo", "DENY")),)))
    assert sorted((e.name, e.port) for e in r.endpoints("demo", "web", 80)) == [("web-0", 9090), ("web-2", 9090)]
    assert "demo/web-only" not in {p.key for p in r.policies_for(key)}
    assert r.workload_by_ip("10.244.9.9").name == "late"

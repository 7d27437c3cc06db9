"""Outbound decisions (pure): HBONE to meshed pods and VIPs, waypoints, passthrough."""
from __future__ import annotations

from shoal.agent.ztunnel.outbound import plan_route
from shoal.xds.model import ConfigDelta, Service, ServicePort, Waypoint, WaypointRef
from shoal.xds.state import ConfigState
from tests.agent.ztunnel.proxybed import workload

WEB0 = workload("web-0", "10.244.1.3", "web")
WEB1 = workload("web-1", "10.244.2.3", "web")
LEGACY = workload("legacy-0", "10.244.1.4", "default", ns="legacy", meshed=False, protocol="TCP")
WAYPOINT = Waypoint("waypoint", "demo", "10.244.2.9", "waypoint", "spiffe://cluster.local/ns/demo/sa/waypoint")


def state(*resources) -> ConfigState:
    st = ConfigState()
    st.apply(ConfigDelta("1", upserted=(WEB0, WEB1, LEGACY, WAYPOINT, *resources)))
    return st


def test_meshed_pod_gets_hbone_with_its_identity():
    route = plan_route(state(), "10.244.2.3", 8080)
    assert (route.kind, route.target_ip, route.target_port) == ("hbone", "10.244.2.3", 15008)
    assert (route.authority_ip, route.authority_port, route.identity) == ("10.244.2.3", 8080, WEB1.spiffe_id)


def test_vip_is_balanced_over_endpoints_with_target_port():
    svc = Service("web", "demo", "10.96.0.10", (ServicePort("http", 80, 8080),), (WEB0.uid, WEB1.uid))
    picked = [plan_route(state(svc), "10.96.0.10", 80, choose=lambda eps, i=i: eps[i]) for i in (0, 1)]
    assert {r.target_ip for r in picked} == {"10.244.1.3", "10.244.2.3"}
    assert all(r.kind == "hbone" and r.authority_port == 8080 and r.service == "web.demo.svc.cluster.local" for r in picked)


def test_vip_without_that_port_or_endpoints_has_no_route():
    svc = Service("web", "demo", "10.96.0.10", (ServicePort("http", 80, 8080),), ())
    assert plan_route(state(svc), "10.96.0.10", 81).kind == "none"
    assert plan_route(state(svc), "10.96.0.10", 80).kind == "none"


def test_service_waypoint_gets_the_vip_as_authority():
    svc = Service("web", "demo", "10.96.0.10", (ServicePort("http", 80, 8080),), (WEB0.uid,),
                  waypoint=WaypointRef("demo", "waypoint"))
    route = plan_route(state(svc), "10.96.0.10", 80)
    assert (route.kind, route.target_ip, route.target_port) == ("waypoint", "10.244.2.9", 15008)
    assert (route.authority_ip, route.authority_port, route.identity) == ("10.96.0.10", 80, WAYPOINT.spiffe_id)


def test_the_tunnel_to_a_waypoint_runs_in_the_family_the_app_used():
    """The waypoint listens on both families: an IPv6 VIP reaches it at its IPv6 address; a
    waypoint without one is reached at its primary (IPv4) address."""
    import dataclasses

    svc = Service("web", "demo", "10.96.0.10", (ServicePort("http", 80, 8080),), (WEB0.uid,),
                  waypoint=WaypointRef("demo", "waypoint"), vips=("10.96.0.10", "fd00:10:96::10"))
    dual = dataclasses.replace(WAYPOINT, ips=("10.244.2.9", "fd00:10:244:2::9"))
    route = plan_route(state(svc, dual), "fd00:10:96::10", 80)
    assert (route.kind, route.target_ip, route.authority_ip) == ("waypoint", "fd00:10:244:2::9", "fd00:10:96::10")
    assert plan_route(state(svc, dual), "10.96.0.10", 80).target_ip == "10.244.2.9"
    assert plan_route(state(svc), "fd00:10:96::10", 80).target_ip == "10.244.2.9"


def test_workload_waypoint_and_unknown_waypoint():
    import dataclasses

    behind = dataclasses.replace(WEB1, waypoint=WaypointRef("demo", "waypoint"))
    assert plan_route(state(behind), "10.244.2.3", 8080).kind == "waypoint"
    lost = dataclasses.replace(WEB1, waypoint=WaypointRef("demo", "gone"))
    assert plan_route(state(lost), "10.244.2.3", 8080).kind == "none"  # never around the waypoint


def test_unmeshed_and_unknown_destinations_pass_through():
    assert plan_route(state(), "10.244.1.4", 9000).kind == "passthrough"
    route = plan_route(state(), "192.0.2.7", 443)
    assert (route.kind, route.target_ip, route.target_port) == ("passthrough", "192.0.2.7", 443)


def test_routes_stay_in_the_family_the_app_dialled():
    web1 = workload("web-1", "10.244.2.3", "web", ips=("10.244.2.3", "fd00:10:244:2::3"))
    wp = Waypoint("waypoint", "demo", "10.244.2.9", "waypoint", WAYPOINT.spiffe_id, ips=("10.244.2.9", "fd00::9"))
    svc = Service("web", "demo", "10.96.0.10", (ServicePort("http", 80, 8080),), (web1.uid,),
                  vips=("10.96.0.10", "fd00:10:96::a"))
    st = ConfigState()
    st.apply(ConfigDelta("1", upserted=(web1, wp, svc, LEGACY)))
    v6 = plan_route(st, "fd00:10:96::a", 80)       # IPv6 ClusterIP -> the pod's IPv6, HBONE over IPv6
    assert (v6.kind, v6.target_ip, v6.authority_ip, v6.authority_port) == ("hbone", "fd00:10:244:2::3",
                                                                          "fd00:10:244:2::3", 8080)
    mapped = plan_route(st, "::ffff:10.96.0.10", 80)  # IPv4-mapped is IPv4: same decision as 10.96.0.10
    assert (mapped.kind, mapped.target_ip) == ("hbone", "10.244.2.3")
    assert plan_route(st, "fd00:10:244:2::3", 8080).target_ip == "fd00:10:244:2::3"
    # A destination without an address of that family gets its primary one.
    assert plan_route(st, "::ffff:10.244.1.4", 9000).target_ip == "10.244.1.4"
    st.apply(ConfigDelta("2", upserted=(workload("web-1", "10.244.2.3", "web", ips=("10.244.2.3", "fd00:10:244:2::3"),
                                                 waypoint=WaypointRef("demo", "waypoint")),)))
    via_waypoint = plan_route(st, "fd00:10:244:2::3", 8080)   # the waypoint listens on both families
    assert (via_waypoint.target_ip, via_waypoint.authority_ip) == ("fd00::9", "fd00:10:244:2::3")

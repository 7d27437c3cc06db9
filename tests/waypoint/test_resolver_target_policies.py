"""The waypoint enforces policies attached to its Service or Gateway (targetRefs)."""
from shoal.waypoint.resolver import StateResolver
from shoal.waypoint.routing import ServiceKey
from shoal.xds import model as m
from shoal.xds.state import ConfigState


def test_waypoint_picks_policies_targeting_its_service_or_gateway_only():
    web = m.Workload(uid="demo/web-0", name="web-0", namespace="demo", service_account="web", node="node-1",
                     ip="10.244.1.3", identity=300, spiffe_id="spiffe://cluster.local/ns/demo/sa/web",
                     meshed=True, labels=m.Labels({"app": "web"}))
    service = m.Service(name="web", namespace="demo", vip="10.96.0.10",
                        ports=(m.ServicePort(name="http", port=8080, target_port=8080),), endpoints=("demo/web-0",))
    on_service = m.Authorization("on-service", "demo", "DENY", target_refs=(m.TargetRef("Service", "web"),))
    on_gateway = m.Authorization("on-gateway", "demo", "DENY", target_refs=(m.TargetRef("Gateway", "waypoint"),))
    elsewhere = m.Authorization("elsewhere", "demo", "DENY", target_refs=(m.TargetRef("Service", "db"),))
    other_ns = m.Authorization("other-ns", "prod", "DENY", target_refs=(m.TargetRef("Service", "web"),))
    on_workload = m.Authorization("on-workload", "demo", "ALLOW", selector=m.Labels({"app": "web"}))
    state = ConfigState()
    state.apply(m.ConfigDelta(version="1", upserted=(web, service, on_service, on_gateway, elsewhere, other_ns, on_workload)))
    resolver = StateResolver(state, "demo", gateway=("demo", "waypoint"))
    picked = {p.name for p in resolver.policies_for(ServiceKey("demo", "web", 8080))}
    assert picked == {"on-service", "on-gateway", "on-workload"}
    # The node proxy's view of the workload holds only the workload-selected one.
    assert [p.name for p in state.policies_for(web)] == ["on-workload"]

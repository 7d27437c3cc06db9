"""The mesh model: Kubernetes objects in, per-node resources out (pure, no I/O)."""
from shoal.controller.identity import IdentityAllocator
from shoal.controller.model import MeshModel
from shoal.xds import model as m

from .objects import added, namespace, peer_auth, pod, policy, service


def build(*objs, identities=None):
    model = MeshModel(identities or IdentityAllocator(None))
    model.apply(added(*objs))
    return model


def workload(model, uid):
    return model.resources[f"workload/{uid}"].resource


def test_namespace_opt_in_aliases_and_pod_opt_out():
    model = build(
        namespace("demo"),
        namespace("amb", meshed=False, labels={"istio.io/dataplane-mode": "ambient"}),
        namespace("legacy", meshed=False),
        pod("demo", "web-0", sa="web", labels={"app": "web"}),
        pod("demo", "out-0", ip="10.244.1.3", labels={"shoal.io/mesh": "disabled"}),
        pod("amb", "a-0", ip="10.244.1.4"),
        pod("legacy", "client-0", ip="10.244.1.5"))
    web = workload(model, "demo/web-0")
    assert web.meshed and web.protocol == "HBONE" and web.spiffe_id.endswith("/ns/demo/sa/web")
    assert web.canonical_service == "web" and web.ip == "10.244.1.2" and web.node == "node-1"
    assert not workload(model, "demo/out-0").meshed
    assert workload(model, "amb/a-0").meshed
    legacy = workload(model, "legacy/client-0")
    assert not legacy.meshed and legacy.protocol == "TCP"
    # Relabelling the namespace reaches its workloads, and only them.
    change = model.apply([("MODIFIED", namespace("legacy"))])
    assert change.keys == {"workload/legacy/client-0"}
    assert workload(model, "legacy/client-0").meshed


def test_identities_stable_per_namespace_and_sa_across_restarts(tmp_path):
    path = tmp_path / "identities"
    first = build(namespace("demo"), pod("demo", "a", sa="web"), pod("demo", "b", sa="web"),
                  pod("demo", "c", sa="db"), identities=IdentityAllocator(path))
    ids = {uid: workload(first, uid).identity for uid in ("demo/a", "demo/b", "demo/c")}
    assert ids["demo/a"] == ids["demo/b"] != ids["demo/c"]
    # A restarted controller sees the objects in another order: same numbers.
    second = build(pod("demo", "c", sa="db"), namespace("demo"), pod("demo", "a", sa="web"),
                   identities=IdentityAllocator(path))
    assert workload(second, "demo/c").identity == ids["demo/c"]
    assert workload(second, "demo/a").identity == ids["demo/a"]


def test_service_endpoints_follow_pods_and_named_ports():
    svc = service("demo", "web", {"app": "web"}, target="http")
    model = build(namespace("demo"), svc,
                  pod("demo", "web-0", labels={"app": "web"}, ports={"http": 8080}),
                  pod("demo", "db-0", ip="10.244.1.9", labels={"app": "db"}))
    web = model.resources["service/demo/web"].resource
    assert web.endpoints == ("demo/web-0",) and web.vip == "10.96.0.10"
    assert web.ports == (m.ServicePort("p", 80, 8080, "TCP"),)
    change = model.apply(added(pod("demo", "web-1", node="node-2", ip="10.244.2.2",
                                   labels={"app": "web"}, ports={"http": 8080})))
    assert change.keys == {"workload/demo/web-1", "service/demo/web"}
    assert model.resources["service/demo/web"].resource.endpoints == ("demo/web-0", "demo/web-1")
    model.apply([("DELETED", pod("demo", "web-0"))])
    assert model.resources["service/demo/web"].resource.endpoints == ("demo/web-1",)
    assert "workload/demo/web-0" not in model.resources


def test_versions_are_content_hashes():
    a = build(namespace("demo"), pod("demo", "web-0"))
    b = build(pod("demo", "web-0"), namespace("demo"))
    assert a.resources["workload/demo/web-0"].version == b.resources["workload/demo/web-0"].version
    change = a.apply([("MODIFIED", pod("demo", "web-0"))])
    assert not change and a.generation == 1


def test_policies_go_only_to_nodes_with_selected_workloads():
    model = build(namespace("demo"),
                  pod("demo", "web-0", node="node-1", labels={"app": "web"}),
                  pod("demo", "db-0", node="node-2", ip="10.244.2.2", labels={"app": "db"}),
                  policy("demo", "web-only", selector={"app": "web"}),
                  policy("shoal-system", "mesh-deny", action="DENY"))
    node1, node2 = model.view("node-1", "proxy"), model.view("node-2", "proxy")
    assert "authorization/demo/web-only" in node1 and "authorization/demo/web-only" not in node2
    assert "authorization/shoal-system/mesh-deny" in node1
    assert "authorization/shoal-system/mesh-deny" in node2
    assert "workload/demo/db-0" in node1   # every node gets every workload
    assert "authorization/demo/web-only" in model.view("node-3", "waypoint")
    # A web pod lands on node-2: the policy's audience changes, so it is in the change.
    change = model.apply(added(pod("demo", "web-1", node="node-2", ip="10.244.2.3",
                                   labels={"app": "web"})))
    assert "authorization/demo/web-only" in change.keys
    assert "authorization/demo/web-only" in model.view("node-2", "proxy")
    # The selector changes to db: node-1 no longer needs it.
    model.apply([("MODIFIED", policy("demo", "web-only", selector={"app": "db"}))])
    assert "authorization/demo/web-only" not in model.view("node-1", "proxy")
    assert "authorization/demo/web-only" in model.view("node-2", "proxy")


def test_bad_policy_is_reported_by_field_and_last_good_kept():
    good = policy("demo", "p", rules=[{"to": [{"operation": {"ports": ["8080"]}}]}])
    model = build(namespace("demo"), good)
    before = model.resources["authorization/demo/p"]
    bad = policy("demo", "p", rules=[{"to": [{"operation": {"ports": ["http"]}}]}])
    change = model.apply([("MODIFIED", bad)])
    assert not change
    assert model.resources["authorization/demo/p"] is before
    assert model.errors == {"AuthorizationPolicy demo/p":
                            "AuthorizationPolicy demo/p: spec.rules[0].to[0].operation.ports[0]: "
                            "expected a port number, got 'http'"}
    model.apply([("MODIFIED", good)])
    assert model.errors == {}


def test_mtls_mode_most_specific_wins():
    model = build(namespace("demo"), pod("demo", "a", labels={"app": "a"}),
                  pod("demo", "b", ip="10.244.1.3", labels={"app": "b"}),
                  peer_auth("shoal-system", "mesh", "STRICT"))
    assert workload(model, "demo/a").mtls_mode == "STRICT"
    model.apply(added(peer_auth("demo", "ns", "PERMISSIVE"),
                      peer_auth("demo", "only-b", "STRICT", selector={"app": "b"})))
    assert workload(model, "demo/a").mtls_mode == "PERMISSIVE"
    assert workload(model, "demo/b").mtls_mode == "STRICT"


def test_waypoints_gateways_and_pass_through_routes():
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "waypoint", "namespace": "demo", "uid": "g1"},
               "spec": {"gatewayClassName": "shoal-waypoint"},
               "status": {"addresses": [{"value": "10.244.1.50"}],
                          "conditions": [{"type": "Programmed", "status": "True"}]}}
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "r", "namespace": "demo"}, "spec": {"rules": []}}
    model = build(namespace("demo", labels={"shoal.io/use-waypoint": "waypoint"}), gateway, route,
                  pod("demo", "web-0", labels={"app": "web"}),
                  service("demo", "web", {"app": "web"},
                          labels={"shoal.io/use-waypoint": "none"}))
    wp = model.resources["waypoint/demo/waypoint"].resource
    assert wp.ip == "10.244.1.50" and wp.spiffe_id.endswith("/ns/demo/sa/waypoint")
    assert workload(model, "demo/web-0").waypoint == m.WaypointRef("demo", "waypoint")
    assert model.resources["service/demo/web"].resource.waypoint is None   # service label wins
    assert "object/HTTPRoute/demo/r" in model.view("node-1", "waypoint")
    assert "object/HTTPRoute/demo/r" not in model.view("node-1", "proxy")
    assert model.resources["object/HTTPRoute/demo/r"].resource.body["kind"] == "HTTPRoute"


def waypoint_pod(ready: bool, ip="10.244.1.60", name="waypoint-0"):
    obj = pod("demo", name, ip=ip, sa="waypoint",
              labels={"gateway.networking.k8s.io/gateway-name": "waypoint", "shoal.io/mesh": "disabled"})
    obj["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return obj


def test_traffic_moves_to_a_waypoint_only_once_it_is_ready_and_away_when_it_goes():
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "waypoint", "namespace": "demo", "uid": "g1"},
               "spec": {"gatewayClassName": "shoal-waypoint"}}
    model = build(namespace("demo", labels={"shoal.io/use-waypoint": "waypoint"}),
                  pod("demo", "web-0", labels={"app": "web"}), service("demo", "web", {"app": "web"}),
                  gateway, waypoint_pod(ready=False))
    web = lambda: model.resources["service/demo/web"].resource  # noqa: E731
    # Asked for, running, not ready: the Waypoint is known (it may get its certificate),
    # but nothing routes to it yet.
    assert model.resources["waypoint/demo/waypoint"].resource.ip == "10.244.1.60"
    assert web().waypoint is None and workload(model, "demo/web-0").waypoint is None
    change = model.apply([("MODIFIED", waypoint_pod(ready=True))])
    assert {"service/demo/web", "workload/demo/web-0"} <= change.keys
    assert web().waypoint == m.WaypointRef("demo", "waypoint")
    assert workload(model, "demo/web-0").waypoint == m.WaypointRef("demo", "waypoint")
    # A replacement pod that is not ready yet does not take the address.
    model.apply([("ADDED", waypoint_pod(ready=False, ip="10.244.1.61", name="waypoint-1"))])
    assert model.resources["waypoint/demo/waypoint"].resource.ip == "10.244.1.60"
    # Once bound, a waypoint that stops answering keeps the route (fail closed, its L7
    # policies are not skipped)...
    model.apply([("MODIFIED", waypoint_pod(ready=False))])
    assert web().waypoint == m.WaypointRef("demo", "waypoint")
    # ...until its Gateway goes: the route moves away in the same change.
    change = model.apply([("DELETED", gateway)])
    assert {"service/demo/web", "waypoint/demo/waypoint"} <= change.keys
    assert web().waypoint is None and workload(model, "demo/web-0").waypoint is None
    # A new Gateway of the same name starts unbound again.
    model.apply([("ADDED", {**gateway, "metadata": {**gateway["metadata"], "uid": "g2"}})])
    assert web().waypoint is None


def test_ca_scope_counts_scheduled_pods_per_node():
    model = build(namespace("demo"), pod("demo", "web-0", node="node-1", sa="web"),
                  pod("demo", "db-0", node="node-2", ip="10.244.2.2", sa="db"))
    assert model.identities_on_node("node-1") == {"spiffe://cluster.local/ns/demo/sa/web"}
    model.apply([("DELETED", pod("demo", "web-0"))])
    assert model.identities_on_node("node-1") == set()
    model.apply([("MODIFIED", pod("demo", "db-0", node="node-2", ip="10.244.2.2", sa="db",
                                  phase="Succeeded"))])
    assert model.identities_on_node("node-2") == set()


def test_relist_deletes_what_disappeared():
    model = build(namespace("demo"), pod("demo", "a"), pod("demo", "b", ip="10.244.1.3"))
    change = model.replace("Pod", [pod("demo", "b", ip="10.244.1.3")])
    assert change.keys == {"workload/demo/a"}
    assert "workload/demo/a" not in model.resources


def test_waypoints_may_get_their_own_identity_only():
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "wp", "namespace": "demo"},
               "spec": {"gatewayClassName": "shoal-waypoint"}}
    model = build(namespace("demo"), gateway, pod("demo", "web-0", sa="web"))
    assert model.identities_for_caller("waypoint-demo-wp") == {"spiffe://cluster.local/ns/demo/sa/wp"}
    assert model.identities_for_caller("waypoint-demo-other") == set()
    assert model.identities_for_caller("node-1") == {"spiffe://cluster.local/ns/demo/sa/web"}


def test_pods_without_ip_are_not_sent_but_count_for_the_ca():
    model = build(namespace("demo"), pod("demo", "web-0", sa="web", ip=""))
    assert "workload/demo/web-0" not in model.resources
    assert model.identities_on_node("node-1") == {"spiffe://cluster.local/ns/demo/sa/web"}
    change = model.apply([("MODIFIED", pod("demo", "web-0", sa="web", ip="10.244.1.7"))])
    assert change.keys == {"workload/demo/web-0"}
    model.apply([("MODIFIED", pod("demo", "web-0", sa="web", node="node-2", ip="10.244.2.7"))])
    assert model.identities_on_node("node-1") == set()
    assert model.identities_on_node("node-2") == {"spiffe://cluster.local/ns/demo/sa/web"}


def test_host_network_pods_are_not_workloads():
    host = pod("demo", "agent-x", ip="172.18.0.11")
    host["spec"]["hostNetwork"] = True
    model = build(namespace("demo"), host)
    assert "workload/demo/agent-x" not in model.resources


def test_targeted_policies_go_to_waypoints_not_node_proxies():
    targeted = policy("demo", "no-admin-delete", action="DENY",
                      rules=[{"to": [{"operation": {"methods": ["DELETE"], "paths": ["/admin*"]}}]}])
    targeted["spec"]["targetRefs"] = [{"kind": "Service", "group": "", "name": "web"}]
    model = build(namespace("demo"), pod("demo", "web-0", labels={"app": "web"}), targeted)
    resource = model.resources["authorization/demo/no-admin-delete"].resource
    assert resource.target_refs == (m.TargetRef(kind="Service", name="web", group=""),)
    assert resource.targets("Service", "demo", "web") and not resource.targets("Service", "other", "web")
    workload = model.resources["workload/demo/web-0"].resource
    assert not resource.selects(workload)          # node proxies never fail closed on it
    assert "authorization/demo/no-admin-delete" not in model.view("node-1", "proxy")
    assert "authorization/demo/no-admin-delete" in model.view("node-1", "waypoint")


def test_bad_target_refs_name_the_field():
    bad = policy("demo", "p")
    bad["spec"]["targetRefs"] = [{"kind": "Deployment", "name": "web"}]
    model = build(namespace("demo"), bad)
    assert model.errors == {"AuthorizationPolicy demo/p": "AuthorizationPolicy demo/p: spec.targetRefs[0].kind: "
                                                          "'Deployment' is not supported (Gateway or Service)"}


def test_dual_stack_pods_and_services_from_kubernetes_fields():
    dual_pod = pod("demo", "web-0", ip="10.244.1.2", labels={"app": "web"})
    dual_pod["status"]["podIPs"] = [{"ip": "10.244.1.2"}, {"ip": "fd00:10:244:1::2"}]
    svc = service("demo", "web", {"app": "web"}, ip="fd00:96::a")
    svc["spec"].update(clusterIPs=["fd00:96::a", "10.96.0.10"], ipFamilies=["IPv6", "IPv4"],
                       ipFamilyPolicy="RequireDualStack")
    model = build(namespace("demo"), dual_pod, svc)
    wl = workload(model, "demo/web-0")
    assert wl.ip == "10.244.1.2" and wl.ips == ("10.244.1.2", "fd00:10:244:1::2")
    built = model.resources["service/demo/web"].resource
    assert built.vip == "fd00:96::a" and built.vips == ("10.96.0.10", "fd00:96::a")
    assert built.ip_families == ("IPv6", "IPv4") and built.ip_family_policy == "RequireDualStack"
    assert built.endpoints == ("demo/web-0",)


def test_bad_dual_stack_fields_name_the_object_and_field():
    bad_family = service("demo", "web", {"app": "web"})
    bad_family["spec"]["ipFamilies"] = ["IPv5"]
    wrong_family = service("demo", "db", {"app": "db"}, ip="10.96.0.11")
    wrong_family["spec"].update(clusterIPs=["10.96.0.11"], ipFamilies=["IPv6"])
    two_v4 = pod("demo", "web-0")
    two_v4["status"]["podIPs"] = [{"ip": "10.244.1.2"}, {"ip": "10.244.1.3"}]
    model = build(namespace("demo"), bad_family, wrong_family, two_v4)
    assert "spec.ipFamilies[0]: 'IPv5'" in model.errors["Service demo/web"]
    assert "spec.clusterIPs: 10.96.0.11 is not of spec.ipFamilies" in model.errors["Service demo/db"]
    assert "status.podIPs: more than one IPv4" in model.errors["Pod demo/web-0"]


def test_service_ports_carry_their_app_protocol_and_grpcroutes_pass_through():
    svc = service("demo", "echo", {"app": "echo"})
    svc["spec"]["ports"].append({"name": "rpc", "port": 50051, "targetPort": 50051, "appProtocol": "kubernetes.io/h2c"})
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
             "metadata": {"name": "echo", "namespace": "demo"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}]}}
    model = build(namespace("demo"), svc, route)
    echo = model.resources["service/demo/echo"].resource
    assert [p.app_protocol for p in echo.ports] == ["", "kubernetes.io/h2c"]
    passed = [r.resource for r in model.resources.values() if isinstance(r.resource, m.KubeObject)]
    assert [(o.kind, o.namespace, o.name) for o in passed] == [("GRPCRoute", "demo", "echo")]


def test_a_standby_model_withholds_a_workload_until_the_leaders_number_arrives():
    """A following allocator (standby): a pod of a new service account is not published
    (no number of its own invented) but counts for the CA scope; once the leader's number
    is restored it is published with that number, and only what waited is rebuilt."""
    identities = IdentityAllocator(None, external=True, following=True)
    identities.restore([(400, "demo", "web")])
    model = MeshModel(identities)
    model.apply(added(namespace("demo"), pod("demo", "web-0", sa="web"),
                      pod("demo", "api-0", sa="api", ip="10.244.1.9")))
    assert model.resources["workload/demo/web-0"].resource.identity == 400
    assert "workload/demo/api-0" not in model.resources
    assert "spiffe://cluster.local/ns/demo/sa/api" in model.identities_on_node("node-1")
    assert not model.recheck_withheld()          # still unknown: nothing to do
    identities.restore([(400, "demo", "web"), (401, "demo", "api")])
    change = model.recheck_withheld()
    assert change.keys == {"workload/demo/api-0"}
    assert model.resources["workload/demo/api-0"].resource.identity == 401
    assert not identities.withheld

"""The embedded store: validation, defaults, atomic applies, cascades, watch events."""
import pytest

from shoal.controller.manifests import ManifestError
from shoal.controller.store import Store


def node(name):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def pod(name, ns="demo", **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "main", "command": ["sleep", "inf"]}], **spec}}


def service(name, ns="demo", **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"port": 8080}], **spec}}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store.db")
    s.apply([node("node-1"), node("node-2")])
    yield s
    s.close()


def test_deployment_expands_into_named_pods_spread_over_nodes(store):
    store.apply([{
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"replicas": 2, "template": {"metadata": {"labels": {"app": "web"}},
                                             "spec": {"containers": [{"command": ["web"]}]}}}}])
    pods = {p["metadata"]["name"]: p for p in store.list("Pod", "demo")}
    assert set(pods) == {"web-0", "web-1"}
    assert pods["web-0"]["spec"]["nodeName"] == "node-1"
    assert pods["web-1"]["spec"]["nodeName"] == "node-2"
    assert pods["web-0"]["metadata"]["labels"] == {"app": "web"}


def test_scaling_down_removes_surplus_pods_and_delete_cascades(store):
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "demo"},
           "spec": {"replicas": 3, "template": {"spec": {"containers": [{"command": ["web"]}]}}}}
    store.apply([dep])
    dep["spec"]["replicas"] = 1
    events = store.apply([dep])
    assert sorted(e.object["metadata"]["name"] for e in events if e.type == "DELETED") == ["web-1", "web-2"]
    store.delete([{"kind": "Deployment", "metadata": {"name": "web", "namespace": "demo"}}])
    assert store.list("Pod") == []


def test_one_bad_document_leaves_the_store_unchanged(store):
    before = store.resource_version
    bad = pod("broken")
    bad["spec"]["containers"][0]["command"] = "not-a-list"
    with pytest.raises(ManifestError) as err:
        store.apply([pod("good"), bad])
    assert "Pod demo/broken: spec.containers[0].command: expected a list of strings" in err.value.errors
    assert store.list("Pod") == [] and store.resource_version == before


def test_errors_name_object_and_field():
    from shoal.controller.manifests import validate
    errors = validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "demo"},
                       "spec": {"ports": [{"port": 70000}]}})
    assert errors == ["Service demo/db: spec.ports[0].port: expected a port number 1-65535, got 70000"]
    assert "unknown kind" in validate({"kind": "Bogus", "metadata": {"name": "x"}})[0]
    assert validate("text")[0].startswith("document 1: expected a mapping")


def test_services_get_stable_unique_cluster_ips(store):
    store.apply([service("web"), service("db")])
    web = store.get("Service", "demo", "web")["spec"]["clusterIP"]
    db = store.get("Service", "demo", "db")["spec"]["clusterIP"]
    assert web != db and web.startswith("10.96.")
    store.apply([service("web", ports=[{"port": 9090}])])
    assert store.get("Service", "demo", "web")["spec"]["clusterIP"] == web


def test_pods_are_scheduled_on_the_least_loaded_node_and_unknown_nodes_refused(store):
    store.apply([pod("a"), pod("b")])
    assert {p["spec"]["nodeName"] for p in store.list("Pod")} == {"node-1", "node-2"}
    with pytest.raises(ManifestError, match="spec.nodeName: no node named 'node-9'"):
        store.apply([pod("c", nodeName="node-9")])


def test_watch_reports_changes_once_and_status_updates(store):
    seen = []
    store.watch(lambda events: seen.extend((e.type, e.object["metadata"]["name"]) for e in events))
    store.apply([pod("a")])
    store.apply([pod("a")])  # unchanged: no event
    store.update_status("Pod", "demo", "a", {"phase": "Running", "podIP": "10.244.1.2"})
    store.delete([pod("a")])
    assert seen == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]


def test_deleting_a_namespace_removes_its_objects(store):
    store.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}, pod("a"), service("web")])
    store.delete([{"kind": "Namespace", "metadata": {"name": "demo"}}])
    assert store.list("Pod") == [] and store.list("Service") == [] and store.list("Namespace") == []


def test_deleting_the_file_that_created_a_namespace_removes_all_of_it(store):
    """`shoal delete -f` of a manifest that starts with its Namespace: the cascade already took
    the objects listed after it, which is not an error (it was, and the file's Pod stayed)."""
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}
    store.apply([ns, pod("a"), service("web")])
    store.delete([ns, pod("a"), service("web")])
    assert store.list("Pod") == [] and store.list("Service") == [] and store.list("Namespace") == []


def test_deleting_an_object_that_does_not_exist_deletes_nothing(store):
    store.apply([pod("a")])
    with pytest.raises(ManifestError) as err:
        store.delete([pod("a"), pod("ghost")])
    assert err.value.errors == ["Pod demo/ghost: not found"]
    assert [p["metadata"]["name"] for p in store.list("Pod")] == ["a"]


def test_store_survives_reopen(tmp_path):
    s = Store(tmp_path / "db")
    s.apply([node("node-1"), pod("a")])
    rv = s.resource_version
    s.close()
    s2 = Store(tmp_path / "db")
    assert s2.get("Pod", "demo", "a")["spec"]["nodeName"] == "node-1" and s2.resource_version == rv


def test_policy_target_refs_are_validated():
    from shoal.controller.manifests import validate
    policy = {"apiVersion": "security.shoal.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "p", "namespace": "demo"},
              "spec": {"targetRefs": [{"kind": "Deployment", "name": "web"}], "selector": {"matchLabels": {"a": "b"}}}}
    assert validate(policy) == [
        "AuthorizationPolicy demo/p: spec.targetRefs: cannot be combined with spec.selector",
        "AuthorizationPolicy demo/p: spec.targetRefs[0].kind: expected Gateway or Service, got 'Deployment'"]


@pytest.mark.parametrize("spec, error", [
    ({"ipFamilies": ["IPv5"]}, "Service demo/web: spec.ipFamilies[0]: unknown IP family 'IPv5'"),
    ({"ipFamilies": ["IPv6"], "clusterIP": "10.96.0.20"},
     "Service demo/web: spec.clusterIP: 10.96.0.20 is an IPv4 address; spec.ipFamilies is ['IPv6']"),
    ({"ipFamilies": ["IPv4"], "clusterIPs": ["fd00:96::20"]},
     "Service demo/web: spec.clusterIPs[0]: fd00:96::20 is an IPv6 address; spec.ipFamilies is ['IPv4']"),
    ({"ipFamilyPolicy": "DualStackPlease"},
     "Service demo/web: spec.ipFamilyPolicy: expected SingleStack, PreferDualStack, RequireDualStack, "
     "got 'DualStackPlease'"),
    ({"ipFamilies": ["IPv4", "IPv6"]}, "Service demo/web: spec.ipFamilies: SingleStack allows one IP family"),
    ({"clusterIPs": ["10.96.0.20", "10.96.0.21"], "ipFamilyPolicy": "RequireDualStack"},
     "Service demo/web: spec.clusterIPs[1]: a second IPv4 ClusterIP (10.96.0.21, already 10.96.0.20)"),
])
def test_bad_dual_stack_service_fields_are_refused_by_name(store, spec, error):
    with pytest.raises(ManifestError) as err:
        store.apply([service("web", **spec)])
    assert any(e.startswith(error) for e in err.value.errors), err.value.errors
    assert store.list("Service") == []


def test_services_get_a_cluster_ip_per_requested_family(store):
    store.apply([service("single"), service("dual", ipFamilyPolicy="PreferDualStack"),
                 service("v6", ipFamilies=["IPv6"]),
                 service("v6first", ipFamilies=["IPv6", "IPv4"], ipFamilyPolicy="RequireDualStack")])
    spec = {s["metadata"]["name"]: s["spec"] for s in store.list("Service")}
    assert spec["single"]["ipFamilies"] == ["IPv4"] and len(spec["single"]["clusterIPs"]) == 1
    assert spec["single"]["ipFamilyPolicy"] == "SingleStack"
    assert spec["dual"]["ipFamilies"] == ["IPv4", "IPv6"]
    v4, v6 = spec["dual"]["clusterIPs"]
    assert v4.startswith("10.96.") and v6.startswith("fd00:10:96::") and spec["dual"]["clusterIP"] == v4
    assert spec["v6"]["clusterIP"].startswith("fd00:10:96::") and spec["v6"]["ipFamilies"] == ["IPv6"]
    assert spec["v6first"]["clusterIP"] == spec["v6first"]["clusterIPs"][0]
    assert spec["v6first"]["clusterIP"].startswith("fd00:10:96::")
    every = [a for s in spec.values() for a in s["clusterIPs"]]
    assert len(every) == len(set(every))
    # Upgrading to dual-stack keeps the primary ClusterIP and adds the other family's.
    store.apply([service("single", ipFamilyPolicy="RequireDualStack")])
    upgraded = store.get("Service", "demo", "single")["spec"]
    assert upgraded["clusterIPs"][0] == spec["single"]["clusterIP"] and len(upgraded["clusterIPs"]) == 2


def test_cluster_ips_outside_their_family_range_are_refused(store):
    with pytest.raises(ManifestError) as err:
        store.apply([service("web", clusterIP="fd00:99::1")])
    assert err.value.errors == ["Service demo/web: spec.clusterIPs: fd00:99::1 is outside the IPv6 "
                                "service range fd00:10:96::/112"]
    store.apply([service("web", clusterIP="fd00:10:96::20")])
    with pytest.raises(ManifestError, match="spec.clusterIP: field is immutable"):
        store.apply([service("web", clusterIP="fd00:10:96::21")])


def test_a_follower_sees_the_writes_of_another_process_once_and_its_own_once(tmp_path):
    """The controller in a container and the local kubelet on the host share the store file."""
    kubelet, controller = Store(tmp_path / "s.db"), Store(tmp_path / "s.db")
    seen: list[tuple[str, str]] = []
    controller.watch(lambda events: seen.extend((e.type, e.object["metadata"]["name"]) for e in events))
    controller.apply([node("node-1")])
    controller.follow_others()
    assert controller.poll() == [] and seen == [("ADDED", "node-1")]
    controller.apply([node("node-2")])                 # its own write: published once, at commit
    kubelet.apply([node("node-3")])                    # another process's write
    kubelet.update_status("Node", "", "node-1", {"phase": "Ready"})
    controller.apply([node("node-4")])                 # its own, after the other's unpolled ones
    polled = controller.poll()
    assert sorted((e.type, e.object["metadata"]["name"]) for e in polled) == [("ADDED", "node-3"),
                                                                              ("MODIFIED", "node-1")]
    kubelet.delete([node("node-2")])
    assert [(e.type, e.object["metadata"]["name"]) for e in controller.poll()] == [("DELETED", "node-2")]
    assert controller.poll() == []
    assert seen == [("ADDED", "node-1"), ("ADDED", "node-2"), ("ADDED", "node-4"), *[
        (e.type, e.object["metadata"]["name"]) for e in polled], ("DELETED", "node-2")]
    kubelet.close()
    controller.close()

from shoal.xds import model as m
from shoal.xds.state import ConfigState

from .conftest import make_workload


def test_indexes_follow_upserts_and_removals():
    state = ConfigState()
    seen = []
    state.subscribe(seen.append)
    web0 = make_workload()
    svc = m.Service(name="web", namespace="demo", vip="10.96.0.10", endpoints=(web0.uid,))
    state.apply(m.ConfigDelta(version="1", upserted=(web0, svc)))
    assert state.workload_by_ip("10.244.1.2") == web0
    assert state.workloads_on_node("node-1") == [web0]
    assert state.service_by_vip("10.96.0.10") == svc and state.endpoints(svc) == [web0]
    # The pod moves IP and node: old indexes are gone, subscribers see what was replaced.
    moved = make_workload(ip="10.244.2.7", node="node-2")
    applied = state.apply(m.ConfigDelta(version="2", upserted=(moved,)))
    assert applied.previous == {"workload/demo/web-0": web0}
    assert state.workload_by_ip("10.244.1.2") is None and state.workloads_on_node("node-1") == []
    assert state.workloads_on_node("node-2") == [moved]
    state.apply(m.ConfigDelta(version="3", removed=("service/demo/web", "workload/demo/web-0")))
    assert state.service_by_vip("10.96.0.10") is None and state.all_workloads() == []
    assert state.version == "3" and [d.version for d in seen] == ["1", "2", "3"]
    assert seen[-1].previous["service/demo/web"] == svc


def test_policies_for_selects_by_namespace_selector_and_root():
    state = ConfigState()
    web = make_workload(labels={"app": "web"})
    db = make_workload(uid="demo/db-0", ip="10.244.1.3", labels={"app": "db"})
    ns_wide = m.Authorization(name="ns", namespace="demo", action="DENY")
    web_only = m.Authorization(name="w", namespace="demo", action="ALLOW",
                               selector=m.Labels({"app": "web"}))
    mesh = m.Authorization(name="mesh", namespace=m.MESH_ROOT_NAMESPACE, action="DENY")
    other = m.Authorization(name="o", namespace="legacy", action="DENY")
    state.apply(m.ConfigDelta(version="1", upserted=(web, db, ns_wide, web_only, mesh, other)))
    assert {p.name for p in state.policies_for(web)} == {"ns", "w", "mesh"}
    assert {p.name for p in state.policies_for(db)} == {"ns", "mesh"}
    state.apply(m.ConfigDelta(version="2", removed=("authorization/demo/ns",)))
    assert {p.name for p in state.policies_for(db)} == {"mesh"}


def test_broken_subscriber_does_not_starve_others():
    state = ConfigState()
    calls = []

    def broken(delta):
        raise RuntimeError("boom")

    state.subscribe(broken)
    unsubscribe = state.subscribe(calls.append)
    state.apply(m.ConfigDelta(version="1"))
    unsubscribe()
    state.apply(m.ConfigDelta(version="2"))
    assert [d.version for d in calls] == ["1"]

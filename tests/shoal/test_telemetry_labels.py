"""Istio's standard labels, one module for both proxies (pure)."""
from shoal.controller.model import owning_workload
from shoal.telemetry_labels import (
    TCP_LABELS,
    UNKNOWN_SERVICE,
    ServiceLabels,
    peer,
    principal,
    service_of_endpoint,
    standard_labels,
)
from shoal.xds import model as m


def workload(name="web-7d9f-abcde", owner=("Deployment", "web"), **labels):
    return m.Workload(uid=f"demo/{name}", name=name, namespace="demo", service_account="web", node="node-1",
                      ip="10.244.1.2", identity=1, spiffe_id="spiffe://cluster.local/ns/demo/sa/web", meshed=True,
                      labels=m.Labels(labels), workload_kind=owner[0], workload_name=owner[1])


def test_principals_always_carry_the_spiffe_scheme():
    assert principal("cluster.local/ns/demo/sa/web") == "spiffe://cluster.local/ns/demo/sa/web"
    assert principal("spiffe://cluster.local/ns/demo/sa/web") == "spiffe://cluster.local/ns/demo/sa/web"
    assert principal("") == principal(None) == "unknown"


def test_workload_canonical_names_and_revisions_follow_istio():
    labelled = peer(workload(**{"service.istio.io/canonical-name": "shop", "service.istio.io/canonical-revision": "r7",
                                "app": "web", "version": "v1"}))
    assert (labelled.workload, labelled.canonical_service, labelled.canonical_revision) == ("web", "shop", "r7")
    assert (labelled.app, labelled.version) == ("web", "v1")
    k8s = peer(workload(**{"app.kubernetes.io/name": "web", "app.kubernetes.io/version": "2.1"}))
    assert (k8s.canonical_service, k8s.canonical_revision) == ("web", "2.1")
    bare = peer(workload(name="client-0", owner=("Pod", "client-0")))
    assert (bare.workload, bare.canonical_service, bare.canonical_revision) == ("client-0", "client-0", "latest")
    # The certificate's identity wins over the workload's.
    assert peer(workload(), "spiffe://cluster.local/ns/x/sa/y").principal == "spiffe://cluster.local/ns/x/sa/y"
    assert peer(None, "cluster.local/ns/x/sa/y").workload == "unknown"


def test_services_are_fqdns_and_found_from_the_destination_side():
    assert ServiceLabels.of("web", "demo").fqdn == "web.demo.svc.cluster.local"
    assert ServiceLabels.from_fqdn("web.demo.svc.cluster.local") == ServiceLabels.of("web", "demo")
    assert ServiceLabels.from_fqdn("unknown") is UNKNOWN_SERVICE
    w = workload()
    web = m.Service("web", "demo", "10.96.0.10", (m.ServicePort("http", 80, 8080),), (w.uid,))
    other = m.Service("db", "demo", "10.96.0.11", (m.ServicePort("pg", 5432, 5432),), (w.uid,))
    assert service_of_endpoint([other, web], w, 8080) == ServiceLabels.of("web", "demo")
    assert service_of_endpoint([other, web], w, 9999) is UNKNOWN_SERVICE


def test_label_values_line_up_with_the_names():
    values = standard_labels("source", peer(workload()), peer(None), ServiceLabels.of("web", "demo"), "tcp", "", True)
    labels = dict(zip(TCP_LABELS, values))
    assert len(values) == len(TCP_LABELS)
    assert labels["source_workload"] == "web" and labels["destination_workload"] == "unknown"
    assert labels["destination_service_name"] == "web" and labels["response_flags"] == "-"
    assert labels["connection_security_policy"] == "mutual_tls"


def test_owner_kinds_come_from_owner_references():
    def pod(owners, labels=None):
        return {"metadata": {"name": "p-0", "ownerReferences": owners, "labels": labels or {}}}

    assert owning_workload(pod([])) == ("Pod", "p-0")
    assert owning_workload(pod([{"kind": "Deployment", "name": "web"}])) == ("Deployment", "web")
    assert owning_workload(pod([{"kind": "ReplicaSet", "name": "web-5d8f9", "controller": True}],
                               {"pod-template-hash": "5d8f9"})) == ("Deployment", "web")
    assert owning_workload(pod([{"kind": "ReplicaSet", "name": "lonely"}])) == ("ReplicaSet", "lonely")
    assert owning_workload(pod([{"kind": "StatefulSet", "name": "db"}])) == ("StatefulSet", "db")

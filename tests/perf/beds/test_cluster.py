"""The cluster bed: pod manifests, finding pods, never the default cluster."""
import json

import pytest

from shoal.perf.beds.cluster import BedError, ClusterBed, find_pod, pod_manifests


def test_pod_manifests_mesh_label_and_node():
    ns, sa, pod = pod_manifests("perf-mesh", "client", "node-1", meshed=True, service_account="bench",
                                labels={"tier": "x"})
    assert ns["metadata"]["labels"] == {"shoal.io/mesh": "enabled"}
    assert sa["kind"] == "ServiceAccount" and sa["metadata"] == {"name": "bench", "namespace": "perf-mesh"}
    assert pod["spec"]["nodeName"] == "node-1" and pod["spec"]["serviceAccountName"] == "bench"
    assert pod["metadata"]["labels"] == {"app": "client", "tier": "x"}
    plain = pod_manifests("perf-plain", "s", "node-2", meshed=False, service_account="default", labels=None)
    assert plain[0]["metadata"]["labels"] == {}



def test_find_pod_in_listing():
    listing = json.dumps({"kind": "List", "items": [
        {"metadata": {"namespace": "a", "name": "p"}, "status": {"phase": "Running", "podIP": "10.244.1.2"}},
        {"metadata": {"namespace": "b", "name": "p"}}]})
    assert find_pod(listing, "a", "p") == ("Running", "10.244.1.2")
    assert find_pod(listing, "b", "p") == ("Pending", "")
    assert find_pod(listing, "c", "p") is None
    with pytest.raises(BedError, match="not JSON"):
        find_pod("No resources found.", "a", "p")



def test_cluster_bed_never_uses_the_default_cluster(monkeypatch):
    monkeypatch.setenv("SHOAL_PERF_CLUSTER", "shoal")
    with pytest.raises(BedError, match="never uses"):
        ClusterBed()
    monkeypatch.setenv("SHOAL_PERF_CLUSTER", "perf-t1")
    bed = ClusterBed()
    assert bed.env["SHOAL_CLUSTER"] == "perf-t1" and bed.shoal[-2:] == ["--cluster", "perf-t1"]
    monkeypatch.setenv("SHOAL_PERF_CLUSTER", "demo-x")
    with pytest.raises(BedError, match="only creates"):
        ClusterBed()
    assert ClusterBed(attach=True).name == "demo-x"      # attaching never removes the cluster

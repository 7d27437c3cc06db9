"""The embedded store as a source: initial list, then its watch feed, batched into the model."""
import asyncio

import pytest

from shoal.controller.auth import NodeCredentialAuthenticator
from shoal.controller.ca import CertificateAuthority
from shoal.controller.controlplane import ControlPlane
from shoal.controller.model import MeshModel
from shoal.controller.sources.local import LocalSource
from shoal.controller.store import Store
from shoal.credentials import NodeCredentials
from tests.conftest import until
from tests.controller.objects import namespace, policy

pytestmark = pytest.mark.timeout(30)


def deployment(name, replicas, labels):
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"replicas": replicas, "template": {
                "metadata": {"labels": labels},
                "spec": {"serviceAccountName": name,
                         "containers": [{"name": "main", "command": ["sleep", "inf"]}]}}}}



async def test_store_changes_reach_the_model(tmp_path):
    store = Store(tmp_path / "store.db")
    store.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}
                 for n in ("node-1", "node-2")])
    store.apply([namespace("demo"), deployment("web", 2, {"app": "web"})])
    plane = ControlPlane(MeshModel(), CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local"),
                         NodeCredentialAuthenticator(NodeCredentials(bytes(32))))
    source = LocalSource(store, plane)
    task = asyncio.ensure_future(source.run())
    try:
        await until(lambda: plane._synced_sources == {"local"})
        # Scheduled but no IP yet: no workloads, but the CA knows where they run.
        assert plane.model.counts()["workload"] == 0
        assert plane.model.identities_on_node("node-1") == {"spiffe://cluster.local/ns/demo/sa/web"}
        # The kubelet's status writes come through.
        store.update_status("Pod", "demo", "web-0", {"phase": "Running", "podIP": "10.244.1.2"})
        store.update_status("Pod", "demo", "web-1", {"phase": "Running", "podIP": "10.244.2.2"})
        await until(lambda: plane.model.counts()["workload"] == 2)
        generation = plane.model.generation
        store.apply([policy("demo", "p", selector={"app": "web"})])
        await until(lambda: "authorization/demo/p" in plane.model.resources)
        assert plane.model.generation == generation + 1
        assert plane.status()["applied_revision"] == store.resource_version
        # A write that changes no node's config moves no version, but is seen as taken.
        labelled = namespace("demo")
        labelled["metadata"].setdefault("labels", {})["team"] = "a"
        written = int(store.apply([labelled])[0].object["metadata"]["resourceVersion"])
        await until(lambda: plane.applied_revision >= written)
        assert plane.model.generation == generation + 1
        store.delete([namespace("demo")])   # cascades to everything in it
        await until(lambda: plane.model.counts()["workload"] == 0
                    and "authorization/demo/p" not in plane.model.resources)
        assert plane.model.identities_on_node("node-1") == set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()

import pytest

from shoal.xds import model as m


def make_workload(uid="demo/web-0", ip="10.244.1.2", node="node-1", namespace="demo",
                  sa="web", labels=None, **extra) -> m.Workload:
    return m.Workload(uid=uid, name=uid.split("/")[-1], namespace=namespace,
                      service_account=sa, node=node, ip=ip, identity=300,
                      spiffe_id=f"spiffe://cluster.local/ns/{namespace}/sa/{sa}", meshed=True,
                      labels=m.Labels(labels or {"app": "web"}), **extra)


@pytest.fixture
def workload_factory():
    return make_workload

"""The enricher's endpoints: filled once per address and identity, then merged from that
copy. What a flow gets must be what filling it fresh gives, whatever changed meanwhile."""
from __future__ import annotations

from shoal.agent.hubble.enrich import Enricher
from shoal.api.flow import flow_pb2
from shoal.xds import model as m
from tests.shoal.flows.flowbed import demo_state, workload


def _filled(enricher: Enricher, ip: str, identity: int = 0) -> tuple[flow_pb2.Endpoint, object]:
    endpoint = flow_pb2.Endpoint()
    service = enricher.fill_endpoint(endpoint, ip, identity)
    return endpoint, service


def test_a_second_flow_of_an_address_gets_what_a_fresh_fill_gives():
    state = demo_state()
    warm = Enricher(state, "node-1", "c1")
    for ip, identity in (("10.244.1.3", 0), ("10.244.1.3", 7), ("10.96.0.10", 0), ("203.0.113.9", 0), ("127.0.0.1", 0)):
        first = _filled(warm, ip, identity)
        again = _filled(warm, ip, identity)
        fresh = _filled(Enricher(state, "node-1", "c1"), ip, identity)
        assert again == first == fresh, ip
    endpoint, service = _filled(warm, "10.244.1.3")
    assert (endpoint.pod_name, endpoint.identity, service.name) == ("web-0", 1002, "web")
    assert list(endpoint.labels) == sorted(endpoint.labels) and len(endpoint.workloads) == 1   # not merged twice


def test_a_new_pod_on_an_old_address_is_filled_anew_even_under_the_same_version():
    """The cache follows the owner object, not only the version string: a push that
    reuses a version must never attribute a flow to the address's previous pod."""
    state = demo_state()
    enricher = Enricher(state, "node-1")
    assert _filled(enricher, "10.244.1.3")[0].pod_name == "web-0"
    state.apply(m.ConfigDelta(version=state.version, upserted=(
        workload("intruder-0", "other", "10.244.1.3", 4242, "intruder"),)))
    endpoint, service = _filled(enricher, "10.244.1.3")
    assert (endpoint.pod_name, endpoint.namespace, endpoint.identity) == ("intruder-0", "other", 4242)
    assert service is None


def test_a_new_version_moves_a_workload_out_of_its_service():
    state = demo_state()
    enricher = Enricher(state, "node-1")
    assert _filled(enricher, "10.244.1.3")[1].name == "web"
    state.apply(m.ConfigDelta(version="2", upserted=(
        m.Service(name="web", namespace="demo", vip="10.96.0.10", ports=(m.ServicePort("http", 80, 8080),),
                  endpoints=("demo/web-1",)),)))
    assert _filled(enricher, "10.244.1.3")[1] is None


def test_a_vip_sets_identity_zero_over_what_the_endpoint_had():
    enricher = Enricher(demo_state(), "node-1")
    _filled(enricher, "10.96.0.10")
    endpoint = flow_pb2.Endpoint(identity=99)
    assert enricher.fill_endpoint(endpoint, "10.96.0.10").name == "web"
    assert endpoint.identity == 0 and endpoint.namespace == "demo"

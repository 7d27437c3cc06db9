"""Hubble FlowFilter semantics, pure: no sockets."""
import pytest

from shoal.agent.hubble.enrich import Enricher
from shoal.api.flow import flow_pb2 as F
from shoal.api.observer import observer_pb2 as O
from shoal.flows.filters import FilterError, FlowMatcher, compile_filter, parse_label_selector
from shoal.flows.query import FlowQuery
from shoal.flows.records import http_flow
from tests.shoal.flows.flowbed import demo_state, kernel_event

ENRICH = Enricher(demo_state(), "node-1")


def tcp(**kw):
    return ENRICH.kernel_flow(kernel_event(**kw))


def matches(flow, **fields):
    return compile_filter(F.FlowFilter(**fields))(flow)


def test_and_within_a_filter_or_across_values():
    flow = tcp()
    assert matches(flow, source_pod=["demo/client"], destination_pod=["demo/web"])
    assert not matches(flow, source_pod=["demo/client"], destination_pod=["demo/db"])
    assert matches(flow, destination_pod=["demo/db", "demo/web-"])


def test_or_across_whitelist_minus_blacklist():
    flow = tcp()
    allow_any = FlowMatcher([F.FlowFilter(source_pod=["nope/"]), F.FlowFilter(destination_port=["8080"])])
    assert allow_any(flow)
    assert not FlowMatcher([F.FlowFilter(source_pod=["nope/"])])(flow)
    assert not FlowMatcher([], [F.FlowFilter(verdict=[F.FORWARDED])])(flow)
    assert FlowMatcher()(flow)


def test_namespace_and_pod_forms():
    flow = tcp()
    assert matches(flow, source_pod=["demo/"])
    assert matches(flow, source_pod=["client"])           # any namespace
    assert not matches(flow, source_pod=["legacy/"])


def test_ip_and_cidr():
    flow = tcp()
    assert matches(flow, source_ip=["10.244.1.2"])
    assert matches(flow, destination_ip=["10.244.0.0/16"])
    assert not matches(flow, destination_ip=["10.245.0.0/16", "fd00::/8"])
    with pytest.raises(FilterError, match="source_ip"):
        compile_filter(F.FlowFilter(source_ip=["10.0.0.0/33"]))


def test_labels_identity_service_workload():
    flow = tcp()
    assert flow.destination.identity == 1002
    assert flow.destination_service.name == "web"
    assert matches(flow, source_label=["app=client"], destination_label=["k8s:app in (web, db)"])
    assert not matches(flow, source_label=["app!=client"])
    assert matches(flow, destination_identity=[1002], source_identity=[1001])
    assert matches(flow, destination_service=["demo/web"])
    assert matches(flow, destination_workload=[F.Workload(name="web")])
    assert not matches(flow, source_workload=[F.Workload(name="web")])
    assert [(w.kind, w.name) for w in flow.destination.workloads] == [("Deployment", "web")]
    with pytest.raises(FilterError, match="label selector"):
        compile_filter(F.FlowFilter(source_label=["app in web"]))


def test_label_selector_forms():
    labels = ["k8s:app=web", "k8s:tier=front", "reserved:world"]
    assert parse_label_selector("app", "x")(labels)
    assert parse_label_selector("!db", "x")(labels)
    assert parse_label_selector("app==web,tier notin (back)", "x")(labels)
    assert not parse_label_selector("k8s:tier=back", "x")(labels)


def test_verdict_drop_protocol_port_flags():
    drop = tcp(verdict="DROPPED", reason=133)
    assert drop.drop_reason_desc == F.POLICY_DENIED
    assert matches(drop, verdict=[F.DROPPED], protocol=["TCP"], destination_port=["8080"])
    assert not matches(drop, protocol=["udp"])
    assert matches(drop, tcp_flags=[F.TCPFlags(SYN=True)])
    assert not matches(drop, tcp_flags=[F.TCPFlags(SYN=True, ACK=True)])
    assert matches(drop, event_type=[F.EventTypeFilter(type=1)])
    assert not matches(drop, event_type=[F.EventTypeFilter(type=1, match_sub_type=True, sub_type=181)])
    with pytest.raises(FilterError, match="protocol"):
        compile_filter(F.FlowFilter(protocol=["carrier-pigeon"]))
    with pytest.raises(FilterError, match="port"):
        compile_filter(F.FlowFilter(destination_port=["http"]))
    with pytest.raises(FilterError, match="verdict"):
        compile_filter(F.FlowFilter(verdict=[42]))


def test_http_status_method_path_reply():
    response = ENRICH.proxy_flow(http_flow("10.244.1.3", 8080, "10.244.1.2", 40000, kind="response",
                                           method="GET", url="http://web/api/v1?x=1", code=503))
    request = ENRICH.proxy_flow(http_flow("10.244.1.2", 40000, "10.244.1.3", 8080, kind="request",
                                          method="GET", url="/api/v1"))
    assert matches(response, http_status_code=["5+"])
    assert matches(response, http_status_code=["503"], http_method=["get"], http_path=["^/api/"])
    assert not matches(response, http_status_code=["4+"])
    assert not matches(request, http_status_code=["5+"])
    assert matches(request, protocol=["http"], reply=[False])
    assert matches(response, reply=[True])
    assert not matches(tcp(kind="tc", flags=0x10), reply=[False])     # unknown direction
    for bad in ("5xx", "1000", "+"):
        with pytest.raises(FilterError, match="status"):
            compile_filter(F.FlowFilter(http_status_code=[bad]))
    with pytest.raises(FilterError, match="http_path"):
        compile_filter(F.FlowFilter(http_path=["(unclosed"]))


def test_node_name_patterns():
    flow = tcp()
    assert matches(flow, node_name=["node-*"])
    assert matches(flow, node_name=["shoal/node-1"])
    assert matches(flow, node_name=["shoal/"])
    assert not matches(flow, node_name=["node-2"])


def test_unknown_ip_is_world():
    flow = tcp(dst="192.0.2.7")
    assert flow.destination.identity == 2
    assert list(flow.destination.labels) == ["reserved:world"]


def test_query_takes_number_with_since_and_rejects_first_with_follow():
    query = FlowQuery.from_request(O.GetFlowsRequest(number=5, since={"seconds": 10}))
    assert query.history_limit == 5 and query.since_ns == 10 * 10**9       # --last 5 --since
    with pytest.raises(ValueError, match="follow"):
        FlowQuery.from_request(O.GetFlowsRequest(number=5, first=True, follow=True))
    with pytest.raises(ValueError, match="after until"):
        FlowQuery.from_request(O.GetFlowsRequest(since={"seconds": 10}, until={"seconds": 5}))
    with pytest.raises(ValueError, match="timestamp"):
        FlowQuery.from_request(O.GetFlowsRequest(since={"seconds": 10, "nanos": -1}))
    assert FlowQuery.from_request(O.GetFlowsRequest(follow=True)).history_limit == 0
    assert FlowQuery.from_request(O.GetFlowsRequest()).history_limit is None


def test_a_bare_pod_is_its_own_workload_of_kind_pod():
    from shoal.xds import model as m
    from shoal.xds.state import ConfigState
    from tests.shoal.flows.flowbed import workload

    state = ConfigState()
    state.apply(m.ConfigDelta("1", upserted=(workload("solo", "demo", "10.244.1.9", 1009, "solo",
                                                      owner=("Pod", "solo")),)))
    flow = Enricher(state, "node-1").kernel_flow(kernel_event(src="10.244.1.9"))
    assert [(w.kind, w.name) for w in flow.source.workloads] == [("Pod", "solo")]

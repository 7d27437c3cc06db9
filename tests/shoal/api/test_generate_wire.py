"""Wire compatibility guards: Hubble's package, service and field numbers must never drift.

Hubble clients decode by field number; a renumbered field silently breaks them. These are
the numbers of Hubble's api/v1 protos for the fields Shoal fills or reads.
"""
import pytest

from shoal.api.flow import flow_pb2
from shoal.api.observer import observer_pb2, relay_pb2

EXPECTED = {
    flow_pb2.Flow: {"time": 1, "verdict": 2, "drop_reason": 3, "IP": 5, "l4": 6, "source": 8, "destination": 9,
                    "Type": 10, "node_name": 11, "source_names": 13, "destination_names": 14, "l7": 15,
                    "event_type": 19, "source_service": 20, "destination_service": 21, "traffic_direction": 22,
                    "trace_observation_point": 24, "drop_reason_desc": 25, "is_reply": 26, "uuid": 34,
                    "auth_type": 35, "Summary": 100000},
    flow_pb2.Endpoint: {"ID": 1, "identity": 2, "namespace": 3, "labels": 4, "pod_name": 5, "workloads": 6},
    flow_pb2.Layer4: {"TCP": 1, "UDP": 2, "ICMPv4": 3, "ICMPv6": 4, "SCTP": 5},
    flow_pb2.Layer7: {"type": 1, "latency_ns": 2, "dns": 100, "http": 101},
    flow_pb2.HTTP: {"code": 1, "method": 2, "url": 3, "protocol": 4, "headers": 5},
    flow_pb2.FlowFilter: {"source_ip": 1, "source_pod": 2, "destination_ip": 3, "destination_pod": 4,
                          "verdict": 5, "event_type": 6, "http_status_code": 9, "source_label": 10,
                          "destination_label": 11, "protocol": 12, "source_port": 13, "destination_port": 14,
                          "reply": 15, "source_service": 16, "destination_service": 17,
                          "source_identity": 19, "destination_identity": 20, "http_method": 21,
                          "http_path": 22, "tcp_flags": 23, "node_name": 24, "ip_version": 25,
                          "source_workload": 26, "destination_workload": 27, "uuid": 29, "traffic_direction": 30},
    flow_pb2.LostEvent: {"source": 1, "num_events_lost": 2, "cpu": 3},
    observer_pb2.GetFlowsRequest: {"number": 1, "follow": 3, "blacklist": 5, "whitelist": 6, "since": 7,
                                   "until": 8, "first": 9, "experimental": 999},
    observer_pb2.GetFlowsResponse: {"flow": 1, "node_status": 2, "lost_events": 3, "node_name": 1000,
                                    "time": 1001},
    observer_pb2.ServerStatusResponse: {"num_flows": 1, "max_flows": 2, "seen_flows": 3, "uptime_ns": 4,
                                        "num_connected_nodes": 5, "num_unavailable_nodes": 6,
                                        "unavailable_nodes": 7, "version": 8, "flows_rate": 9},
    observer_pb2.Node: {"name": 1, "version": 2, "address": 3, "state": 4, "tls": 5, "uptime_ns": 6,
                        "num_flows": 7, "max_flows": 8, "seen_flows": 9},
    relay_pb2.NodeStatusEvent: {"state_change": 1, "node_names": 2, "message": 3},
}


@pytest.mark.parametrize("message", list(EXPECTED), ids=lambda m: m.DESCRIPTOR.full_name)
def test_field_numbers(message):
    numbers = {f.name: f.number for f in message.DESCRIPTOR.fields}
    assert {name: numbers.get(name) for name in EXPECTED[message]} == EXPECTED[message]


def test_packages_services_and_enums():
    assert flow_pb2.Flow.DESCRIPTOR.full_name == "flow.Flow"
    assert relay_pb2.NodeStatusEvent.DESCRIPTOR.full_name == "relay.NodeStatusEvent"
    service = observer_pb2.DESCRIPTOR.services_by_name["Observer"]
    assert service.full_name == "observer.Observer"
    assert {m.name for m in service.methods} >= {"GetFlows", "GetNodes", "ServerStatus", "GetNamespaces"}
    assert (flow_pb2.FORWARDED, flow_pb2.DROPPED, flow_pb2.REDIRECTED) == (1, 2, 5)
    assert (flow_pb2.POLICY_DENIED, flow_pb2.POLICY_DENY, flow_pb2.AUTH_REQUIRED) == (133, 181, 189)
    assert (flow_pb2.L3_L4, flow_pb2.L7, flow_pb2.SPIRE, flow_pb2.HUBBLE_RING_BUFFER) == (1, 2, 1, 3)
    assert (relay_pb2.NODE_CONNECTED, relay_pb2.NODE_UNAVAILABLE, relay_pb2.NODE_ERROR) == (1, 2, 4)

"""Hubble's output formats, checked on flows built the way the agent builds them."""
import io
import json
import re

from shoal.agent.hubble.enrich import Enricher
from shoal.api.observer import observer_pb2 as O
from shoal.api.observer import relay_pb2
from shoal.cli.observe.printers import Printer, compact_line
from shoal.flows.records import http_flow, l4_flow
from tests.shoal.flows.flowbed import demo_state, kernel_event

ENRICH = Enricher(demo_state(), "node-1")
LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.\d{3} \[node-1\]: ")


def response(flow):
    return O.GetFlowsResponse(flow=flow, node_name=flow.node_name, time=flow.time)


def test_compact_forward_drop_reply_and_l7():
    syn = compact_line(response(ENRICH.kernel_flow(kernel_event(kind="connect", flags=0))))
    assert LINE.match(syn)
    assert syn.endswith("demo/client-0:40000 (ID:1001) -> demo/web-0:8080 (ID:1002) "
                        "from-endpoint FORWARDED (TCP Flags: SYN)")
    drop = compact_line(response(ENRICH.kernel_flow(kernel_event(verdict="DROPPED", reason=133))))
    assert drop.endswith("Policy denied DROPPED (TCP Flags: SYN)")
    reply = compact_line(response(ENRICH.kernel_flow(kernel_event(
        src="10.244.1.3", dst="10.244.1.2", sport=8080, dport=40000, flags=0x12, direction="INGRESS"))))
    assert "demo/client-0:40000 (ID:1001) <- demo/web-0:8080 (ID:1002) to-endpoint" in reply
    world = compact_line(response(ENRICH.kernel_flow(kernel_event(dst="192.0.2.1", flags=0x10))))
    assert "-> 192.0.2.1:8080 (world)" not in world and "<> 192.0.2.1:8080 (world)" in world
    l7 = ENRICH.proxy_flow(http_flow("10.244.1.3", 8080, "10.244.1.2", 40000, kind="response", method="GET",
                                     url="http://web/", code=503, latency_ns=7_000_000))
    line = compact_line(response(l7))
    assert "demo/client-0:40000 (ID:1001) <- demo/web-0:8080 (ID:1002) http-response FORWARDED " \
           "(HTTP/1.1 503 7ms (GET http://web/); mTLS)" in line
    l4 = ENRICH.proxy_flow(l4_flow("10.244.1.2", 40000, "10.244.2.3", 15008, event="open", mtls=True,
                                   src_spiffe="spiffe://cluster.local/ns/demo/sa/client",
                                   dst_spiffe="spiffe://cluster.local/ns/demo/sa/web"))
    assert "(TCP Flags: SYN; open mTLS spiffe://cluster.local/ns/demo/sa/client -> " \
           "spiffe://cluster.local/ns/demo/sa/web)" in compact_line(response(l4))


def test_json_and_jsonpb_one_object_per_line_with_proto_names():
    flow = ENRICH.kernel_flow(kernel_event(verdict="DROPPED", reason=181))
    for output in ("json", "jsonpb"):
        out = io.StringIO()
        printer = Printer(output, out, io.StringIO())
        printer.write(response(flow))
        printer.write(response(flow))
        lines = out.getvalue().splitlines()
        assert len(lines) == 2
        doc = json.loads(lines[0])
        body = doc["flow"]
        assert doc["node_name"] == "node-1" and doc["time"].endswith("Z")
        assert body["verdict"] == "DROPPED" and body["drop_reason_desc"] == "POLICY_DENY"
        assert body["source"]["pod_name"] == "client-0" and body["Type"] == "L3_L4"
        assert body["l4"]["TCP"]["destination_port"] == 8080 and body["is_reply"] is False
        assert body["IP"]["source"] == "10.244.1.2"


def test_dict_table_and_status_lines():
    flows = [ENRICH.kernel_flow(kernel_event(sport=p)) for p in (1, 2)]
    out = io.StringIO()
    printer = Printer("dict", out, io.StringIO())
    for flow in flows:
        printer.write(response(flow))
    assert out.getvalue().count("------------") == 1
    assert "     SOURCE: demo/client-0:1\n" in out.getvalue()
    out, err = io.StringIO(), io.StringIO()
    printer = Printer("table", out, err)
    for flow in flows:
        printer.write(response(flow))
    printer.write(O.GetFlowsResponse(node_status=relay_pb2.NodeStatusEvent(
        state_change=relay_pb2.NODE_UNAVAILABLE, node_names=["node-3"])))
    printer.write(O.GetFlowsResponse(lost_events={"source": 3, "num_events_lost": 9}, node_name="node-2"))
    printer.close()
    rows = out.getvalue().splitlines()
    assert rows[0].split() == ["TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(rows) == 3 and rows[1].index("demo/client-0:1") == rows[0].index("SOURCE")
    assert "1 nodes are unavailable: node-3" in err.getvalue()
    assert "[node-2]: EVENTS LOST: HUBBLE_RING_BUFFER 9" in err.getvalue()

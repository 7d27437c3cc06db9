"""`shoal observe` and `shoal list nodes` as real processes against a live relay."""
import asyncio
import json
import sys

import pytest

from shoal.agent.hubble import HubbleConfig, HubbleServer
from shoal.controller.relay import NodeTarget, Relay
from shoal.flows.records import http_flow
from tests.shoal.flows.flowbed import demo_state, kernel_event

pytestmark = pytest.mark.timeout(90)


async def shoal(*args):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def relay(sockdir):
    nodes = []
    for name in ("node-1", "node-2"):
        server = HubbleServer(HubbleConfig(node_name=name, unix_socket=sockdir / f"{name}.sock",
                                           tcp_address=None), demo_state())
        await server.start()
        nodes.append(server)
    nodes[0].kernel_sink(kernel_event(src="10.244.1.2", dst="10.244.1.3"))
    nodes[1].kernel_sink(kernel_event(src="10.244.1.2", dst="10.244.2.3", verdict="DROPPED", reason=133,
                                      direction="INGRESS"))
    nodes[1].kernel_sink(kernel_event(src="10.244.2.9", dst="10.244.2.3"))        # legacy -> demo
    nodes[1].ingest_flow(http_flow("10.244.2.3", 8080, "10.244.1.2", 40000, kind="response",
                                   method="GET", url="/", code=503))
    targets = [NodeTarget(n.config.node_name, f"unix:{n.config.unix_socket}") for n in nodes]
    server = Relay(targets, unix_socket=sockdir / "relay.sock")
    await server.start()
    yield f"unix:{sockdir / 'relay.sock'}"
    await server.stop(grace=0)
    for node in nodes:
        await node.stop(grace=0)


async def test_observe_namespace_both_nodes_jsonpb(relay):
    code, out, err = await shoal("observe", "--server", relay, "--from-namespace", "demo", "--last", "20",
                                 "-o", "jsonpb")
    assert code == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert {d["node_name"] for d in docs} == {"node-1", "node-2"}
    assert all(d["flow"]["source"]["namespace"] == "demo" for d in docs)


async def test_observe_drops_and_http_status_compact(relay):
    code, out, _ = await shoal("observe", "--server", relay, "--verdict", "DROPPED")
    assert code == 0
    assert out.count("\n") == 1 and "Policy denied DROPPED" in out and "[node-2]" in out
    code, out, _ = await shoal("observe", "--server", relay, "--http-status", "5+")
    assert code == 0 and "http-response FORWARDED (HTTP/1.1 503" in out and out.count("\n") == 1
    code, out, _ = await shoal("observe", "--server", relay, "--not", "--namespace", "legacy", "--protocol", "tcp")
    assert code == 0 and "legacy/" not in out and out.count("\n") == 3


async def test_bad_input_is_a_usage_error(relay):
    code, _, err = await shoal("observe", "--server", relay, "--verdict", "maybe")
    assert code == 2 and "unknown verdict 'maybe'" in err
    code, _, err = await shoal("observe", "--server", relay, "--first", "3", "--follow")
    assert code == 2 and "--follow" in err
    code, _, err = await shoal("observe", "--server", relay, "--not")
    assert code == 2 and "--not must be followed" in err


async def test_last_is_the_total_across_nodes_and_takes_since(relay):
    code, out, err = await shoal("observe", "--server", relay, "--last", "2")
    assert code == 0, err
    assert out.count("\n") == 2            # 4 flows on 2 nodes: the 2 newest, not 2 per node
    code, out, err = await shoal("observe", "--server", relay, "--last", "3", "--since", "5m", "-o", "jsonpb")
    assert code == 0, err
    assert len(out.splitlines()) == 3
    code, out, err = await shoal("observe", "--server", relay, "--last", "3", "--since", "1s", "--until", "1s")
    assert code == 0 and out == "", (out, err)


async def test_list_nodes(relay):
    code, out, err = await shoal("list", "nodes", "--server", relay)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "AGE", "FLOWS/S", "CURRENT/MAX-FLOWS"]
    assert [line.split()[:2] for line in lines[1:]] == [["node-1", "Connected"], ["node-2", "Connected"]]
    assert "3/4095" in lines[2]


async def test_list_namespaces(relay):
    code, out, err = await shoal("list", "namespaces", "--server", relay)
    assert code == 0, err
    assert [line.split()[-1] for line in out.splitlines()] == ["NAMESPACE", "demo", "legacy"]

"""The relay over real gRPC: two live agents' observers and one dead node."""
import asyncio
import time

import grpc
import pytest

from shoal.agent.hubble import HubbleConfig, HubbleServer
from shoal.api.flow import flow_pb2 as F
from shoal.api.observer import observer_pb2 as O
from shoal.api.observer import observer_pb2_grpc, relay_pb2
from shoal.controller.relay import NodeTarget, Relay
from shoal.flows.records import http_flow
from tests.conftest import until
from tests.shoal.flows.flowbed import demo_state, kernel_event

pytestmark = pytest.mark.timeout(60)


async def start_node(sockdir, name):
    server = HubbleServer(HubbleConfig(node_name=name, unix_socket=sockdir / f"{name}.sock", tcp_address=None),
                          demo_state())
    await server.start()
    return server


@pytest.fixture
async def cluster(sockdir):
    nodes = {name: await start_node(sockdir, name) for name in ("node-1", "node-2")}
    targets = [NodeTarget(name, f"unix:{sockdir / f'{name}.sock'}") for name in ("node-1", "node-2", "node-3")]
    relay = Relay(targets, unix_socket=sockdir / "relay.sock", node_timeout_s=1.0)
    await relay.start()
    async with grpc.aio.insecure_channel(f"unix:{sockdir / 'relay.sock'}") as channel:
        yield nodes, observer_pb2_grpc.ObserverStub(channel), relay
    await relay.stop(grace=0)
    for server in nodes.values():
        await server.stop(grace=0)


async def test_merges_nodes_in_time_order_and_reports_unavailable(cluster):
    nodes, stub, _ = cluster
    base = time.time_ns()
    for i in range(6):
        node = nodes["node-1" if i % 2 == 0 else "node-2"]
        node.kernel_sink(kernel_event(sport=i, ts_ns=base + i * 1000))
    # number is the total (as Hubble: --last 3 prints 3 lines), the merge is in time order.
    responses = [r async for r in stub.GetFlows(O.GetFlowsRequest(number=3))]
    statuses = [r.node_status for r in responses if r.HasField("node_status")]
    flows = [r for r in responses if r.HasField("flow")]
    assert [f.flow.l4.TCP.source_port for f in flows] == [3, 4, 5]
    assert [f.node_name for f in flows] == ["node-2", "node-1", "node-2"]
    assert [f.flow.node_name for f in flows] == ["node-2", "node-1", "node-2"]
    first = [r async for r in stub.GetFlows(O.GetFlowsRequest(number=3, first=True))]
    assert [r.flow.l4.TCP.source_port for r in first if r.HasField("flow")] == [0, 1, 2]
    assert (statuses[0].state_change, list(statuses[0].node_names)) == (relay_pb2.NODE_CONNECTED, ["node-1", "node-2"])
    assert (statuses[1].state_change, list(statuses[1].node_names)) == (relay_pb2.NODE_UNAVAILABLE, ["node-3"])


async def test_status_and_nodes(cluster):
    nodes, stub, _ = cluster
    nodes["node-1"].kernel_sink(kernel_event())
    status = await stub.ServerStatus(O.ServerStatusRequest())
    assert status.num_connected_nodes.value == 2 and status.num_unavailable_nodes.value == 1
    assert list(status.unavailable_nodes) == ["node-3"]
    assert (status.num_flows, status.max_flows, status.seen_flows) == (1, 2 * 4095, 1)
    listed = await stub.GetNodes(O.GetNodesRequest())
    assert [(n.name, n.state) for n in listed.nodes] == [
        ("node-1", relay_pb2.NODE_CONNECTED), ("node-2", relay_pb2.NODE_CONNECTED),
        ("node-3", relay_pb2.NODE_UNAVAILABLE)]


async def test_invalid_request_is_rejected_by_the_relay(cluster):
    _, stub, _ = cluster
    with pytest.raises(grpc.aio.AioRpcError) as error:
        [r async for r in stub.GetFlows(O.GetFlowsRequest(whitelist=[F.FlowFilter(http_status_code=["6xx"])]))]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "status code" in error.value.details()


async def test_follow_survives_a_node_dying_and_picks_it_up_again(cluster, sockdir):
    nodes, stub, relay = cluster
    relay.observer._retry_min = 0.1
    call = stub.GetFlows(O.GetFlowsRequest(follow=True))
    seen = []

    async def read():
        async for response in call:
            seen.append(response)

    def statuses(state):
        return [name for r in seen if r.HasField("node_status") and r.node_status.state_change == state
                for name in r.node_status.node_names]

    def flows():
        return [(r.node_name, r.flow.l4.TCP.source_port) for r in seen if r.HasField("flow")]

    reader = asyncio.create_task(read())
    await until(lambda: sorted(statuses(relay_pb2.NODE_CONNECTED)) == ["node-1", "node-2"], "both nodes connected")
    nodes["node-1"].kernel_sink(kernel_event(sport=1))
    await until(lambda: flows() == [("node-1", 1)], "node-1's flow")
    await nodes["node-1"].stop(grace=0)
    await until(lambda: "node-1" in statuses(relay_pb2.NODE_UNAVAILABLE), "node-1 reported unavailable")
    nodes["node-2"].kernel_sink(kernel_event(sport=2))
    await until(lambda: len(flows()) == 2, "node-2's flow while node-1 is down")
    assert sorted(statuses(relay_pb2.NODE_UNAVAILABLE)) == ["node-1", "node-3"]
    # node-1 comes back (a restarted agent, empty store): the relay reconnects by itself,
    # and asks it for what came after the last flow it forwarded (``since``).
    nodes["node-1"] = await start_node(sockdir, "node-1")
    await until(lambda: statuses(relay_pb2.NODE_CONNECTED).count("node-1") == 2, "node-1 reconnected")
    nodes["node-1"].kernel_sink(kernel_event(sport=3))
    await until(lambda: len(flows()) == 3, "node-1's flow after it came back")
    call.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert flows() == [("node-1", 1), ("node-2", 2), ("node-1", 3)]


async def test_follow_picks_up_a_node_that_joins(sockdir):
    first = await start_node(sockdir, "node-1")
    targets = [NodeTarget("node-1", f"unix:{sockdir / 'node-1.sock'}")]
    relay = Relay(lambda: list(targets), unix_socket=sockdir / "relay.sock", rediscover_s=0.2)
    await relay.start()
    late = None
    try:
        async with grpc.aio.insecure_channel(f"unix:{sockdir / 'relay.sock'}") as channel:
            call = observer_pb2_grpc.ObserverStub(channel).GetFlows(O.GetFlowsRequest(follow=True))
            seen, connected = [], []

            async def read():
                async for response in call:
                    if response.HasField("flow"):
                        seen.append(response.node_name)
                    elif response.HasField("node_status") and \
                            response.node_status.state_change == relay_pb2.NODE_CONNECTED:
                        connected.extend(response.node_status.node_names)

            reader = asyncio.create_task(read())
            await until(lambda: "node-1" in connected, "node-1 followed")
            late = await start_node(sockdir, "node-2")
            targets.append(NodeTarget("node-2", f"unix:{sockdir / 'node-2.sock'}"))
            await until(lambda: "node-2" in connected, "the node that joined followed")
            late.kernel_sink(kernel_event())
            first.kernel_sink(kernel_event())
            await until(lambda: len(seen) == 2, "a flow of each node")
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            assert sorted(seen) == ["node-1", "node-2"]
    finally:
        await relay.stop(grace=0)
        for server in (first, late):
            if server is not None:
                await server.stop(grace=0)


async def test_namespaces_are_merged_across_nodes(cluster):
    nodes, stub, _ = cluster
    nodes["node-1"].kernel_sink(kernel_event(src="10.244.1.2", dst="10.244.1.3"))     # demo -> demo
    nodes["node-2"].kernel_sink(kernel_event(src="10.244.2.9", dst="10.244.2.3"))     # legacy -> demo
    answer = await stub.GetNamespaces(O.GetNamespacesRequest())
    assert [ns.namespace for ns in answer.namespaces] == ["demo", "legacy"]


async def test_agent_events_are_merged_across_nodes(cluster):
    from shoal.xds import model as m

    nodes, stub, _ = cluster
    nodes["node-2"].enricher.state.apply(m.ConfigDelta(version="5", upserted=(
        m.Authorization(name="deny", namespace="demo", action="DENY"),)))
    got = [r async for r in stub.GetAgentEvents(O.GetAgentEventsRequest())]
    assert [(r.node_name, r.agent_event.type) for r in got] == [
        ("node-1", F.AGENT_STARTED), ("node-2", F.AGENT_STARTED), ("node-2", F.POLICY_UPDATED)]
    last = [r async for r in stub.GetAgentEvents(O.GetAgentEventsRequest(number=1))]
    assert [r.agent_event.type for r in last] == [F.POLICY_UPDATED]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        [r async for r in stub.GetAgentEvents(O.GetAgentEventsRequest(number=1, first=True, follow=True))]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_client_that_never_reads_is_cut_and_others_keep_streaming(sockdir):
    node = HubbleServer(HubbleConfig(node_name="node-1", unix_socket=sockdir / "node-1.sock", tcp_address=None,
                                     capacity=400_000), demo_state())
    await node.start()
    relay = Relay([NodeTarget("node-1", f"unix:{sockdir / 'node-1.sock'}")], unix_socket=sockdir / "r.sock")
    await relay.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sockdir / 'r.sock'}") as stuck_channel, \
                grpc.aio.insecure_channel(f"unix:{sockdir / 'r.sock'}") as live_channel:
            stuck = observer_pb2_grpc.ObserverStub(stuck_channel).GetFlows(O.GetFlowsRequest(follow=True))
            live = observer_pb2_grpc.ObserverStub(live_channel).GetFlows(O.GetFlowsRequest(follow=True))
            await stuck.initial_metadata()
            await live.initial_metadata()
            seen: list[int] = []

            async def read_live():
                async for response in live:
                    if response.HasField("flow"):
                        seen.append(response.flow.l4.TCP.source_port)
            reader = asyncio.create_task(read_live())
            sent = 0
            for _ in range(400):                    # 8 KiB flows: buffers fill in seconds, not minutes
                for i in range(40):
                    node.ingest_flow(http_flow("10.244.1.2", 1000 + i, "10.244.1.3", 8080, kind="request",
                                               method="GET", url="/" + "x" * 8192))
                sent += 40
                await asyncio.sleep(0.05)
                if (relay.registry.get_sample_value("shoal_relay_slow_clients_cut_total") or 0):
                    break
            assert (relay.registry.get_sample_value("shoal_relay_slow_clients_cut_total") or 0) == 1, "the client that never reads was not cut"
            with pytest.raises(grpc.aio.AioRpcError) as error:   # its buffered flows, then the status
                async for _ in stuck:
                    pass
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            node.kernel_sink(kernel_event(sport=65000))
            for _ in range(100):                    # the other client kept streaming, to the last flow
                if seen and seen[-1] == 65000:
                    break
                await asyncio.sleep(0.05)
            assert seen[-1] == 65000 and len(seen) >= 0.9 * sent, (len(seen), sent)
            reader.cancel()
            live.cancel()
    finally:
        await relay.stop(grace=0)
        await node.stop(grace=0)


async def test_last_n_then_follow_is_n_in_total_then_live(cluster):
    nodes, stub, _ = cluster
    base = time.time_ns() - 10**9
    for i in range(6):
        nodes["node-1" if i % 2 == 0 else "node-2"].kernel_sink(kernel_event(sport=i, ts_ns=base + i * 1000))
    call = stub.GetFlows(O.GetFlowsRequest(number=3, follow=True))
    ports = []

    async def read_until(count):
        while len(ports) < count:
            response = await call.read()
            if response.HasField("flow"):
                ports.append(response.flow.l4.TCP.source_port)
    await asyncio.wait_for(read_until(3), 10)
    assert ports == [3, 4, 5]                      # the cluster's 3 newest, not 3 per node
    await asyncio.sleep(0.5)
    nodes["node-2"].kernel_sink(kernel_event(sport=100))
    await asyncio.wait_for(read_until(4), 10)
    assert ports == [3, 4, 5, 100]
    call.cancel()


async def test_field_mask_through_the_relay(cluster):
    nodes, stub, _ = cluster
    nodes["node-1"].kernel_sink(kernel_event(sport=7))
    request = O.GetFlowsRequest()
    request.experimental.field_mask.paths.extend(["l4.TCP.source_port", "verdict"])
    flows = [r.flow async for r in stub.GetFlows(request) if r.HasField("flow")]
    assert [f.l4.TCP.source_port for f in flows] == [7]
    assert not flows[0].node_name and not flows[0].source.pod_name and flows[0].verdict == F.FORWARDED
    request.experimental.field_mask.paths.append("no.such.path")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        [r async for r in stub.GetFlows(request)]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no.such.path" in error.value.details()

"""GetAgentEvents: the agent reports what its config stream changed on its node."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from shoal.api.flow import flow_pb2 as F
from shoal.api.observer import observer_pb2 as O
from shoal.xds import model as m
from tests.agent.hubble.test_server import hub, sockdir  # noqa: F401 (fixtures)
from tests.shoal.flows.flowbed import workload

pytestmark = pytest.mark.timeout(60)


async def events(stub, **request):
    return [r async for r in stub.GetAgentEvents(O.GetAgentEventsRequest(**request))]


async def test_started_policy_endpoint_and_service_events(hub):
    state = hub.enricher.state
    policy = m.Authorization(name="deny-db", namespace="demo", action="DENY")
    pod = workload("db-0", "demo", "10.244.1.7", 1005, "db")
    state.apply(m.ConfigDelta(version="7", upserted=(policy, pod)))
    state.apply(m.ConfigDelta(version="8", removed=(m.resource_key(policy), m.resource_key(pod))))
    got = await events(hub.test_stub)
    kinds = [r.agent_event.type for r in got]
    assert kinds == [F.AGENT_STARTED, F.POLICY_UPDATED, F.ENDPOINT_CREATED, F.POLICY_DELETED, F.ENDPOINT_DELETED]
    update = got[1].agent_event.policy_update
    assert "k8s:io.cilium.k8s.policy.name=deny-db" in update.labels and update.revision == 7
    assert got[2].agent_event.endpoint_update.pod_name == "db-0" and got[2].node_name == "node-1"
    assert [r.agent_event.type for r in await events(hub.test_stub, number=1)] == [F.ENDPOINT_DELETED]


async def test_pods_of_other_nodes_are_not_this_agents_events(hub):
    hub.enricher.state.apply(m.ConfigDelta(version="9", upserted=(
        workload("far-0", "demo", "10.244.2.77", 1006, "far", node="node-2"),)))
    assert [r.agent_event.type for r in await events(hub.test_stub)] == [F.AGENT_STARTED]


async def test_follow_streams_new_events_and_bad_requests_are_refused(hub):
    call = hub.test_stub.GetAgentEvents(O.GetAgentEventsRequest(follow=True))
    await call.initial_metadata()
    hub.enricher.state.apply(m.ConfigDelta(version="10", upserted=(
        m.Authorization(name="p", namespace="demo", action="ALLOW"),)))
    response = await asyncio.wait_for(call.read(), 5)
    assert response.agent_event.type == F.POLICY_UPDATED
    call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await events(hub.test_stub, number=1, first=True, follow=True)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

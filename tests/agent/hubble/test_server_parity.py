"""What Hubble's own clients ask of an Observer: health name, field masks, --last with
--since, policy names on denied flows, auth_type, bounded requests (real gRPC socket)."""
from __future__ import annotations

import dataclasses
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal.agent.compiler import rule_id
from shoal.api.flow import flow_pb2 as F
from shoal.api.observer import observer_pb2 as O
from shoal.flows.query import MAX_FIELD_MASK_PATHS, MAX_FILTERS, MAX_REQUEST_BYTES
from shoal.xds import model as m
from tests.agent.hubble.test_server import collect, hub, ports_of, sockdir  # noqa: F401 (fixtures)
from tests.shoal.flows.flowbed import kernel_event

pytestmark = pytest.mark.timeout(60)


async def test_health_answers_the_name_hubble_clients_ask_for(hub):
    health = health_pb2_grpc.HealthStub(hub.test_channel)
    for service in ("hubble.server.Observer", "", "observer.Observer"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_field_mask_keeps_only_the_paths_asked_for(hub):
    hub.kernel_sink(kernel_event(sport=40001))
    request = O.GetFlowsRequest()
    request.experimental.field_mask.paths.extend(["time", "source.pod_name", "verdict", "l4.TCP.source_port"])
    (response,) = [r async for r in hub.test_stub.GetFlows(request)]
    flow = response.flow
    assert flow.source.pod_name == "client-0" and flow.l4.TCP.source_port == 40001
    assert flow.verdict == F.FORWARDED and flow.time.seconds
    assert not flow.destination.pod_name and not flow.IP.source and not flow.source.labels


@pytest.mark.parametrize("paths, reason", [
    (["source.no_such_field"], "unknown path 'source.no_such_field'"),
    (["bogus"], "unknown path"),
    ([f"source.pod_name{i}" for i in range(MAX_FIELD_MASK_PATHS + 1)], "at most"),
])
async def test_bad_field_masks_are_invalid_argument(hub, paths, reason):
    request = O.GetFlowsRequest()
    request.experimental.field_mask.paths.extend(paths)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        [r async for r in hub.test_stub.GetFlows(request)]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in error.value.details()


async def test_last_with_since(hub):
    base = time.time_ns()
    for i in range(6):
        hub.kernel_sink(kernel_event(sport=i, ts_ns=base + i * 10**9))
    since = base + 2 * 10**9
    got = await collect(hub.test_stub, number=2, since={"seconds": since // 10**9, "nanos": since % 10**9})
    assert ports_of(got) == [4, 5]
    got = await collect(hub.test_stub, number=2, first=True,
                        since={"seconds": since // 10**9, "nanos": since % 10**9})
    assert ports_of(got) == [2, 3]


async def test_kernel_drop_names_the_authorization_policy(hub):
    policy = m.Authorization(name="deny-client-db", namespace="demo", action="DENY")
    hub.enricher.state.apply(m.ConfigDelta(version="2", upserted=(policy,)))
    event = kernel_event(sport=40002, verdict="DROPPED", reason=181, kind="connect")
    event = dataclasses.replace(event, rule_id=rule_id(policy))
    hub.kernel_sink(event)
    (response,) = await collect(hub.test_stub)
    denied = list(response.flow.egress_denied_by)
    assert [(p.namespace, p.name, p.kind) for p in denied] == [
        (policy.namespace, policy.name, "AuthorizationPolicy")]
    assert response.flow.auth_type == F.DISABLED


async def test_huge_filter_lists_are_refused_and_others_served(hub):
    hub.kernel_sink(kernel_event())
    too_many = O.GetFlowsRequest(whitelist=[F.FlowFilter(source_pod=["x"])] * (MAX_FILTERS + 1))
    too_big = O.GetFlowsRequest(whitelist=[F.FlowFilter(source_pod=["x" * 1000] * (MAX_REQUEST_BYTES // 1000 + 1))])
    too_many_values = O.GetFlowsRequest(whitelist=[F.FlowFilter(source_pod=[f"p{i}" for i in range(5000)])])
    for request, code in ((too_many, grpc.StatusCode.INVALID_ARGUMENT),
                          (too_many_values, grpc.StatusCode.INVALID_ARGUMENT),
                          (too_big, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            [r async for r in hub.test_stub.GetFlows(request)]
        assert error.value.code() == code, error.value.details()
    assert len(await collect(hub.test_stub)) == 1

"""The I/O-free delta bookkeeping: both ends talk through real protobuf messages."""
import pytest

from shoal.api import config_pb2 as pb
from shoal.xds import convert
from shoal.xds import model as m
from shoal.xds.delta import DeltaReceiver, DeltaSender, ProtocolError

from .conftest import make_workload


def encode_push(push, resources):
    msg = pb.DeltaResponse(system_version=push.system_version, nonce=push.nonce,
                           removed=push.removed)
    for key in push.upserts:
        version, resource = resources[key]
        msg.resources.append(convert.to_proto(resource, version))
    return msg


def world(*resources, version="v1"):
    return {m.resource_key(r): (f"{version}-{m.resource_key(r)}", r) for r in resources}


def desired(resources):
    return {k: v for k, (v, _) in resources.items()}


def test_hello_names_the_build_and_an_older_client_sends_none():
    from shoal import __version__
    assert DeltaSender.from_hello(DeltaReceiver(node="n", component="agent").hello()).build_version == __version__
    older = DeltaSender.from_hello(pb.DeltaRequest(node="n", component="proxy"))
    assert older.build_version == ""
    huge = DeltaSender.from_hello(pb.DeltaRequest(node="n", component="proxy", build_version="x" * 10_000))
    assert len(huge.build_version) == 64   # a peer cannot bloat every status report


def test_full_sync_then_incremental_then_ack():
    rx = DeltaReceiver(node="node-1", component="agent")
    tx = DeltaSender.from_hello(rx.hello())
    web0, web1 = make_workload(), make_workload(uid="demo/web-1", ip="10.244.2.2", node="node-2")
    svc = m.Service(name="web", namespace="demo", vip="10.96.0.10",
                    ports=(m.ServicePort("http", 80, 8080),), endpoints=(web0.uid, web1.uid))
    res = world(web0, web1, svc)
    push = tx.plan(desired(res), "1")
    assert set(push.upserts) == set(res) and push.removed == ()
    delta, reply = rx.on_push(encode_push(push, res))
    assert set(delta.upserted) == {web0, web1, svc}
    assert not reply.HasField("error_detail") and reply.response_nonce == push.nonce
    assert tx.on_reply(reply) is None and tx.acked_version == "1" and tx.synced

    # Nothing changed for this client: nothing to send, and it is in sync with version 2.
    assert tx.plan(desired(res), "2") is None
    assert tx.acked_version == "2"
    # web-1 goes away, web-0 changes IP.
    moved = make_workload(ip="10.244.1.9")
    res2 = world(moved, svc)
    res2[m.resource_key(moved)] = ("v2", moved)
    push2 = tx.plan(desired(res2), "2", keys=[m.resource_key(moved), "workload/demo/web-1"])
    assert push2.upserts == ("workload/demo/web-0",)
    assert push2.removed == ("workload/demo/web-1",)
    delta2, reply2 = rx.on_push(encode_push(push2, res2))
    assert delta2.workloads == (moved,) and delta2.removed_of_type("workload") == ("demo/web-1",)
    tx.on_reply(reply2)
    assert tx.acked_version == "2"
    # Two pushes in flight: the first ACK is version 3, the last brings it to version 5.
    p3 = tx.plan({**desired(res2), "workload/demo/web-0": "v3"}, "3")
    assert tx.plan({**desired(res2), "workload/demo/web-0": "v3"}, "4") is None
    assert tx.acked_version == "2"      # v3 still in flight
    p5 = tx.plan({**desired(res2), "workload/demo/web-0": "v5"}, "5")
    tx.on_reply(pb.DeltaRequest(response_nonce=p3.nonce))
    assert tx.acked_version == "3"
    tx.on_reply(pb.DeltaRequest(response_nonce=p5.nonce))
    assert tx.acked_version == "5"
    assert rx.versions == desired(res2)


def test_nack_keeps_last_good_and_is_not_resent():
    rx = DeltaReceiver(node="node-1", component="agent")
    tx = DeltaSender.from_hello(rx.hello())
    good = make_workload()
    res = world(good)
    rx.on_push(encode_push(tx.plan(desired(res), "1"), res))
    tx.on_reply(pb.DeltaRequest(response_nonce="1"))
    # A push carrying a broken IP for the same workload, and a good new one.
    bad = pb.DeltaResponse(system_version="2", nonce="2")
    broken = convert.to_proto(good, "v2")
    broken.workload.ip = "10.244.1.999"
    bad.resources.append(broken)
    other = make_workload(uid="demo/web-1", ip="10.244.1.3")
    bad.resources.append(convert.to_proto(other, "v2"))
    tx.plan({"workload/demo/web-0": "v2", "workload/demo/web-1": "v2"}, "2")
    delta, reply = rx.on_push(bad)
    assert delta.workloads == (other,)
    assert reply.error_detail.code == 3 and "10.244.1.999" in reply.error_detail.message
    assert list(reply.rejected) == ["workload/demo/web-0"]
    # The receiver still holds the last good version: a reconnect resumes from it.
    assert rx.versions["workload/demo/web-0"] == res["workload/demo/web-0"][0]
    nack = tx.on_reply(reply)
    assert nack.rejected == ("workload/demo/web-0",) and tx.acked_version == "1"
    assert tx.plan({"workload/demo/web-0": "v2", "workload/demo/web-1": "v2"}, "3") is None
    # A fixed version of the rejected resource is accepted: the NACK is resolved.
    fixed = tx.plan({"workload/demo/web-0": "v3", "workload/demo/web-1": "v2"}, "4")
    assert fixed.upserts == ("workload/demo/web-0",) and tx.last_nack is not None
    tx.on_reply(pb.DeltaRequest(response_nonce=fixed.nonce))
    assert tx.last_nack is None and tx.acked_version == "4"


def test_validator_rejection_is_a_nack():
    def no_tcp(resource):
        if isinstance(resource, m.Workload) and resource.protocol == "TCP":
            raise ValueError("TCP workloads refused here")

    rx = DeltaReceiver(node="node-1", component="proxy", validator=no_tcp)
    push = pb.DeltaResponse(system_version="1", nonce="1")
    push.resources.append(convert.to_proto(make_workload(protocol="TCP"), "a"))
    delta, reply = rx.on_push(push)
    assert delta.upserted == () and "TCP workloads refused" in reply.error_detail.message


def test_resume_sends_only_the_difference():
    rx = DeltaReceiver(node="node-1", component="agent")
    a, b = make_workload(), make_workload(uid="demo/web-1", ip="10.244.1.3")
    res = world(a, b)
    tx = DeltaSender.from_hello(rx.hello())
    rx.on_push(encode_push(tx.plan(desired(res), "1"), res))
    # The controller restarts; b changed and c appeared meanwhile, a did not.
    c = make_workload(uid="demo/web-2", ip="10.244.1.4")
    res2 = {**world(a, c), "workload/demo/web-1": ("changed", b)}
    res2["workload/demo/web-0"] = res["workload/demo/web-0"]
    hello = rx.hello()
    assert dict(hello.initial_resource_versions) == desired(res)
    tx2 = DeltaSender.from_hello(hello)
    push = tx2.plan(desired(res2), "1")
    assert set(push.upserts) == {"workload/demo/web-1", "workload/demo/web-2"}


def test_protocol_errors():
    with pytest.raises(ProtocolError):
        DeltaSender.from_hello(pb.DeltaRequest(component="agent"))
    with pytest.raises(ProtocolError):
        DeltaSender.from_hello(pb.DeltaRequest(node="n", component="toaster"))
    with pytest.raises(ValueError):
        DeltaSender.from_hello(pb.DeltaRequest(node="n", component="agent",
                                               initial_resource_versions={"bogus/x": "1"}))
    tx = DeltaSender(node="n", component="agent")
    with pytest.raises(ProtocolError):
        tx.on_reply(pb.DeltaRequest(response_nonce="42"))


def test_convert_round_trip_every_type():
    policy = m.Authorization(
        name="allow-web", namespace="demo", action="ALLOW", selector=m.Labels({"app": "web"}),
        rules=(m.Rule(sources=(m.Source(principals=("cluster.local/ns/demo/sa/client",),
                                        ip_blocks=("10.0.0.0/8",)),),
                      operations=(m.Operation(ports=(8080,), methods=("GET",), paths=("/x*",)),),
                      conditions=(m.Condition("request.headers[x]", ("a",)),)),))
    wp = m.Waypoint(name="waypoint", namespace="demo", ip="10.244.1.50", service_account="wp",
                    spiffe_id="spiffe://cluster.local/ns/demo/sa/wp", uid="u1")
    wl = make_workload(waypoint=m.WaypointRef("demo", "waypoint"), mtls_mode="STRICT")
    svc = m.Service(name="web", namespace="demo", vip="10.96.0.10",
                    ports=(m.ServicePort("http", 80, 8080, "TCP"), m.ServicePort("grpc", 50051, 50051, "TCP", "grpc")),
                    endpoints=("demo/web-0",),
                    waypoint=m.WaypointRef("demo", "waypoint"))
    for resource in (policy, wp, wl, svc):
        wire = convert.to_proto(resource, "v").SerializeToString()
        assert convert.from_proto(pb.Resource.FromString(wire)) == resource
    assert hash(wl) == hash(convert.from_proto(convert.to_proto(wl)))


@pytest.mark.parametrize("mutate, message", [
    (lambda r: setattr(r.workload, "protocol", "UDP"), "protocol"),
    (lambda r: setattr(r.workload, "mtls_mode", "MAYBE"), "mtls_mode"),
    (lambda r: setattr(r, "type", "gizmo"), "unknown resource type"),
    (lambda r: setattr(r, "name", "demo/other"), "does not match"),
])
def test_convert_rejects_bad_fields(mutate, message):
    resource = convert.to_proto(make_workload())
    mutate(resource)
    with pytest.raises(ValueError, match=message):
        convert.from_proto(resource)

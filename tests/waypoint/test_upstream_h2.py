"""HTTP/2 upstream: the sans-I/O core against an in-memory h2 server, then grpcio end to end
(grpcio client -> waypoint h2c -> waypoint HTTP/2 upstream -> grpcio server)."""
import asyncio

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest

from shoal.waypoint.http import ResponseHead
from shoal.waypoint.upstream_h2 import (
    ConnectionGone,
    H2ClientCore,
    ResponseData,
    ResponseEnded,
    ResponseTrailers,
    StreamReset,
    WindowOpened,
    speaks_h2c,
)

from .conftest import traffic_policy

pytestmark = pytest.mark.timeout(60)


# -- protocol selection ---------------------------------------------------------------------------

@pytest.mark.parametrize("app_protocol,name,h2c", [
    ("http2", "", True), ("grpc", "web", True), ("kubernetes.io/h2c", "", True), ("HTTP2", "", True),
    ("http", "grpc", False),                # appProtocol wins over the name
    ("", "grpc", True), ("", "http2", True), ("", "h2c", True), ("", "grpc-api", True), ("", "http2-v2", True),
    ("", "grpc-web", False), ("", "http", False), ("", "grpcx", False), ("", "", False),
])
def test_protocol_selection_follows_istio(app_protocol, name, h2c):
    assert speaks_h2c(app_protocol, name) is h2c


# -- sans-I/O core ----------------------------------------------------------------------------------

def server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


def pair() -> tuple[H2ClientCore, h2.connection.H2Connection]:
    core, srv = H2ClientCore(), server()
    srv.receive_data(core.data_to_send())
    core.receive(srv.data_to_send())
    srv.receive_data(core.data_to_send())   # SETTINGS ACK
    return core, srv


def test_core_request_response_with_trailers():
    core, srv = pair()
    sid = core.request("POST", "web.demo:50051", "/demo.Echo/Say",
                       [("content-type", "application/grpc"), ("te", "trailers"), ("host", "x"),
                        ("connection", "keep-alive"), ("x-user", "a")], end_stream=False)
    assert core.send(sid, memoryview(b"\0\0\0\0\2hi")) == 7
    core.end(sid)
    events = srv.receive_data(core.data_to_send())
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    # Pseudo-headers first; connection-specific ones dropped, TE: trailers kept.
    assert request.headers == [(":method", "POST"), (":scheme", "http"), (":authority", "web.demo:50051"),
                               (":path", "/demo.Echo/Say"), ("content-type", "application/grpc"),
                               ("x-user", "a"), ("te", "trailers")]
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    srv.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    srv.send_data(sid, b"\0\0\0\0\2ok")
    srv.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
    events = core.receive(srv.data_to_send())
    assert events[0] == ResponseHead(200, [("content-type", "application/grpc")], stream_id=sid, ended=False)
    assert events[1] == ResponseData(sid, b"\0\0\0\0\2ok", 7)
    assert ResponseTrailers(sid, [("grpc-status", "0"), ("grpc-message", "")]) in events
    assert events[-1] == ResponseEnded(sid)


def test_core_trailers_only_answer_ends_with_the_head():
    core, srv = pair()
    sid = core.request("POST", "a", "/s/m", [], end_stream=True)
    srv.receive_data(core.data_to_send())
    srv.send_headers(sid, [(":status", "200"), ("grpc-status", "14")], end_stream=True)
    events = core.receive(srv.data_to_send())
    assert events == [ResponseHead(200, [("grpc-status", "14")], stream_id=sid, ended=True), ResponseEnded(sid)]


def test_core_send_stops_at_the_window_and_resumes_on_window_update():
    core, srv = pair()
    sid = core.request("POST", "a", "/upload", [], end_stream=False)
    body = memoryview(b"x" * 100_000)
    sent = core.send(sid, body)
    assert sent == 65535                      # the peer's default stream window
    assert core.send(sid, body[sent:]) == 0
    for event in srv.receive_data(core.data_to_send()):
        if isinstance(event, h2.events.DataReceived):
            srv.acknowledge_received_data(event.flow_controlled_length, sid)
    events = core.receive(srv.data_to_send())
    assert WindowOpened(sid) in events
    assert core.send(sid, body[sent:]) == 100_000 - 65535


def test_core_stream_limit_refused_streams_and_goaway():
    core, srv = pair()
    srv.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    core.receive(srv.data_to_send())
    assert core.stream_limit == 2
    first = core.request("GET", "a", "/1", [], end_stream=True)
    second = core.request("GET", "a", "/2", [], end_stream=True)
    srv.receive_data(core.data_to_send())
    srv.reset_stream(second, h2.errors.ErrorCodes.REFUSED_STREAM)
    assert core.receive(srv.data_to_send()) == [StreamReset(second, h2.errors.ErrorCodes.REFUSED_STREAM, True)]
    core.release(second)
    assert core.open_streams == {first}
    srv.close_connection(last_stream_id=first)
    assert core.receive(srv.data_to_send()) == [ConnectionGone(first, None)]
    # A graceful GOAWAY: no new streams; the connection stays up for the one it covers.
    assert core.stream_limit == 0 and core.going_away and not core.gone
    with pytest.raises(h2.exceptions.ProtocolError):
        core.request("GET", "a", "/3", [], end_stream=True)
    core.release(first)
    assert core.data_to_send()            # still speaking: the RST_STREAM goes out


def test_core_release_resets_a_stream_still_open():
    core, srv = pair()
    sid = core.request("POST", "a", "/chat", [], end_stream=False)
    core.release(sid)
    events = srv.receive_data(core.data_to_send())
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == sid for e in events)


def test_core_protocol_error_from_upstream_ends_the_connection():
    core, _ = pair()
    events = core.receive(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE of 0
    assert len(events) == 1 and isinstance(events[0], ConnectionGone) and events[0].error
    assert core.gone


# -- grpcio end to end ------------------------------------------------------------------------------

def channel_call(port: int, kind: str, method: str, request, authority="web.demo:50051", metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", authority)]) as channel:
        if kind == "unary":
            response, call = channel.unary_unary(method).with_call(request, timeout=10, metadata=metadata)
            return response, dict(call.trailing_metadata() or ())
        if kind == "stream":
            return list(channel.unary_stream(method)(request, timeout=10, metadata=metadata))
        return list(channel.stream_stream(method)(iter(request), timeout=10))


async def call(port, kind, method, request, **kw):
    return await asyncio.to_thread(channel_call, port, kind, method, request, **kw)


async def rpc_error(port, method, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await call(port, "unary", method, request, **kw)
    return caught.value


async def test_grpcio_unary_streaming_and_bidi_through_an_http2_upstream(bed):
    bed.grpc_backend("web")
    await bed.start()
    response, trailers = await call(bed.port, "unary", "/demo.Echo/Say", b"hello", metadata=(("x-user", "ann"),))
    assert response == b"web:hello"
    assert await call(bed.port, "stream", "/demo.Echo/Count", b"3") == [b"web:0", b"web:1", b"web:2"]
    assert await call(bed.port, "chat", "/demo.Echo/Chat", [b"a", b"b", b"c"]) == [b"web:a", b"web:b", b"web:c"]
    # The server saw the client's metadata, and the waypoint's trace headers.
    metadata = bed.seen["web"][0][1]
    assert metadata["x-user"] == "ann" and "traceparent" in metadata
    assert bed.metric("istio_requests_total", request_protocol="grpc", grpc_response_status="0") == 3


async def test_grpc_status_message_and_trailing_metadata_pass_end_to_end(bed):
    bed.grpc_backend("web")
    await bed.start()
    err = await rpc_error(bed.port, "/demo.Echo/Fail", b"5")        # NOT_FOUND, always
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "failed by web"
    assert dict(err.trailing_metadata())["x-failed-by"] == "web"
    assert bed.metric("istio_requests_total", grpc_response_status="5", response_code="200") == 1


async def test_concurrent_calls_share_one_upstream_connection(bed):
    bed.grpc_backend("web")
    await bed.start()
    results = await asyncio.gather(*(call(bed.port, "unary", "/demo.Echo/Say", str(i).encode()) for i in range(20)))
    assert sorted(r[0] for r in results) == sorted(f"web:{i}".encode() for i in range(20))
    pools = [c.pool for c in bed.proxy._clusters.values()]
    assert len(pools) == 1 and pools[0].open_connections == 1


async def test_grpc_retries_honour_grpc_status(bed):
    bed.grpc_backend("web")
    await bed.start(policies=[traffic_policy({"retries": {"attempts": 3, "retryOn": ["unavailable"],
                                                           "backoff": {"baseInterval": "1ms"}}})])
    # UNAVAILABLE twice, then OK: retried (the body of unknown length was kept for replay).
    response, _ = await call(bed.port, "unary", "/demo.Echo/Fail", b"14:2")
    assert response == b"web:recovered"
    assert bed.metric("shoal_waypoint_upstream_retries_total") == 2
    # INTERNAL is not in retryOn: one attempt, the client gets it.
    err = await rpc_error(bed.port, "/demo.Echo/Fail", b"13:2")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert [n for kind, n in bed.seen["web"] if kind == "Fail" and n] == [1, 2, 3, 1]
    # UNAVAILABLE every time: three attempts, then the last answer, flagged URX.
    err = await rpc_error(bed.port, "/demo.Echo/Fail", b"14")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "URX" in bed.access_log[-1]["response_flags"]


async def test_waypoint_errors_to_grpc_clients_are_http_200_with_grpc_status(bed):
    bed.grpc_backend("web")
    bed.services[("demo", "empty")] = []
    bed.http2.add(("demo", "empty"))
    await bed.start()
    assert (await rpc_error(bed.port, "/demo.Echo/Say", b"x", authority="empty.demo:50051")).code() == \
        grpc.StatusCode.UNAVAILABLE           # no healthy upstream
    assert (await rpc_error(bed.port, "/demo.Echo/Say", b"x", authority="nowhere.demo:1")).code() == \
        grpc.StatusCode.UNIMPLEMENTED         # no route
    assert bed.metric("istio_requests_total", response_code="200", grpc_response_status="14") == 1
    assert bed.metric("istio_requests_total", response_code="200", grpc_response_status="12") == 1


def grpcroute(rules):
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}], "rules": rules}}


async def test_grpcroute_weights_method_and_header_matches_and_header_filter(bed):
    for name in ("web", "web-v1", "web-v2"):
        bed.grpc_backend(name)
    await bed.start(routes=[grpcroute([
        {"matches": [{"method": {"service": "demo.Echo", "method": "Say"}}],
         "filters": [{"type": "RequestHeaderModifier",
                      "requestHeaderModifier": {"set": [{"name": "x-route", "value": "split"}], "remove": ["x-secret"]}}],
         "backendRefs": [{"name": "web-v1", "weight": 90}, {"name": "web-v2", "weight": 10}]},
        {"matches": [{"method": {"type": "RegularExpression", "service": "demo\\.Ech.", "method": "Count"},
                      "headers": [{"name": "x-tenant", "value": "blue"}]}],
         "backendRefs": [{"name": "web-v2"}]},
    ])], seed=7)
    answers = await asyncio.gather(*(call(bed.port, "unary", "/demo.Echo/Say", b"x", metadata=(("x-secret", "s"),))
                                     for _ in range(200)))
    v2 = sum(1 for response, _ in answers if response.startswith(b"web-v2:"))
    assert sum(1 for response, _ in answers if response.startswith(b"web-v1:")) + v2 == 200
    assert 10 <= v2 <= 30, v2                   # 10 % of 200, within +-10
    metadata = bed.seen["web-v1"][0][1]
    assert metadata["x-route"] == "split" and "x-secret" not in metadata
    # The second rule needs its header; without it nothing matches: UNIMPLEMENTED (no route).
    assert await call(bed.port, "stream", "/demo.Echo/Count", b"2", metadata=(("x-tenant", "blue"),)) == \
        [b"web-v2:0", b"web-v2:1"]
    with pytest.raises(grpc.RpcError) as caught:
        await call(bed.port, "stream", "/demo.Echo/Count", b"2")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_core_refuses_a_continuation_flood_and_a_ping_flood_from_the_upstream():
    """An upstream is a workload: the shared HBONE frame limits apply (GOAWAY, connection gone)."""
    core, _ = pair()
    sid = core.request("GET", "a", "/", [], end_stream=True)
    block = b"\x40\x01x\x01y" * 3000
    flood = len(block).to_bytes(3, "big") + b"\x01\x00" + sid.to_bytes(4, "big") + block
    flood += (len(block).to_bytes(3, "big") + b"\x09\x00" + sid.to_bytes(4, "big") + block) * 8
    events = core.receive(flood)
    assert len(events) == 1 and isinstance(events[0], ConnectionGone) and "header block" in events[0].error
    core, _ = pair()
    pings = (b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"\x00" * 8) * 500
    events = core.receive(pings)
    assert isinstance(events[-1], ConnectionGone) and "ping" in events[-1].error
    assert core.gone and b"\x00\x00\x00\x0b" in core.data_to_send()   # GOAWAY ENHANCE_YOUR_CALM

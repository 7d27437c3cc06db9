"""gRPC through the waypoint with a real grpcio client: errors carry the right grpc-status."""
import asyncio

import grpc
import pytest

from shoal.waypoint.grpc import MessageSizeLimit, MessageTooLarge, trailers_only
from shoal.waypoint.http import Limits
from shoal.xds.model import Authorization, Operation, Rule

pytestmark = pytest.mark.timeout(60)


def call(port: int, payload: bytes, authority: str = "web.demo:8080", method: str = "/demo.Echo/Say"):
    """One unary call with raw bytes (no generated stubs); raises grpc.RpcError."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", authority)]) as channel:
        return channel.unary_unary(method)(payload, timeout=10)


async def rpc_error(port: int, payload: bytes, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(call, port, payload, **kw)
    return caught.value


async def test_message_over_the_limit_is_resource_exhausted_and_counted(bed):
    await bed.backend("web")
    await bed.start(limits=Limits(max_grpc_message=1024))
    err = await rpc_error(bed.port, b"x" * 4096)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "4096 bytes" in err.details()
    assert bed.metric("shoal_waypoint_rejected_requests_total", reason="grpc_message_too_large") == 1
    assert bed.metric("istio_requests_total", grpc_response_status="8", request_protocol="grpc") == 1
    # The next call on a fresh channel is served as usual (the limit cost nobody else).
    assert (await rpc_error(bed.port, b"x" * 10, authority="nowhere.demo:1")).code() == grpc.StatusCode.UNIMPLEMENTED


async def test_local_replies_map_to_grpc_codes(bed):
    await bed.backend("web")
    deny = Authorization("no-say", "demo", "DENY", rules=(Rule(operations=(Operation(paths=("/demo.Echo/Say",)),)),))
    await bed.start(authz=[deny])
    assert (await rpc_error(bed.port, b"hi")).code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await rpc_error(bed.port, b"hi", authority="nowhere.demo:1")).code() == grpc.StatusCode.UNIMPLEMENTED


def test_message_prefixes_are_read_across_any_chunking():
    limit = MessageSizeLimit(100)
    stream = b"\x00" + (50).to_bytes(4, "big") + b"a" * 50 + b"\x00" + (101).to_bytes(4, "big")
    for i in range(len(stream) - 1):
        limit.feed(stream[i:i + 1])
    with pytest.raises(MessageTooLarge):
        limit.feed(stream[-1:])


def test_trailers_only_headers_percent_encode_the_message():
    headers = dict(trailers_only(8, "too big: 5\u00e9\n"))
    assert headers == {"content-type": "application/grpc", "grpc-status": "8", "grpc-message": "too big: 5%C3%A9%0A"}

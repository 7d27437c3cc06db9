"""The request head as the pipeline reads it, and the empty body."""
import dataclasses

import pytest

from shoal.waypoint.http import EmptyBody, PeerInfo, ProxyRequest, empty_body

from .conftest import generated_twin, init_values

PEER = PeerInfo("10.0.0.1", 4242)


def test_proxy_request_init_is_the_dataclass_one():
    """Written out (mypyc compiles it), it puts fields where the generated one would."""
    given = ("GET", "/a?b=1", "web", [("x", "1")], "HTTP/1.1", PEER, 7, "websocket", "https", {"x": "given"})
    assert init_values(ProxyRequest(*given)) == init_values(generated_twin(ProxyRequest)(*given))
    required = ("GET", "/", "web", [], "HTTP/1.1", PEER)
    assert init_values(ProxyRequest(*required)) == init_values(generated_twin(ProxyRequest)(*required))


def test_proxy_request_derives_path_and_joins_repeated_headers():
    request = ProxyRequest("GET", "/a/b?q=1", "web", [("x", "1"), ("y", "2"), ("x", "3")], "HTTP/1.1", PEER)
    assert request.path == "/a/b"
    assert request.header_map == {"x": "1,3", "y": "2"}
    given = {"x": "kept"}
    assert ProxyRequest("GET", "/", "web", [("x", "1")], "HTTP/1.1", PEER, header_map=given).header_map is given
    empty: dict[str, str] = {}
    # An empty map given is filled from the headers (the downstream builds it in the same pass).
    filled = ProxyRequest("GET", "/", "web", [("x", "1")], "HTTP/1.1", PEER, header_map=empty).header_map
    assert filled is empty and filled == {"x": "1"}
    assert dataclasses.replace(request, target="/c").path == "/c"


async def test_empty_body_yields_nothing():
    assert [chunk async for chunk in empty_body()] == []
    body = EmptyBody()
    for _ in range(2):
        with pytest.raises(StopAsyncIteration):
            await body.__anext__()

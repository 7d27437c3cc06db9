"""The HTTP/1.1 upstream's response object (the pools and exchanges are driven in test_proxy_http
and test_fastpath, through the proxy)."""
from shoal.waypoint.http import TcpStream
from shoal.waypoint.upstream import Endpoint, UpstreamConnection, UpstreamResponse, _NoBody

from .conftest import generated_twin, init_values


def test_upstream_response_init_is_the_dataclass_one():
    """Written out (one per request through the pipeline; mypyc compiles it)."""
    conn = UpstreamConnection(Endpoint("10.0.0.9", 80), TcpStream())   # not connected: only held here
    given = (101, [("upgrade", "websocket")], None, _NoBody(), conn, True, b"left")
    assert len(given) == len(init_values(UpstreamResponse(*given)))
    for values in (given, given[:5]):
        assert init_values(UpstreamResponse(*values)) == init_values(generated_twin(UpstreamResponse)(*values))

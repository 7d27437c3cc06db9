"""The per-request dataclasses whose ``__init__`` is written out (so that mypyc compiles it)
build the same objects as the ``__init__`` the dataclass decorator would generate.

Each class is compared with a twin made by ``dataclasses.make_dataclass`` from its own
fields: the same positional order, the same defaults, fresh mutable defaults."""
import dataclasses
from dataclasses import MISSING

import pytest

from shoal.telemetry_labels import PeerLabels, ServiceLabels
from shoal.waypoint.http import EmptyBody, PeerInfo, ProxyRequest, empty_body
from shoal.waypoint.telemetry import RequestRecord, TraceContext


def generated_twin(cls: type) -> type:
    """A dataclass with ``cls``'s init fields and defaults, and the generated ``__init__``."""
    specs: list = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not MISSING:
            specs.append((f.name, object, dataclasses.field(default=f.default)))
        elif f.default_factory is not MISSING:
            specs.append((f.name, object, dataclasses.field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, object))
    return dataclasses.make_dataclass(f"{cls.__name__}Twin", specs)


def init_values(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


PEER = PeerInfo("10.0.0.1", 4242)
TRACE = TraceContext("a" * 32, "b" * 16, "c" * 16, False)

# Every init field given, each value distinct and of its field's type, in field order.
ALL_GIVEN = {
    TraceContext: ("1" * 32, "2" * 16, "3" * 16, True),
    RequestRecord: (1.5, "POST", "/p", "web:80", "HTTP/2", "curl", "rid", "10.0.0.2", 5, "spiffe://s",
                    PeerLabels(workload="src"), PeerLabels(workload="dst"), ServiceLabels("f", "n", "ns"), True,
                    "14", "10.0.0.3:80", "10.96.0.1:80", "route-a", 503, {"UH"}, 11, 12, 3, True, TRACE, "deny-all",
                    2.5),
    ProxyRequest: ("GET", "/a?b=1", "web", [("x", "1")], "HTTP/1.1", PEER, 7, "websocket", "https", {"x": "given"}),
}
REQUIRED = {
    TraceContext: ("1" * 32, "2" * 16, "", True),
    RequestRecord: (0.25,),
    ProxyRequest: ("GET", "/", "web", [], "HTTP/1.1", PEER),
}


@pytest.mark.parametrize("cls", list(ALL_GIVEN), ids=lambda c: c.__name__)
def test_positional_fields_land_where_the_generated_init_puts_them(cls):
    values = ALL_GIVEN[cls]
    assert len(values) == len([f for f in dataclasses.fields(cls) if f.init])
    assert init_values(cls(*values)) == init_values(generated_twin(cls)(*values))


@pytest.mark.parametrize("cls", list(REQUIRED), ids=lambda c: c.__name__)
def test_defaults_are_the_fields_defaults(cls):
    required = REQUIRED[cls]
    assert init_values(cls(*required)) == init_values(generated_twin(cls)(*required))


def test_keywords_and_fresh_mutable_defaults():
    one, two = RequestRecord(start=0.0, status=200), RequestRecord(0.0)
    assert one.status == 200 and one.flags == set() and one.flags is not two.flags
    assert one == RequestRecord(0.0, status=200)     # the dataclass' __eq__ still compares fields
    assert "status=200" in repr(one)


def test_proxy_request_derives_path_and_joins_repeated_headers():
    request = ProxyRequest("GET", "/a/b?q=1", "web", [("x", "1"), ("y", "2"), ("x", "3")], "HTTP/1.1", PEER)
    assert request.path == "/a/b"
    assert request.header_map == {"x": "1,3", "y": "2"}
    given = {"x": "kept"}
    assert ProxyRequest("GET", "/", "web", [("x", "1")], "HTTP/1.1", PEER, header_map=given).header_map is given
    empty: dict[str, str] = {}
    # An empty map given is filled from the headers, as __post_init__ did.
    filled = ProxyRequest("GET", "/", "web", [("x", "1")], "HTTP/1.1", PEER, header_map=empty).header_map
    assert filled is empty and filled == {"x": "1"}
    assert dataclasses.replace(request, target="/c").path == "/c"


async def test_empty_body_yields_nothing():
    assert [chunk async for chunk in empty_body()] == []
    body = EmptyBody()
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()

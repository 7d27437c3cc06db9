"""Route selection (Gateway API precedence), weighted backends, filters."""
import dataclasses
import random

import pytest

from shoal.waypoint.model import BackendRef, Filter, parse_httproute
from shoal.waypoint.routing import RequestPlan, RouteTable, ServiceKey, apply_response_filters, plan_request

from .conftest import generated_twin, init_values

WEB = ServiceKey("demo", "web", 8080)


def route(rules, name="r", created=""):
    return parse_httproute({"kind": "HTTPRoute", "metadata": {"name": name, "namespace": "demo", "creationTimestamp": created},
                            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": rules}})


def backend(name, weight=1):
    return {"name": name, "port": 8080, "weight": weight}


def test_service_without_routes_routes_to_itself():
    d = RouteTable([]).select(WEB, "GET", "/", {})
    assert d.backend.name == "web" and d.backend.port == 8080 and d.route is None


@pytest.mark.parametrize("kind,value,path,hit", [
    ("Exact", "/a", "/a", True), ("Exact", "/a", "/a/", False),
    ("PathPrefix", "/a", "/a/b", True), ("PathPrefix", "/a", "/ab", False), ("PathPrefix", "/a/", "/a", True),
    ("RegularExpression", "/u/[0-9]+", "/u/42", True), ("RegularExpression", "/u/[0-9]+", "/u/x", False),
])
def test_path_matches(kind, value, path, hit):
    t = RouteTable([route([{"matches": [{"path": {"type": kind, "value": value}}], "backendRefs": [backend("hit")]}])])
    d = t.select(WEB, "GET", path + "?q=1", {})
    assert (d.backend is not None and d.backend.name == "hit") is hit
    if not hit:
        assert d.rule is None  # routes exist but none matches: 404


def test_more_specific_match_wins_regardless_of_order():
    t = RouteTable([route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [backend("root")]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [backend("api")]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-canary", "value": "1"}]}], "backendRefs": [backend("canary")]},
        {"matches": [{"path": {"type": "Exact", "value": "/api"}}], "backendRefs": [backend("exact")]},
    ])])
    assert t.select(WEB, "GET", "/x", {}).backend.name == "root"
    assert t.select(WEB, "GET", "/api/v1", {}).backend.name == "api"
    assert t.select(WEB, "GET", "/api/v1", {"x-canary": "1"}).backend.name == "canary"
    assert t.select(WEB, "GET", "/api", {"x-canary": "1"}).backend.name == "exact"


def test_method_query_and_header_regex():
    t = RouteTable([route([
        {"matches": [{"method": "POST", "queryParams": [{"name": "v", "type": "RegularExpression", "value": "2|3"}],
                      "headers": [{"name": "user", "type": "RegularExpression", "value": "a.*"}]}], "backendRefs": [backend("special")]},
        {"backendRefs": [backend("default")]},
    ])])
    assert t.select(WEB, "POST", "/p?v=2", {"user": "alice"}).backend.name == "special"
    assert t.select(WEB, "GET", "/p?v=2", {"user": "alice"}).backend.name == "default"
    assert t.select(WEB, "POST", "/p?v=4", {"user": "alice"}).backend.name == "default"
    assert t.select(WEB, "POST", "/p?v=2", {"user": "bob"}).backend.name == "default"


def test_older_route_wins_a_tie():
    new = route([{"backendRefs": [backend("new")]}], name="a", created="2026-01-02T00:00:00Z")
    old = route([{"backendRefs": [backend("old")]}], name="b", created="2026-01-01T00:00:00Z")
    assert RouteTable([new, old]).select(WEB, "GET", "/", {}).backend.name == "old"


def test_weighted_split_is_close_to_weights():
    t = RouteTable([route([{"backendRefs": [backend("v1", 90), backend("v2", 10)]}])], rng=random.Random(7))
    picks = [t.select(WEB, "GET", "/", {}).backend.name for _ in range(2000)]
    assert abs(picks.count("v2") / 2000 - 0.10) < 0.03
    zero = RouteTable([route([{"backendRefs": [backend("v1", 0), backend("v2", 1)]}])])
    assert {zero.select(WEB, "GET", "/", {}).backend.name for _ in range(50)} == {"v2"}


def test_header_modifiers_rewrite_redirect_and_mirror():
    r = route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}, "statusCode": 301}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "api.internal", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
                     {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "add": [{"name": "x-b", "value": "2"}], "remove": ["x-drop"]}},
                     {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-served-by", "value": "waypoint"}], "remove": ["server"]}},
                     {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 8080}, "percent": 25}}],
         "backendRefs": [backend("web")]},
    ])
    t = RouteTable([r])
    d = t.select(WEB, "GET", "/old/page?x=1", {})
    plan = plan_request(d, "/old/page?x=1", "web.demo:8080", [])
    assert plan.redirect == (301, "http://web.demo:8080/new/page?x=1")

    d = t.select(WEB, "GET", "/v1/items?q=2", {})
    plan = plan_request(d, "/v1/items?q=2", "web:8080", [("x-a", "0"), ("x-drop", "y"), ("accept", "*/*")])
    assert plan.target == "/v2/items?q=2" and plan.authority == "api.internal:8080"
    assert sorted(plan.headers) == [("accept", "*/*"), ("x-a", "1"), ("x-b", "2")]
    assert plan.mirrors[0][0].name == "shadow" and plan.mirrors[0][1] == 25
    assert apply_response_filters(plan, [("server", "x"), ("x-served-by", "app")]) == [("x-served-by", "waypoint")]


def test_redirect_scheme_change_drops_port():
    r = route([{"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]}])
    t = RouteTable([r])
    plan = plan_request(t.select(WEB, "GET", "/a", {}), "/a", "web:8080", [])
    assert plan.redirect == (302, "https://web/a")


def test_depends_on_says_when_a_decision_can_be_reused():
    other = ServiceKey("demo", "other", 8080)
    assert RouteTable([]).depends_on(WEB) == "service"
    paths = RouteTable([route([{"matches": [{"path": {"type": "PathPrefix", "value": "/a"}, "method": "POST"}],
                                "backendRefs": [backend("a")]}, {"backendRefs": [backend("b", 0), backend("c")]}])])
    assert paths.depends_on(WEB) == "path" and paths.depends_on(other) == "service"
    headers = RouteTable([route([{"matches": [{"headers": [{"name": "x-user", "value": "a"}]}],
                                  "backendRefs": [backend("a")]}])])
    query = RouteTable([route([{"matches": [{"queryParams": [{"name": "v", "value": "1"}]}],
                                "backendRefs": [backend("a")]}])])
    weighted = RouteTable([route([{"backendRefs": [backend("v1", 90), backend("v2", 10)]}])])
    assert headers.depends_on(WEB) == query.depends_on(WEB) == weighted.depends_on(WEB) == "request"


def test_service_key_compares_and_hashes_as_the_dataclass_did():
    """Its __eq__ and __hash__ are written out (mypyc compiles them): the generated ones' results."""
    twin = dataclasses.make_dataclass("ServiceKeyTwin", [("namespace", str), ("name", str), ("port", int)], frozen=True)
    for key in (WEB, ServiceKey("demo", "api", 80), ServiceKey("", "", 0)):
        assert hash(key) == hash(twin(key.namespace, key.name, key.port))
    assert WEB == ServiceKey("demo", "web", 8080) and WEB != ServiceKey("demo", "web", 8081)
    assert WEB != ("demo", "web", 8080) and WEB.__eq__(("demo", "web", 8080)) is NotImplemented
    assert {WEB: 1}[ServiceKey("demo", "web", 8080)] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        WEB.port = 1


def test_request_plan_init_is_the_dataclass_one():
    """Written out (two per request through the pipeline; mypyc compiles it)."""
    given = ("/t", "web", [("a", "1")], (301, "/x"), [(BackendRef("m", "demo", 80), 50.0)],
             [Filter("ResponseHeaderModifier")])
    assert len(given) == len(init_values(RequestPlan(*given)))
    for values in (given, given[:3]):
        assert init_values(RequestPlan(*values)) == init_values(generated_twin(RequestPlan)(*values))
    one, two = RequestPlan("/", "web", []), RequestPlan("/", "web", [])
    assert one.mirrors == [] and one.mirrors is not two.mirrors and one.response_filters is not two.response_filters
    assert one == two and "target='/'" in repr(one)

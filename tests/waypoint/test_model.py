"""Parsing HTTPRoute and TrafficPolicy from Kubernetes-shaped dicts."""
import re

import pytest

from shoal.waypoint.model import parse_duration, parse_httproute, parse_traffic_policy


def route(spec, name="r", namespace="demo"):
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [{"kind": "Service", "group": "", "name": "web", "port": 8080}], **spec}}


@pytest.mark.parametrize("text,seconds", [("100ms", 0.1), ("1s", 1.0), ("1m30s", 90.0), ("0.5s", 0.5), ("1h", 3600.0)])
def test_durations(text, seconds):
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "1x", "ms", "1s2", "-1s"])
def test_bad_durations_are_rejected(text):
    with pytest.raises(ValueError):
        parse_duration(text, "x")


def test_full_route_parses():
    r = parse_httproute(route({"rules": [{
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "GET",
                     "headers": [{"name": "X-Canary", "value": "yes"}],
                     "queryParams": [{"name": "v", "type": "RegularExpression", "value": "[0-9]+"}]}],
        "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-A", "value": "1"}], "remove": ["X-B"]}}],
        "backendRefs": [{"name": "web-v1", "port": 8080, "weight": 90}, {"name": "web-v2", "port": 8080, "weight": 10}],
        "timeouts": {"request": "100ms", "backendRequest": "50ms"},
    }]}))
    rule = r.rules[0]
    assert r.parent_refs[0].kind == "Service" and r.parent_refs[0].port == 8080
    assert rule.matches[0].headers[0].name == "x-canary"
    assert [b.weight for b in rule.backend_refs] == [90, 10]
    assert rule.timeouts.request == pytest.approx(0.1) and rule.timeouts.backend_request == pytest.approx(0.05)
    assert rule.filters[0].request_headers.set == (("x-a", "1"),)


def test_route_without_rules_gets_a_catch_all():
    r = parse_httproute(route({}))
    assert len(r.rules) == 1 and r.rules[0].matches[0].path.value == "/"


@pytest.mark.parametrize("spec,needle", [
    ({"rules": [{"matches": [{"path": {"type": "Glob", "value": "/x"}}]}]}, "path.type"),
    ({"rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "(["}}]}]}, "regular expression"),
    ({"rules": [{"matches": [{"path": {"type": "Exact", "value": "nope"}}]}]}, "start with '/'"),
    ({"rules": [{"backendRefs": [{"name": "web", "weight": -1}]}]}, "weight"),
    ({"rules": [{"filters": [{"type": "Teleport"}]}]}, "unsupported filter"),
    ({"rules": [{"timeouts": {"request": "1s", "backendRequest": "2s"}}]}, "backendRequest"),
    ({"rules": [{"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X", "value": "a\r\nb"}]}}]}]}, "CR, LF"),
    ({"rules": [{"matches": [{"path": {"type": "Exact", "value": "/a"}}],
                 "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}]}]}, "ReplacePrefixMatch"),
    # A rewritten path would go on the upstream request line: no request splitting through it.
    ({"rules": [{"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a HTTP/1.1\r\nX: y"}}}]}]}, "whitespace or control"),
])
def test_bad_routes_name_the_field(spec, needle):
    with pytest.raises(ValueError, match=needle if needle[0].isalpha() else None) as err:
        parse_httproute(route(spec))
    assert needle.lower() in str(err.value).lower()


def test_route_needs_a_parent():
    obj = route({})
    obj["spec"]["parentRefs"] = []
    with pytest.raises(ValueError, match="parentRefs"):
        parse_httproute(obj)


def policy(spec):
    return {"apiVersion": "networking.shoal.io/v1", "kind": "TrafficPolicy",
            "metadata": {"name": "p", "namespace": "demo"}, "spec": {"targetRefs": [{"kind": "Service", "name": "web"}], **spec}}


def test_traffic_policy_parses():
    p = parse_traffic_policy(policy({
        "retries": {"attempts": 3, "perTryTimeout": "200ms", "retryOn": ["5xx"], "backoff": {"baseInterval": "10ms", "maxInterval": "1s"}},
        "faults": {"abort": {"httpStatus": 503, "percentage": 50}, "delay": {"fixedDelay": "1s", "percentage": 10}},
        "connectionPool": {"maxConnections": 10, "maxPendingRequests": 5, "maxRequests": 20},
        "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "10s"},
        "rateLimit": {"maxTokens": 10, "tokensPerFill": 5, "fillInterval": "1s"},
    }))
    assert p.targets == ("web",)
    assert p.retries.attempts == 3 and p.retries.per_try_timeout == pytest.approx(0.2)
    assert p.faults.abort_status == 503 and p.faults.abort_percent == 50 and p.faults.delay == 1.0
    assert p.connection_pool.max_requests == 20
    assert p.outlier_detection.consecutive_5xx == 3
    assert p.rate_limit.tokens_per_fill == 5


@pytest.mark.parametrize("spec,needle", [
    ({"retries": {"attempts": 0}}, "attempts"),
    ({"retries": {"retryOn": ["sometimes"]}}, "retryOn"),
    ({"faults": {"abort": {"httpStatus": 503, "percentage": 150}}}, "percentage"),
    ({"rateLimit": {"maxTokens": 0}}, "maxTokens"),
    ({"rateLimit": {"maxTokens": 1, "fillInterval": "0s"}}, "fillInterval"),
])
def test_bad_traffic_policies(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_traffic_policy(policy(spec))


# ---------------------------------------------------------------- GRPCRoute

def grpcroute(rules, name="g"):
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 50051}], "rules": rules}}


def test_grpcroute_method_matches_become_path_matches():
    from shoal.waypoint.model import parse_grpcroute
    route = parse_grpcroute(grpcroute([
        {"matches": [{"method": {"service": "demo.Echo", "method": "Say"}},
                     {"method": {"service": "demo.Admin"}},
                     {"method": {"method": "Count"}},
                     {"method": {"type": "RegularExpression", "service": "demo\\.(Echo|Chat)", "method": "C.*"}},
                     {"headers": [{"name": "X-Tenant", "value": "blue"}]}],
         "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-via", "value": "wp"}]}}],
         "backendRefs": [{"name": "echo-v1", "port": 50051, "weight": 90}, {"name": "echo-v2", "port": 50051, "weight": 10}]}]))
    assert route.kind == "GRPCRoute" and route.parent_refs[0].port == 50051
    exact, service, method, regex, header = route.rules[0].matches
    assert exact.path.matches("/demo.Echo/Say") and not exact.path.matches("/demo.Echo/Sayx")
    assert service.path.matches("/demo.Admin/Anything") and not service.path.matches("/demo.AdminX/Any")
    assert method.path.matches("/any.Service/Count") and not method.path.matches("/a/b/Count")
    assert regex.path.matches("/demo.Chat/Chat") and regex.path.matches("/demo.Echo/Count")
    assert not regex.path.matches("/demo.Echo/Say")
    assert header.path.matches("/x.Y/Z") and header.headers[0].name == "x-tenant"
    assert exact.precedence() > service.precedence()     # an exact method wins over a service prefix
    assert [(b.name, b.weight) for b in route.rules[0].backend_refs] == [("echo-v1", 90), ("echo-v2", 10)]
    assert route.rules[0].filters[0].request_headers.set == (("x-via", "wp"),)


@pytest.mark.parametrize("rules,error", [
    ([{"matches": [{"method": {}}]}], "one of service and method"),
    ([{"matches": [{"method": {"service": "demo/Echo"}}]}], "not a gRPC service name"),
    ([{"matches": [{"method": {"method": "Say.Hi"}}]}], "not a gRPC method name"),
    ([{"matches": [{"method": {"type": "RegularExpression", "service": "("}}]}], "bad regular expression"),
    ([{"matches": [{"method": {"type": "Prefix", "service": "a"}}]}], "unsupported 'Prefix'"),
    ([{"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}]}], "not allowed in a GRPCRoute"),
    ([{"backendRefs": [{"name": "e", "filters": [{"type": "RequestRedirect", "requestRedirect": {}}]}]}],
     "backendRefs[0].filters"),
])
def test_grpcroute_refuses_what_gateway_api_refuses(rules, error):
    from shoal.waypoint.model import parse_grpcroute
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_grpcroute(grpcroute(rules))


def test_grpcroute_status_like_httproutes():
    from shoal.waypoint.model import httproute_status
    ok = httproute_status(grpcroute([{"backendRefs": [{"name": "echo-v1"}]}]), lambda ns, n: True, now="t0")
    assert [(c["type"], c["status"]) for c in ok["parents"][0]["conditions"]] == [("Accepted", "True"), ("ResolvedRefs", "True")]
    missing = httproute_status(grpcroute([{"backendRefs": [{"name": "gone"}]}]), lambda ns, n: False, now="t0")
    assert missing["parents"][0]["conditions"][1]["reason"] == "BackendNotFound"
    bad = httproute_status(grpcroute([{"matches": [{"method": {}}]}]), lambda ns, n: True, now="t0")
    assert bad["parents"][0]["conditions"][0]["reason"] == "Invalid"

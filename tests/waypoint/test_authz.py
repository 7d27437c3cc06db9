"""L7 AuthorizationPolicy evaluation (Istio semantics)."""
import pytest

from shoal.waypoint.authz import RequestAttributes, evaluate, match_string
from shoal.xds.model import Authorization, Condition, Operation, Rule, Source


def req(method="GET", path="/", principal="spiffe://cluster.local/ns/demo/sa/client", namespace="demo",
        headers=None, host="web.demo:8080", port=8080, ip="10.244.1.5"):
    return RequestAttributes(principal, namespace, ip, "10.96.0.10", port, method, path, host, headers or {})


def deny_admin_delete():
    return Authorization("no-admin-delete", "demo", "DENY",
                         rules=(Rule(operations=(Operation(methods=("DELETE",), paths=("/admin*",)),)),))


@pytest.mark.parametrize("pattern,value,hit", [
    ("/admin*", "/admin/x", True), ("/admin*", "/adm", False), ("*.png", "/a.png", True), ("*", "x", True), ("/a", "/a/", False)])
def test_match_string(pattern, value, hit):
    assert match_string(pattern, value) is hit


def test_deny_on_method_and_path():
    policies = [deny_admin_delete()]
    assert not evaluate(policies, req("DELETE", "/admin/users")).allowed
    assert evaluate(policies, req("GET", "/admin/users")).allowed
    assert evaluate(policies, req("DELETE", "/items/1")).allowed
    assert evaluate(policies, req("DELETE", "/admin")).policy == "demo/no-admin-delete"


def test_allow_list_with_principals_namespaces_and_when():
    allow = Authorization("allow-client", "demo", "ALLOW", rules=(Rule(
        sources=(Source(principals=("cluster.local/ns/demo/sa/client",)),),
        operations=(Operation(methods=("GET", "HEAD"), hosts=("web.demo",)),),
        conditions=(Condition("request.headers[x-team]", values=("blue", "green")),)),))
    ok = req(headers={"x-team": "blue"})
    assert evaluate([allow], ok).allowed
    assert not evaluate([allow], req(headers={"x-team": "red"})).allowed
    assert not evaluate([allow], req(headers={})).allowed
    assert not evaluate([allow], req(method="POST", headers={"x-team": "blue"})).allowed
    assert not evaluate([allow], req(principal="spiffe://cluster.local/ns/demo/sa/other", headers={"x-team": "blue"})).allowed
    assert not evaluate([allow], req(principal="", headers={"x-team": "blue"})).allowed


def test_deny_wins_over_allow_and_not_fields():
    allow_all = Authorization("all", "demo", "ALLOW", rules=(Rule(),))
    deny_other_ns = Authorization("ns", "demo", "DENY", rules=(Rule(sources=(Source(not_namespaces=("demo",)),)),))
    assert evaluate([allow_all, deny_other_ns], req()).allowed
    v = evaluate([allow_all, deny_other_ns], req(namespace="legacy"))
    assert not v.allowed and v.policy == "demo/ns"


def test_allow_with_no_rules_denies_everything():
    assert not evaluate([Authorization("none", "demo", "ALLOW")], req()).allowed


def test_ip_blocks_ports_and_unknown_condition_fail_closed():
    deny_net = Authorization("net", "demo", "DENY", rules=(Rule(sources=(Source(ip_blocks=("10.244.2.0/24",)),),
                                                               operations=(Operation(ports=(8080,)),)),))
    assert not evaluate([deny_net], req(ip="10.244.2.9")).allowed
    assert evaluate([deny_net], req(ip="10.244.1.9")).allowed
    assert evaluate([deny_net], req(ip="10.244.2.9", port=9090)).allowed
    weird = Rule(conditions=(Condition("request.auth.claims[iss]", values=("x",)),))
    assert not evaluate([Authorization("d", "demo", "DENY", rules=(weird,))], req()).allowed
    assert not evaluate([Authorization("a", "demo", "ALLOW", rules=(weird,))], req()).allowed

"""L4 AuthorizationPolicy semantics (Istio), pure."""
from __future__ import annotations

import pytest

from shoal.agent.ztunnel.authz import ConnectionInfo, authorize
from shoal.xds.model import Authorization, Condition, Operation, Rule, Source

CLIENT = ConnectionInfo("10.244.1.7", "10.244.2.5", 7000, "spiffe://cluster.local/ns/demo/sa/client")
LEGACY = ConnectionInfo("10.244.1.9", "10.244.2.5", 7000, None)


def allow(*rules, name="a"):
    return Authorization(name, "demo", "ALLOW", rules=tuple(rules))


def deny(*rules, name="d"):
    return Authorization(name, "demo", "DENY", rules=tuple(rules))


def src(**kw):
    return Rule(sources=(Source(**{k: tuple(v) for k, v in kw.items()}),))


def ops(**kw):
    return Rule(operations=(Operation(**{k: tuple(v) for k, v in kw.items()}),))


def test_no_policy_allows():
    assert authorize([], CLIENT).allowed


def test_allow_without_rules_denies_all():
    assert not authorize([allow()], CLIENT).allowed


def test_allow_naming_other_service_account_denies():
    policies = [allow(src(principals=["cluster.local/ns/demo/sa/other"]))]
    decision = authorize(policies, CLIENT)
    assert not decision.allowed and decision.reason == "no ALLOW policy matched"
    assert authorize([allow(src(principals=["cluster.local/ns/demo/sa/client"]))], CLIENT).allowed


def test_deny_wins_over_allow():
    policies = [allow(Rule()), deny(src(namespaces=["demo"]), name="no-demo")]
    decision = authorize(policies, CLIENT)
    assert not decision.allowed and decision.policy == "demo/no-demo"


@pytest.mark.parametrize("rule,conn,expected", [
    (src(principals=["cluster.local/ns/demo/*"]), CLIENT, True),
    (src(principals=["*/sa/client"]), CLIENT, True),
    (src(principals=["*"]), LEGACY, False),              # plaintext has no principal
    (src(not_principals=["*"]), LEGACY, True),
    (src(namespaces=["demo"]), CLIENT, True),
    (src(not_namespaces=["demo"]), CLIENT, False),
    (src(ip_blocks=["10.244.1.0/24"]), CLIENT, True),
    (src(ip_blocks=["10.244.2.0/24"]), CLIENT, False),
    (src(not_ip_blocks=["10.244.1.7"]), CLIENT, False),
    (ops(ports=[7000]), CLIENT, True),
    (ops(ports=[8080]), CLIENT, False),
    (ops(not_ports=[7000]), CLIENT, False),
    (ops(ports=[7000], methods=["GET"]), CLIENT, False),  # HTTP field in ALLOW: never matches
    (Rule(conditions=(Condition("source.ip", ("10.244.1.0/24",)),)), CLIENT, True),
    (Rule(conditions=(Condition("destination.port", not_values=("7000",)),)), CLIENT, False),
    (Rule(conditions=(Condition("request.headers[x]", ("a",)),)), CLIENT, False),
])
def test_allow_fields(rule, conn, expected):
    assert authorize([allow(rule)], conn).allowed is expected


def test_deny_with_http_fields_denies_more_not_less():
    assert not authorize([deny(ops(ports=[7000], paths=["/admin"]))], CLIENT).allowed
    assert authorize([deny(ops(ports=[8080], paths=["/admin"]))], CLIENT).allowed


def test_rule_parts_are_anded_and_lists_ored():
    rule = Rule(sources=(Source(namespaces=("other",)), Source(principals=("cluster.local/ns/demo/sa/client",))),
                operations=(Operation(ports=(7000,)),))
    assert authorize([allow(rule)], CLIENT).allowed
    assert not authorize([allow(rule)], ConnectionInfo("10.244.1.7", "10.244.2.5", 7001, CLIENT.src_identity)).allowed

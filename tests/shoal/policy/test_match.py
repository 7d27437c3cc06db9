"""Istio's matching primitives shared by the L4 and L7 evaluators."""
from shoal.policy.match import any_string, field_matches, in_blocks, match_string, principal_form


def test_string_patterns_follow_istio():
    assert match_string("*", "anything") and match_string("/admin*", "/admin/users")
    assert match_string("*.demo", "web.demo") and not match_string("*.demo", "web.prod")
    assert match_string("GET", "GET") and not match_string("GET", "get")
    assert not match_string("*", None) and not any_string(["a", "b"], "c")


def test_ip_blocks_never_match_garbage():
    assert in_blocks(["10.244.0.0/16"], "10.244.2.3") and in_blocks(["10.0.0.1"], "10.0.0.1")
    assert not in_blocks(["10.244.0.0/16"], "10.245.0.1")
    assert not in_blocks(["10.244.0.0/16"], "not-an-ip") and not in_blocks(["bogus"], "10.244.0.1")
    assert not in_blocks(["0.0.0.0/0"], None)


def test_positive_and_negative_fields():
    has = lambda values: "x" in values  # noqa: E731
    assert field_matches((), (), has)                       # nothing set: matches
    assert field_matches(("x",), (), has) and not field_matches(("y",), (), has)
    assert not field_matches((), ("x",), has) and field_matches((), ("y",), has)
    assert principal_form("spiffe://cluster.local/ns/a/sa/b") == "cluster.local/ns/a/sa/b"

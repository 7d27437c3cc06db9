"""Regex filters use RE2: bounded cost whatever the pattern (issue 11), Go's syntax (Hubble's)."""
from __future__ import annotations

import time

import pytest

from shoal.api.flow import flow_pb2
from shoal.flows.filters import MAX_REGEX_CHARS, FilterError, FlowMatcher
from shoal.flows.records import http_flow


def path_flow(path: str) -> flow_pb2.Flow:
    return http_flow("10.0.0.1", 1000, "10.0.0.2", 80, kind="request", method="GET", url=path)


@pytest.mark.parametrize("pattern", ["^/(a+)+$", "^/(a|aa)+$", "^/(a|a?)+$", "^/(.*a){20}$"])
def test_backtracking_patterns_match_in_linear_time(pattern):
    matcher = FlowMatcher([flow_pb2.FlowFilter(http_path=[pattern])])
    flow = path_flow("/" + "a" * 5000 + "!")
    started = time.perf_counter()
    for _ in range(100):
        assert not matcher(flow)
    assert time.perf_counter() - started < 1.0      # a backtracking engine: 2^5000 steps


@pytest.mark.parametrize("pattern, reason", [
    ("(a)\\1", "invalid escape sequence"),            # backreferences: not RE2, not Go
    ("(?=a)", "invalid perl operator"),                # lookahead
    ("a{1000}{1000}", "bad repetition operator"),
    ("(", "missing \\)"),
    ("a" * (MAX_REGEX_CHARS + 1), "longer than"),
])
def test_patterns_re2_refuses_are_invalid_argument(pattern, reason):
    with pytest.raises(FilterError, match=reason):
        FlowMatcher([flow_pb2.FlowFilter(http_path=[pattern])])
    with pytest.raises(FilterError, match="dns_query"):
        FlowMatcher([flow_pb2.FlowFilter(dns_query=[pattern])])

"""The load scenario's pure parts: the proxies' refusal counters and the soak's RSS growth."""
from shoal.perf.scenarios.load import parse_refusals, rss_growth

METRICS = """# HELP shoal_proxy_rejected_total Connections, streams or messages refused, by reason
# TYPE shoal_proxy_rejected_total counter
shoal_proxy_rejected_total{listener="outbound",reason="overloaded"} 1408.0
shoal_proxy_rejected_total{listener="outbound",reason="hbone_no_answer"} 2163.0
shoal_proxy_rejected_created{listener="outbound",reason="overloaded"} 1.79e+09
shoal_proxy_accept_paused_total{listener="outbound"} 3.0
shoal_proxy_accept_paused_created{listener="outbound"} 1.79e+09
shoal_proxy_connections_in_setup 12.0
"""


def test_refusals_are_read_by_listener_and_reason():
    assert parse_refusals(METRICS) == {"outbound/overloaded": 1408.0, "outbound/hbone_no_answer": 2163.0,
                                       "outbound/accept_paused": 3.0}
    assert parse_refusals("") == {}


def test_rss_growth_compares_the_last_quarter_with_the_first():
    assert rss_growth((100.0,) * 4) is None                  # too few readings to say
    assert abs(rss_growth((100.0,) * 8 + (110.0,) * 8) - 10.0) < 1e-9
    assert abs(rss_growth((100.0, 101.0, 99.0, 100.0) * 4)) < 1.5


def test_connection_counts_default_and_from_env(monkeypatch):
    from shoal.perf.scenarios.load import FULL, ONE_THOUSAND, QUICK, connection_counts

    monkeypatch.delenv("SHOAL_PERF_LOAD_CONNECTIONS", raising=False)
    assert connection_counts(quick=False) == (ONE_THOUSAND, FULL)
    assert connection_counts(quick=True) == (ONE_THOUSAND, QUICK)
    monkeypatch.setenv("SHOAL_PERF_LOAD_CONNECTIONS", "500, 3000")
    assert connection_counts(quick=False) == (500, 3000)
    monkeypatch.setenv("SHOAL_PERF_LOAD_CONNECTIONS", "0")
    assert connection_counts(quick=True) == ()


def test_the_refusal_note_names_what_grew_during_the_part():
    from shoal.perf.scenarios.load import refusal_delta

    before = {"node-1 outbound/hbone_no_answer": 10.0, "node-2 hbone/reset_before_answer": 4.0}
    after = {"node-1 outbound/hbone_no_answer": 25.0, "node-2 hbone/reset_before_answer": 4.0,
             "node-2 hbone/upstream_connect": 2.0}
    assert refusal_delta(before, after) == "15 node-1 outbound/hbone_no_answer, 2 node-2 hbone/upstream_connect"
    assert refusal_delta(after, after) == "none"

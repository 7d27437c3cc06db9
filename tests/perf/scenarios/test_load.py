"""The load scenario's pure parts: the proxies' refusal counters and the soak's RSS growth."""
from shoal.perf.scenarios.load import parse_refusals, steady_growth

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


def _run(rss_at, seconds: int = 600) -> list[tuple[float, float]]:
    return [(float(t), rss_at(t)) for t in range(seconds + 1)]


def test_memory_that_plateaus_after_warm_up_is_not_growth():
    # The shape of issue 18's quiet soak, warm-up only: 69.9 MB rising to 77.9 within the
    # first quarter, flat after. Quarter medians of the sum called such a run +13.8 %.
    warm = _run(lambda t: 69.9 + 8.0 * min(t, 140) / 140)
    growth = steady_growth(warm)
    assert abs(growth.percent) < 0.1 and abs(growth.start_mb - 77.9) < 0.1


def test_memory_that_keeps_rising_is_growth_wherever_it_is_in_the_run():
    leak = steady_growth(_run(lambda t: 100.0 + 0.01 * t))            # 36 MB an hour
    assert abs(leak.mb_per_hour - 36.0) < 1e-6
    assert abs(leak.percent - 4.5 / 101.5 * 100) < 0.01               # over the last 450 s
    steps = steady_growth(_run(lambda t: 70.0 + 2.0 * (t // 100)))    # a step every 100 s, never flat
    assert steps.percent > 5.0


def test_noise_is_not_growth_and_too_few_readings_say_nothing():
    noisy = steady_growth(_run(lambda t: 100.0 + (1.0 if t % 2 else -1.0)))
    assert abs(noisy.percent) < 0.1
    assert steady_growth(_run(lambda t: 100.0, seconds=5)) is None


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


def test_soak_failures_are_placed_by_start_time_and_those_after_the_burst_counted_apart():
    from shoal.perf.scenarios.load import failure_spread, failures_in_first

    # The shape of the soak after a 10,000 burst (issue 18): slow from the start, failing later.
    summary = {"window": 5, "failed_by_window": {"30": 232, "35": 963}, "slow_by_window": {"0": 441, "10": 7}}
    assert failures_in_first(summary, 15.0) == 0 and failures_in_first(summary, 35.0) == 232
    assert failure_spread(summary) == ("failures by start time 30-35 s: 232, 35-40 s: 963; "
                                       "slower than 1 s 0-5 s: 441, 10-15 s: 7")
    assert failure_spread({"window": 5, "failed_by_window": {}, "slow_by_window": {}}).count("none") == 2
    assert failure_spread({"ok": 1}) == "no per-window figures"


def test_a_soak_of_an_hour_gets_its_hour_even_under_quick(monkeypatch):
    from shoal.perf.scenarios.load import SCENARIO
    monkeypatch.setenv("SHOAL_PERF_SOAK_SECONDS", "3600")
    assert SCENARIO.time_limit(quick=True) >= 3600 + 300   # the concurrent part's budget on top
    monkeypatch.setenv("SHOAL_PERF_SOAK_SECONDS", "0")
    assert SCENARIO.time_limit(quick=True) < 3600

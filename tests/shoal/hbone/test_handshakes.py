"""The handshake gate of 15008 (issue 18), pure: handshakes in progress bounded per source
and per worker with a fair share, and sources that keep failing reported once; its limits
as both daemons' flags read them."""
from __future__ import annotations

import argparse

import pytest

from shoal.hbone import handshakes
from shoal.hbone.handshakes import EVICTED, PENALISED, RECONNECT_LOOP, SOURCE_CAP, HandshakeGate, HandshakeLimits

ABUSER, OTHER, THIRD = "10.0.0.66", "10.0.0.7", "10.0.0.8"


def test_one_source_is_capped_and_no_one_else_is():
    gate = HandshakeGate(per_source=3, total=10)
    assert [gate.admit(ABUSER, n) for n in range(3)] == [(None, [])] * 3
    assert gate.admit(ABUSER, 3) == (SOURCE_CAP, [])
    assert gate.admit(OTHER, "o") == (None, [])
    assert gate.finish(ABUSER, 0) is None          # one ended: room for one more
    assert gate.admit(ABUSER, 4) == (None, [])
    assert len(gate) == 4


def test_a_source_at_its_cap_is_known_before_a_key_is_asked_for():
    gate = HandshakeGate(per_source=2, total=10)
    assert not gate.at_cap(ABUSER)
    gate.admit(ABUSER, 0), gate.admit(ABUSER, 1)
    assert gate.at_cap(ABUSER) and not gate.at_cap(OTHER)
    gate.finish(ABUSER, 0)
    assert not gate.at_cap(ABUSER)


def test_past_the_total_the_largest_holder_makes_room_for_a_smaller_one():
    gate = HandshakeGate(per_source=8, total=8)
    for n in range(6):
        gate.admit(ABUSER, n)
    gate.admit(THIRD, "t0"), gate.admit(THIRD, "t1")
    assert gate.admit(OTHER, "o") == (None, [0])   # the abuser's oldest goes
    assert gate.admit(THIRD, "t2") == (None, [1])
    assert len(gate) == 8
    assert gate.finish(ABUSER, 0) == EVICTED and gate.finish(ABUSER, 1) == EVICTED
    assert len(gate) == 8                        # cut ones were already out


def test_a_newcomer_that_is_itself_the_largest_holder_is_refused():
    gate = HandshakeGate(per_source=4, total=4)
    for n in range(2):
        gate.admit(ABUSER, n), gate.admit(OTHER, f"o{n}")
    assert gate.admit(ABUSER, 9) == (EVICTED, [])
    assert gate.admit(THIRD, "t") == (None, [0])


def test_a_source_failing_again_and_again_is_reported_once_with_its_handshakes_in_progress():
    gate = HandshakeGate(failures=5, window=60.0)
    gate.admit(ABUSER, "a1"), gate.admit(ABUSER, "a2"), gate.admit(OTHER, "o")
    assert [gate.failed(ABUSER, float(n)) for n in range(4)] == [None] * 4
    assert gate.failed(OTHER, 4.0) is None
    assert gate.failed(ABUSER, 5.0) == ["a1", "a2"]
    assert gate.finish(ABUSER, "a1") == PENALISED and gate.finish(OTHER, "o") is None
    assert len(gate) == 0
    assert gate.failed(ABUSER, 6.0) is None         # counting starts over


def test_a_source_dialling_again_and_again_at_its_cap_is_reported_with_its_holders():
    """The handshake flood's holders: always at the cap, each freed slot taken back at once."""
    gate = HandshakeGate(per_source=2, cap_refusals=4, window=10.0)
    gate.admit(ABUSER, "h1"), gate.admit(ABUSER, "h2"), gate.admit(OTHER, "o")
    assert gate.admit(ABUSER, "h3") == (SOURCE_CAP, [])
    assert [gate.refused_at_cap(ABUSER, float(n)) for n in range(3)] == [None] * 3
    assert gate.refused_at_cap(ABUSER, 3.0) == ["h1", "h2"]
    assert gate.finish(ABUSER, "h1") == RECONNECT_LOOP and gate.finish(OTHER, "o") is None
    assert gate.failed(ABUSER, 4.0) is None          # a count of its own, not the failures'
    # A burst that meets the cap now and then, slower than the window, is never reported.
    assert all(gate.refused_at_cap(OTHER, 11.0 * n) is None for n in range(100))


def test_failures_spread_wider_than_the_window_are_forgiven():
    gate = HandshakeGate(failures=3, window=10.0)
    assert all(gate.failed(ABUSER, 11.0 * n) is None for n in range(100))


def test_tables_are_bounded():
    gate = HandshakeGate(failures=3, capacity=100)
    for n in range(10_000):
        gate.failed(f"10.1.{n // 256}.{n % 256}", 0.0)
    assert len(gate._failing) == 100
    gate = HandshakeGate(per_source=1, total=50)
    for n in range(10_000):
        refusal, victims = gate.admit(f"10.2.{n // 256}.{n % 256}", n)
        for victim in victims:
            assert gate.finish("", victim) == EVICTED
    assert len(gate) == 50 and len(gate._cut) == 0


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError):
        HandshakeGate(per_source=0)
    with pytest.raises(ValueError):
        HandshakeGate(per_source=10, total=5)


# -- the limits as both daemons' flags read them ---------------------------------------------

def parse(*argv: str) -> HandshakeLimits:
    parser = argparse.ArgumentParser()
    handshakes.add_flags(parser)
    return handshakes.limits_from_args(parser, parser.parse_args(list(argv)))


def test_the_flags_default_to_the_limits_and_set_each_of_them():
    assert parse() == HandshakeLimits() == HandshakeLimits(128, 256, 20, 60.0, 2.0, 60.0, 10.0)
    limits = parse("--max-handshakes-per-source", "8", "--max-handshakes", "32", "--handshake-failures", "5",
                   "--handshake-failure-window", "10", "--abuser-penalty", "1.5", "--abuser-longest-penalty", "30",
                   "--handshake-timeout", "2.5", "--handshake-cap-refusals", "50")
    assert limits == HandshakeLimits(per_source=8, total=32, failures=5, window=10.0, penalty=1.5,
                                     longest_penalty=30.0, timeout=2.5, cap_refusals=50)
    gate, box = limits.gate(), limits.penalty_box()
    assert (gate.per_source, gate.total, gate.failures, gate.window, gate.cap_refusals) == (8, 32, 5, 10.0, 50)
    assert (box.first, box.longest) == (1.5, 30.0)


@pytest.mark.parametrize("argv,named", [
    (["--max-handshakes-per-source", "0"], "--max-handshakes-per-source must be at least 1"),
    (["--max-handshakes", "64"], "--max-handshakes must be at least the per-source cap"),   # 128 per source
    (["--handshake-failures", "0"], "--handshake-failures must be at least 1"),
    (["--handshake-cap-refusals", "0"], "--handshake-cap-refusals must be at least 1"),
    (["--handshake-failure-window", "-1"], "--handshake-failure-window must be positive"),
    (["--abuser-penalty", "0"], "--abuser-penalty must be positive"),
    (["--abuser-penalty", "90"], "--abuser-longest-penalty must be at least the first penalty"),
    (["--max-handshakes", "lots"], "invalid int value"),
    (["--handshake-timeout", "0"], "--handshake-timeout must be positive (got 0.0)"),
    (["--handshake-timeout", "-2"], "--handshake-timeout must be positive (got -2.0)"),
    (["--handshake-timeout", "soon"], "argument --handshake-timeout: invalid float value"),
])
def test_values_that_cannot_work_are_a_usage_error_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert named in capsys.readouterr().err


def test_limits_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match="total: must be at least the per-source cap"):
        HandshakeLimits(per_source=10, total=5)
    with pytest.raises(ValueError, match="timeout: must be positive"):
        HandshakeLimits(timeout=0)

"""The penalty box of 15008 (issue 18): a source cut off for HTTP/2 abuse is refused at
accept for a while that doubles with each repeat, others never are; the table is bounded."""
from __future__ import annotations

from shoal.hbone import framing
from shoal.hbone.penalty import PenaltyBox

ABUSER, OTHER = "10.0.0.66", "10.0.0.7"


def test_an_abuser_is_refused_for_a_while_and_no_one_else_is():
    box = PenaltyBox(first=2.0)
    assert not box.refuses(ABUSER, 0.0)
    assert box.punish(ABUSER, 10.0) == 2.0
    assert box.refuses(ABUSER, 10.0) and box.refuses(ABUSER, 11.9)
    assert not box.refuses(OTHER, 10.0)
    assert not box.refuses(ABUSER, 12.0)   # served again: one more chance


def test_each_repeat_doubles_the_wait_up_to_the_longest():
    box = PenaltyBox(first=2.0, longest=30.0)
    waits = [box.punish(ABUSER, 100.0 + 40 * strike) for strike in range(6)]
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_source_that_behaves_long_enough_starts_over():
    box = PenaltyBox(first=2.0, forgive_after=600.0)
    box.punish(ABUSER, 0.0)
    assert box.punish(ABUSER, 10.0) == 4.0
    assert box.punish(ABUSER, 10.0 + 601.0) == 2.0


def test_the_table_is_bounded_and_forgets_the_oldest_abuser_first():
    box = PenaltyBox(capacity=100)
    for n in range(1000):
        box.punish(f"10.1.{n // 256}.{n % 256}", float(n))
    assert len(box) == 100
    assert not box.refuses("10.1.0.0", 999.0) and box.refuses("10.1.3.231", 999.0)


def test_the_abuse_reasons_are_the_limits_not_malformed_frames():
    assert {"ping_flood", "settings_flood", "premature_reset_flood", "header_block_too_large",
            "rst_stream_flood", "empty_data_flood", "priority_flood"} == framing.ABUSE_REASONS
    assert "h2_protocol" not in framing.ABUSE_REASONS

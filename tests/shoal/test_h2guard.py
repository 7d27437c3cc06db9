"""The HTTP/2 flood guard on raw frames, and the premature-reset ratio (pure, times given)."""
import h2.config
import h2.connection
import pytest

from shoal.h2guard import PREFACE, FloodGuard, PrematureResets


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def test_continuation_flood_is_named_before_the_block_ends():
    guard = FloodGuard(max_header_block=4096, expect_preface=True)
    assert guard.feed(PREFACE + frame(0x4, 0, 0)) is None
    assert guard.feed(frame(0x1, 0, 1, b"x" * 1000)) is None        # HEADERS, no END_HEADERS
    for _ in range(3):
        assert guard.feed(frame(0x9, 0, 1, b"x" * 1000)) is None
    assert guard.feed(frame(0x9, 0, 1, b"x" * 1000)) == ("header_block_too_large",
                                                         "CONTINUATION flood: header block over 4096 bytes")


def test_header_blocks_that_end_are_fine_however_many():
    guard = FloodGuard(max_header_block=4096)
    for stream in range(1, 200, 2):
        assert guard.feed(frame(0x1, 0, stream, b"x" * 3000) + frame(0x9, 0x4, stream, b"y" * 1000)) is None


def test_frames_split_anywhere_across_reads():
    guard = FloodGuard(max_header_block=100)
    data = frame(0x0, 0, 1, b"d" * 500) + frame(0x1, 0, 3, b"x" * 60) + frame(0x9, 0, 3, b"x" * 60)
    problems = [guard.feed(data[i:i + 7]) for i in range(0, len(data), 7)]
    assert [p for p in problems if p] and [p for p in problems if p][0][0] == "header_block_too_large"


class Tokens:
    """A budget of ``left`` frames per kind (what ``framing.Budget`` says, without a clock)."""

    def __init__(self, left: int) -> None:
        self.left: dict[str, int] = {}
        self.start = left

    def spend(self, kind: str) -> bool:
        self.left[kind] = self.left.get(kind, self.start) - 1
        return self.left[kind] >= 0


@pytest.mark.parametrize("kind,name", [(0x6, "ping"), (0x4, "settings"), (0x2, "priority"), (0x3, "rst_stream")])
def test_control_frames_draw_from_the_budget_and_acks_do_not(kind, name):
    guard = FloodGuard(max_header_block=4096, budget=Tokens(3))
    assert guard.feed(frame(kind, 0x1, 0) * 10 if kind in (0x6, 0x4) else b"") is None   # ACKs are free
    assert all(guard.feed(frame(kind, 0, 1, bytes(8))) is None for _ in range(3))
    assert guard.feed(frame(kind, 0, 1, bytes(8))) == (f"{name}_flood", f"{name.replace('_', ' ')} budget exhausted")


def test_stream_resets_alone_are_never_a_flood_without_a_budget():
    """Cancelling streams is a client's right; Rapid Reset is ``PrematureResets``' to judge."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    guard = FloodGuard(max_header_block=65536, expect_preface=True)
    for i in range(1000):
        client.send_headers(1 + 2 * i, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")])
        client.reset_stream(1 + 2 * i)
    assert guard.feed(client.data_to_send()) is None


# -- premature resets: a ratio (Envoy's rule), not a count ---------------------------------

def test_a_fresh_connection_is_cut_at_half_of_min_streams_premature_resets():
    guard = PrematureResets(min_streams=100)
    cuts = [guard.reset_unanswered(opened=0.0, now=0.0) for _ in range(50)]
    assert cuts == [False] * 49 + [True]   # the first rule allowed 200, then 20/s forever


def test_a_client_cancelling_a_minority_of_its_streams_is_never_cut():
    guard = PrematureResets(min_streams=100)
    for n in range(100_000):   # 49 % cancelled before the answer, spread out, for a long life
        if (n + 1) * 49 // 100 > n * 49 // 100:
            assert not guard.reset_unanswered(opened=0.0, now=0.1)
        else:
            guard.answered()


def test_one_complete_stream_per_reset_is_the_most_an_abuser_gets():
    guard = PrematureResets(min_streams=100)
    cut_at = None
    for n in range(1000):
        guard.answered()
        if guard.reset_unanswered(opened=0.0, now=0.0):
            cut_at = n
            break
    assert cut_at is not None and cut_at < 100   # half premature: cut once the ratio applies


def test_a_reset_after_the_minimum_lifetime_is_a_client_giving_up_not_an_attack():
    guard = PrematureResets(min_streams=100, min_lifetime=1.0)
    assert not any(guard.reset_unanswered(opened=0.0, now=1.5) for _ in range(10_000))
    assert guard.premature == 0


def test_good_streams_banked_long_ago_buy_a_bounded_burst_of_resets():
    guard = PrematureResets(min_streams=100, memory=1000)
    for _ in range(1_000_000):
        guard.answered()
    burst = 0
    while not guard.reset_unanswered(opened=0.0, now=0.0):
        burst += 1
    assert burst <= 1000   # without the decay: a million


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError):
        PrematureResets(min_streams=1)
    with pytest.raises(ValueError):
        PrematureResets(min_streams=100, memory=150)

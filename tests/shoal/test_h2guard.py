"""The HTTP/2 flood guard on raw frames (pure, an injected clock)."""
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
    assert "CONTINUATION flood" in guard.feed(frame(0x9, 0, 1, b"x" * 1000))


def test_header_blocks_that_end_are_fine_however_many():
    guard = FloodGuard(max_header_block=4096)
    for stream in range(1, 200, 2):
        assert guard.feed(frame(0x1, 0, stream, b"x" * 3000) + frame(0x9, 0x4, stream, b"y" * 1000)) is None


def test_frames_split_anywhere_across_reads():
    guard = FloodGuard(max_header_block=100)
    data = frame(0x0, 0, 1, b"d" * 500) + frame(0x1, 0, 3, b"x" * 60) + frame(0x9, 0, 3, b"x" * 60)
    problems = [guard.feed(data[i:i + 7]) for i in range(0, len(data), 7)]
    assert [p for p in problems if p] and "CONTINUATION" in [p for p in problems if p][0]


def test_rapid_reset_counts_resets_in_a_sliding_window():
    now = [0.0]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    guard = FloodGuard(max_header_block=65536, max_resets=10, window=10.0, expect_preface=True, clock=lambda: now[0])
    assert guard.feed(client.data_to_send()) is None
    for i in range(10):
        sid = 1 + 2 * i
        client.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")])
        client.reset_stream(sid)
        assert guard.feed(client.data_to_send()) is None
        now[0] += 1.5                                           # 10 resets over 15 s: within the rate
    sid = 21
    for _ in range(10):
        client.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")])
        client.reset_stream(sid)
        sid += 2
    assert "rapid reset" in guard.feed(client.data_to_send())


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

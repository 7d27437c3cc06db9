"""The HTTP/2 flood guard on raw frames (pure, an injected clock)."""
import h2.config
import h2.connection

from shoal.h2guard import PREFACE, FloodGuard


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

"""HTTP/2 flood guard: the frame-level abuse an HTTP/2 library lets through (sans-I/O),
and h2's one table that grows with a connection's age (``BoundedH2Connection``).

Two attacks cost a server far more than the client:

- **rapid reset** (CVE-2023-44487): open a stream, reset it at once, repeat. Each stream
  starts work (routing, an upstream request) that the reset throws away, and the
  concurrent-stream limit never bites because no stream stays open.
- **CONTINUATION flood** (CVE-2024-27316 and friends): a HEADERS frame without
  END_HEADERS, then CONTINUATION frames without end. The header block is buffered
  until it ends, so memory grows without bound before any header-size limit applies.

``FloodGuard.feed`` reads the frame headers of the bytes a peer sends (before the HTTP/2
library sees them) and names the first violation; the caller then answers GOAWAY
(ENHANCE_YOUR_CALM) and closes the connection. Only 9-byte frame headers are parsed;
payloads are skipped, so the cost is a few operations per frame.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import h2.config
import h2.connection

from shoal.framescan import FrameScanner

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
TYPE_HEADERS, TYPE_RST_STREAM, TYPE_CONTINUATION = 0x1, 0x3, 0x9
FLAG_END_HEADERS = 0x4
ENHANCE_YOUR_CALM = 0xB


# Closed streams a connection remembers per stream it allows open at once (see below).
CLOSED_STREAMS_PER_OPEN = 16


class BoundedH2Connection(h2.connection.H2Connection):
    """h2's connection, remembering ``remember_closed`` closed streams instead of 65,536.

    h2 remembers how each closed stream closed, to answer the frames a peer sent before it
    learnt of the close: after our RST_STREAM, its DATA or HEADERS in flight get a stream
    error; on a stream h2 no longer remembers, a connection error (every stream of the
    connection lost). It remembers the last 65,536, at ~176 bytes each, for the
    connection's life: an HBONE connection carries one stream per proxied TCP connection
    and lives while traffic flows, so at 200 new connections/s each end of it grew by
    11.5 MB in five and a half minutes (the soak's RSS "steps", issue 18), and 100 such
    connections could hold 1.1 GB. A frame trails its stream's close by about a round trip,
    in which a connection allowing N streams at once closes few more than N of them:
    ``CLOSED_STREAMS_PER_OPEN`` times N covers that many complete turnovers of its streams.
    """

    def __init__(self, config: h2.config.H2Configuration, remember_closed: int) -> None:
        self.MAX_CLOSED_STREAMS = remember_closed   # h2 sizes its table from it, in __init__
        super().__init__(config=config)


class FloodGuard:
    """Counts, per connection, header-block bytes and stream resets sent by the peer.

    ``max_header_block``: bytes of one HEADERS+CONTINUATION sequence (the decoded header
    list limit bounds it only after it ends). ``max_resets`` within ``window`` seconds:
    RST_STREAM frames from the peer (a client cancelling now and then stays far below).
    """

    def __init__(self, max_header_block: int, max_resets: int = 200, window: float = 10.0,
                 expect_preface: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_header_block = max_header_block
        self.max_resets = max_resets
        self.window = window
        self._clock = clock
        self._frames = FrameScanner(FRAME_HEADER, lambda header: int.from_bytes(header[:3], "big"),
                                    skip_first=len(PREFACE) if expect_preface else 0)
        self._block = -1                # bytes of the open header block; -1: none open
        self._resets: deque[float] = deque()

    def feed(self, data: bytes) -> str | None:
        """The violation in ``data`` (with what came before), or None."""
        for header in self._frames.feed(data):
            problem = self._frame(header[3], header[4], int.from_bytes(header[:3], "big"))
            if problem is not None:
                return problem
        return None

    def _frame(self, kind: int, flags: int, length: int) -> str | None:
        if kind == TYPE_HEADERS:
            self._block = -1 if flags & FLAG_END_HEADERS else length
        elif kind == TYPE_CONTINUATION and self._block >= 0:
            self._block += length
            if flags & FLAG_END_HEADERS:
                self._block = -1
        elif kind == TYPE_RST_STREAM:
            now = self._clock()
            self._resets.append(now)
            while self._resets and self._resets[0] < now - self.window:
                self._resets.popleft()
            if len(self._resets) > self.max_resets:
                return f"rapid reset: more than {self.max_resets} RST_STREAM in {self.window:g} s"
        if self._block > self.max_header_block:
            return f"CONTINUATION flood: header block over {self.max_header_block} bytes"
        return None

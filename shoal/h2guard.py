"""HTTP/2 flood guard: the frame-level abuse an HTTP/2 library lets through (sans-I/O).

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

from shoal.framescan import FrameScanner

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
TYPE_HEADERS, TYPE_RST_STREAM, TYPE_CONTINUATION = 0x1, 0x3, 0x9
FLAG_END_HEADERS = 0x4
ENHANCE_YOUR_CALM = 0xB


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

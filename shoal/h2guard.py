"""HTTP/2 flood guard: the frame-level abuse an HTTP/2 library lets through (sans-I/O),
and h2's one table that grows with a connection's age (``BoundedH2Connection``).

Two attacks cost a server far more than the client:

- **rapid reset** (CVE-2023-44487): open a stream, reset it at once, repeat. Each stream
  starts work (routing, an upstream request) that the reset throws away, and the
  concurrent-stream limit never bites because no stream stays open.
- **CONTINUATION flood** (CVE-2024-27316 and friends): a HEADERS frame without
  END_HEADERS, then CONTINUATION frames without end. The header block is buffered
  until it ends, so memory grows without bound before any header-size limit applies.

``PrematureResets`` is the rule for the first one where the server knows which streams
it answered (the HBONE layer, the waypoint's downstream HTTP/2): both proxies judge
resets the same way. ``FloodGuard.feed`` reads the frame headers of the bytes a peer
sends (before the HTTP/2 library sees them) and names the first violation; the caller
then answers GOAWAY (ENHANCE_YOUR_CALM) and closes the connection. Only 9-byte frame
headers are parsed; payloads are skipped, so the cost is a few operations per frame.
"""
from __future__ import annotations

from typing import Protocol

import h2.config
import h2.connection

from shoal.framescan import FrameScanner

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
TYPE_HEADERS, TYPE_PRIORITY, TYPE_RST_STREAM, TYPE_SETTINGS, TYPE_PING, TYPE_CONTINUATION = 0x1, 0x2, 0x3, 0x4, 0x6, 0x9
FLAG_END_HEADERS, FLAG_ACK = 0x4, 0x1
# The frames a ``FloodGuard`` with a budget charges, by the budget's kinds (framing.LIMITS).
BUDGETED = {TYPE_PING: "ping", TYPE_SETTINGS: "settings", TYPE_PRIORITY: "priority", TYPE_RST_STREAM: "rst_stream"}
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


class PrematureResets:
    """Rapid Reset (CVE-2023-44487) as a ratio, Envoy's rule: a connection is cut once the
    streams its peer reset prematurely are half of its streams.

    A reset is premature when the peer resets a stream we have not answered yet, within
    ``min_lifetime`` seconds of opening it: the work it started (authorization, an upstream
    dial) is thrown away. A stream answered, or reset after waiting that long (a client
    whose patience ran out because we were slow), counts as a normal stream. Why a ratio,
    not a fixed count or rate: the fixed budgets of 2023 differ 10x (hyper 20 reset streams
    waiting to be accepted, our own first rule 200 then 20/s) and a rate still lets a
    connection waste that many dials a second forever; a ratio lets a client cancel a few
    streams whatever its volume, and makes every wasted stream cost the attacker one
    complete stream (each one a real stream we would serve anyway), so an abuser gets at
    most twice a normal client's work out of us. Envoy (``overload.premature_reset_*``)
    waits for 500 streams before the ratio applies and cuts at 250 premature ones before
    that; here ``min_streams`` (100: one full window of an HBONE connection's streams)
    and so 50, since each premature stream may have cost a dial, not a cheap request.

    Unlike Envoy's, the counts do not cover the connection's whole life: once
    ``memory`` streams were counted both counts are halved, so a long-lived pooled
    connection cannot bank millions of good streams and then spend them in one burst of
    resets (it can bank at most about ``memory`` / 2). Pure: the caller gives the times.
    """

    def __init__(self, min_streams: int = 100, min_lifetime: float = 1.0, memory: int = 1000) -> None:
        if min_streams < 2 or memory < 2 * min_streams:
            raise ValueError("min_streams must be at least 2 and memory at least twice it")
        self.min_streams, self.min_lifetime, self.memory = min_streams, min_lifetime, memory
        self.streams = 0      # streams counted (decayed): answered, or reset before that
        self.premature = 0    # of those, reset prematurely (decayed)

    def answered(self) -> None:
        """A stream was answered (whatever the status)."""
        self._count(premature=False)

    def reset_unanswered(self, opened: float, now: float) -> bool:
        """The peer reset a stream opened at ``opened`` before we answered it: True when
        the connection has now gone past the limit (cut it)."""
        premature = now - opened < self.min_lifetime
        self._count(premature)
        return premature and self.premature * 2 >= max(self.streams, self.min_streams)

    def _count(self, premature: bool) -> None:
        self.streams += 1
        self.premature += premature
        if self.streams >= self.memory:
            self.streams //= 2
            self.premature //= 2


class FrameBudget(Protocol):
    """Per-connection frame budgets by kind (``shoal.hbone.framing.Budget``): False once spent."""

    def spend(self, kind: str) -> bool: ...


class FloodGuard:
    """Reads, per connection, the frame headers the peer sends: the header-block bytes of
    one HEADERS+CONTINUATION sequence (``max_header_block``; the decoded header list limit
    bounds it only after it ends), and, with a ``budget``, the control frames that cost us
    an answer or h2's work each (PING and SETTINGS but their ACKs, PRIORITY, RST_STREAM).

    Stream resets are not a count here: a client may cancel any number of streams it was
    answered (a long-lived HTTP/2 client does, for hours). Rapid Reset is judged where the
    server knows which streams it answered, by ``PrematureResets``; the RST_STREAM budget
    only bounds the frames themselves.
    """

    def __init__(self, max_header_block: int, expect_preface: bool = False, budget: FrameBudget | None = None) -> None:
        self.max_header_block = max_header_block
        self._budget = budget
        self._frames = FrameScanner(FRAME_HEADER, lambda header: int.from_bytes(header[:3], "big"),
                                    skip_first=len(PREFACE) if expect_preface else 0)
        self._block = -1                # bytes of the open header block; -1: none open

    def feed(self, data: bytes) -> tuple[str, str] | None:
        """The first violation in ``data`` (with what came before): (reason, detail), or None."""
        for header in self._frames.feed(data):
            problem = self._frame(header[3], header[4], int.from_bytes(header[:3], "big"))
            if problem is not None:
                return problem
        return None

    def _frame(self, kind: int, flags: int, length: int) -> tuple[str, str] | None:
        if kind == TYPE_HEADERS:
            self._block = -1 if flags & FLAG_END_HEADERS else length
        elif kind == TYPE_CONTINUATION and self._block >= 0:
            self._block += length
            if flags & FLAG_END_HEADERS:
                self._block = -1
        elif self._budget is not None and kind in BUDGETED:
            budgeted = BUDGETED[kind]
            if not (kind in (TYPE_PING, TYPE_SETTINGS) and flags & FLAG_ACK) and not self._budget.spend(budgeted):
                return f"{budgeted}_flood", f"{budgeted.replace('_', ' ')} budget exhausted"
        if self._block > self.max_header_block:
            return "header_block_too_large", f"CONTINUATION flood: header block over {self.max_header_block} bytes"
        return None

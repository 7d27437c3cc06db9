"""One HBONE stream as an async byte stream, for whoever parses a protocol inside it.

The node proxy joins each stream to a TCP socket (``session.StreamPeer``); the waypoint
parses HTTP inside it instead. ``HboneStream`` plugs into ``HboneSession`` with the same
stream-peer callbacks as ``StreamPeer`` and offers ``read``, ``write``, ``drain``,
``write_eof`` and ``close``.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

from shoal.hbone.session import HboneSession, StreamRefused


class HboneStream:
    """One HBONE stream as an async byte stream (and a stream peer for ``HboneSession``).

    Backpressure: received bytes are credited back to the sender only when ``read``
    hands them out; ``drain`` waits for send window and for the TLS transport.
    A reader driven by callbacks (the waypoint's fast path) sets ``on_readable`` and
    takes chunks with ``read_nowait``: same buffer, same credit, no future per read.
    """

    def __init__(self) -> None:
        self.session: HboneSession | None = None
        self.stream_id = 0
        self.response: asyncio.Future | None = None
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._pending = memoryview(b"")
        self._tls_paused = False
        self._eof_in = False
        self._want_eof = False
        self._eof_out = False
        self._reset: str | None = None
        self.finished = False
        self.on_readable: Callable[[], None] | None = None

    # -- HboneSession's stream-peer callbacks
    def bind(self, session: HboneSession, stream_id: int) -> None:
        self.session, self.stream_id = session, stream_id
        self._tls_paused = session.write_paused
        self._update_writable()

    def on_response(self, status: int) -> None:
        if self.response is not None and not self.response.done():
            self.response.set_result(status)

    def on_stream_data(self, data: bytes | memoryview, length: int) -> None:
        # The fast path hands out views of the received bytes; readers here parse them.
        self._chunks.append((bytes(data), length))
        self._wake_reader()

    def on_window(self) -> None:
        self._push()

    def on_stream_end(self) -> None:
        self._eof_in = True
        self._wake_reader()
        if self._eof_out:
            self._finish()

    def on_stream_reset(self, reason: str, unprocessed: bool = False) -> None:
        self._reset = reason
        if self.response is not None and not self.response.done():
            self.response.set_exception(StreamRefused(reason) if unprocessed else ConnectionResetError(reason))
        self._writable.set()
        self._finish()
        self._wake_reader()

    def set_paused(self, why: str, paused: bool) -> None:
        if why == "tls":
            self._tls_paused = paused
            self._update_writable()

    # -- the byte-stream interface
    async def read(self, n: int) -> bytes:
        while (data := self.read_nowait()) is None:
            self._readable.clear()
            await self._readable.wait()
        return data

    def read_nowait(self) -> bytes | None:
        """The next received chunk, b"" at the end of the stream, None when nothing came yet."""
        if not self._chunks:
            if self._reset is not None:
                raise ConnectionResetError(self._reset)
            if self._eof_in:
                return b""
            return None
        data, length = self._chunks.popleft()
        session = self.session
        if session is not None and not session.closed and length:
            h2 = session.h2
            h2.consumed(self.stream_id, length)
            if h2.output_queued:     # credit is sent in batches: most reads queue no WINDOW_UPDATE
                session.flush_soon()
        return data

    def write(self, data: bytes) -> None:
        if self._reset is not None:
            raise ConnectionResetError(self._reset)
        if not data:
            return
        session = self.session
        if not self._pending and session is not None and not session.closed \
                and session.h2.send_small(self.stream_id, data):
            # A request or answer of a ping-pong: one DATA frame within the windows, merged into
            # the session's outbound buffer (``_push``'s first case without its bookkeeping:
            # nothing is left pending, so writability and the stream's end are as they were).
            session.flush_soon()
            return
        self._pending = memoryview(bytes(self._pending) + data) if self._pending else memoryview(data)
        self._push()

    @property
    def write_blocked(self) -> bool:
        """Bytes wait for send window or the TLS transport: ``drain`` would wait."""
        return not self._writable.is_set()

    async def drain(self) -> None:
        while not self._writable.is_set():
            await self._writable.wait()
        if self._reset is not None:
            raise ConnectionResetError(self._reset)

    def write_eof(self) -> None:
        self._want_eof = True
        self._push()

    def close(self) -> None:
        if self.finished:
            return
        session = self.session
        if session is not None and not session.closed:
            # As a TCP close: FIN (END_STREAM) when everything written was sent, RST only
            # when bytes would be lost. A peer that has not finished yet (an idle pooled
            # upstream, a client that keeps its side open) gets a normal end, which its
            # node proxy must not report as a reset ("UR").
            if self._pending:
                session.h2.reset(self.stream_id)
            elif not self._eof_out:
                self._eof_out = True
                session.h2.end(self.stream_id)
            session.flush()
        self._finish()

    # -- internals
    def _wake_reader(self) -> None:
        self._readable.set()
        if self.on_readable is not None:
            self.on_readable()

    def _push(self) -> None:
        session = self.session
        if session is None or session.closed or self._reset is not None:
            return
        if self._pending:
            sent = session.h2.send(self.stream_id, self._pending)
            self._pending = self._pending[sent:]
        if self._want_eof and not self._pending and not self._eof_out:
            self._eof_out = True
            session.h2.end(self.stream_id)
        # At the end of this loop turn: what every stream of the session wrote in it (the
        # answers to requests that came in one read) leaves in one TLS write, as the node
        # proxy's streams do; bytes stay in order (each flush drains h2's one buffer).
        session.flush_soon()
        self._update_writable()
        if self._eof_out and self._eof_in:
            self._finish()

    def _update_writable(self) -> None:
        if (self._pending or self._tls_paused) and self._reset is None:
            self._writable.clear()
        else:
            self._writable.set()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            if self.session is not None:
                self.session.stream_done(self.stream_id)

"""HBONE DATA fast path (issue 13): a sans-I/O framer for the two frame types that carry
an established tunnel's bytes, DATA and WINDOW_UPDATE.

Profiles of the node proxy put most of its time in h2's per-frame machinery (an event
object, a state-machine step and several copies per frame). Once a CONNECT stream is
answered, what remains on it is DATA one way and WINDOW_UPDATE the other; this module
reads and writes those with a 9-byte header parse/encode, ``memoryview`` slices of
the received bytes (no copy) and flow control kept as plain integers. Every other frame
type, and any frame for a stream the fast path does not own, is handed back whole
(``Passthrough``) for h2 to process: the handshake, SETTINGS, PING, GOAWAY, RST_STREAM,
HEADERS stay h2's.

Bad input gets the answer RFC 9113 prescribes, as a :class:`FramingError` naming the
error code and whether it ends the stream or the connection: an oversized frame
(FRAME_SIZE_ERROR), padding longer than the frame (PROTOCOL_ERROR), DATA on stream 0
(PROTOCOL_ERROR), DATA past our receive window or a window grown past 2^31-1
(FLOW_CONTROL_ERROR), a zero window increment (PROTOCOL_ERROR). A peer that ignores
flow control cannot make us buffer without bound: its DATA beyond the window is an
error, not a queue.

Not yet wired into the data path: the driver still hands every frame to h2 (see the
node proxy README, "HBONE DATA fast path").
"""
from __future__ import annotations

from dataclasses import dataclass

FRAME_HEADER = 9
TYPE_DATA = 0x0
TYPE_WINDOW_UPDATE = 0x8
FLAG_END_STREAM = 0x1
FLAG_PADDED = 0x8
MAX_WINDOW = 2 ** 31 - 1
DEFAULT_MAX_FRAME = 16_384

# RFC 9113 section 7 error codes used here.
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6


class FramingError(Exception):
    """A frame the peer should not have sent. ``stream_id`` 0: a connection error (GOAWAY
    with ``code``); else a stream error (RST_STREAM with ``code``), the connection lives."""

    def __init__(self, code: int, stream_id: int, reason: str):
        super().__init__(reason)
        self.code, self.stream_id, self.reason = code, stream_id, reason


@dataclass(frozen=True)
class Data:
    """Payload bytes of an owned stream (padding removed). ``flow_length`` is what the
    frame cost in flow control (padding included): credit it back once written out."""
    stream_id: int
    payload: memoryview
    end_stream: bool
    flow_length: int


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    increment: int


@dataclass(frozen=True)
class Passthrough:
    """A whole frame (header included) that is h2's to process, in arrival order."""
    frame: memoryview


# -- encoding -----------------------------------------------------------------------------------

def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return (length.to_bytes(3, "big") + bytes((frame_type, flags))
            + (stream_id & MAX_WINDOW).to_bytes(4, "big"))


def data_header(stream_id: int, length: int, end_stream: bool = False) -> bytes:
    """The 9 bytes before a DATA payload: write them and the payload (a memoryview of
    the app's bytes) together, so the payload itself is never copied here."""
    return frame_header(length, TYPE_DATA, FLAG_END_STREAM if end_stream else 0, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    if not 0 < increment <= MAX_WINDOW:
        raise ValueError(f"window increment {increment} out of range")
    return frame_header(4, TYPE_WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big")


# -- flow control ---------------------------------------------------------------------------------

class Window:
    """One flow-control window in plain integers (a stream's or the connection's)."""
    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def take(self, wanted: int) -> int:
        """Send up to ``wanted`` bytes: how many the window allows now (it shrinks by that)."""
        granted = min(wanted, self.size) if self.size > 0 else 0
        self.size -= granted
        return granted

    def grow(self, increment: int, stream_id: int) -> None:
        if self.size + increment > MAX_WINDOW:
            raise FramingError(FLOW_CONTROL_ERROR, stream_id, f"window grown past 2^31-1 on stream {stream_id}")
        self.size += increment


# -- decoding -----------------------------------------------------------------------------------

class FrameReader:
    """Splits received bytes into frames: DATA and WINDOW_UPDATE of owned streams become
    events, everything else ``Passthrough``. Tracks the receive windows it enforces."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, connection_window: int = 65_535):
        self.max_frame = max_frame
        self.receive_window = connection_window      # connection level, what the peer may still send
        self._streams: dict[int, int] = {}           # owned stream -> its receive window
        self._chunks: list[bytes] = []
        self._buffered = 0

    def own(self, stream_id: int, receive_window: int) -> None:
        """From now on this stream's DATA and WINDOW_UPDATE frames are the fast path's."""
        self._streams[stream_id] = receive_window

    def release(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def credit(self, stream_id: int, length: int) -> bytes:
        """Give ``length`` bytes of receive window back (they were written out): the
        WINDOW_UPDATE frames to send, stream and connection."""
        if length <= 0:
            return b""
        self.receive_window += length
        out = window_update(0, length)
        if stream_id in self._streams:
            self._streams[stream_id] += length
            out += window_update(stream_id, length)
        return out

    def feed(self, data: bytes) -> list[Data | WindowUpdate | Passthrough]:
        """Every complete frame in what arrived so far; a partial one waits for more."""
        if self._chunks:
            self._chunks.append(data)
            self._buffered += len(data)
            if not self._complete():
                return []
            data = b"".join(self._chunks)
            self._chunks, self._buffered = [], 0
        view = memoryview(data)
        events: list[Data | WindowUpdate | Passthrough] = []
        offset, end = 0, len(view)
        while end - offset >= FRAME_HEADER:
            length = int.from_bytes(view[offset:offset + 3], "big")
            if length > self.max_frame:
                raise FramingError(FRAME_SIZE_ERROR, 0, f"frame of {length} bytes over the {self.max_frame} maximum")
            if end - offset < FRAME_HEADER + length:
                break
            events.append(self._frame(view[offset:offset + FRAME_HEADER + length], length))
            offset += FRAME_HEADER + length
        if offset < end:
            rest = bytes(view[offset:])  # a partial frame: at most one frame is ever held
            self._chunks, self._buffered = [rest], len(rest)
        return events

    def _complete(self) -> bool:
        head = b"".join(self._chunks)[:FRAME_HEADER] if len(self._chunks[0]) < FRAME_HEADER else self._chunks[0]
        if len(head) < FRAME_HEADER:
            return False
        length = int.from_bytes(head[:3], "big")
        if length > self.max_frame:
            raise FramingError(FRAME_SIZE_ERROR, 0, f"frame of {length} bytes over the {self.max_frame} maximum")
        return self._buffered >= FRAME_HEADER + length

    def _frame(self, frame: memoryview, length: int) -> Data | WindowUpdate | Passthrough:
        frame_type, flags = frame[3], frame[4]
        stream_id = int.from_bytes(frame[5:9], "big") & MAX_WINDOW
        if frame_type == TYPE_DATA:
            if stream_id == 0:
                raise FramingError(PROTOCOL_ERROR, 0, "DATA on stream 0")
            if stream_id not in self._streams:
                return Passthrough(frame)
            return self._data(frame, length, flags, stream_id)
        if frame_type == TYPE_WINDOW_UPDATE and (stream_id in self._streams or stream_id == 0):
            if length != 4:
                raise FramingError(FRAME_SIZE_ERROR, 0, f"WINDOW_UPDATE of {length} bytes, not 4")
            increment = int.from_bytes(frame[9:13], "big") & MAX_WINDOW
            if increment == 0:
                raise FramingError(PROTOCOL_ERROR, stream_id, f"zero window increment on stream {stream_id}")
            return WindowUpdate(stream_id, increment)
        return Passthrough(frame)

    def _data(self, frame: memoryview, length: int, flags: int, stream_id: int) -> Data:
        start, stop = FRAME_HEADER, FRAME_HEADER + length
        if flags & FLAG_PADDED:
            if length < 1 or frame[FRAME_HEADER] >= length:
                raise FramingError(PROTOCOL_ERROR, 0, "DATA padding as long as the frame")
            start, stop = start + 1, stop - frame[FRAME_HEADER]
        if length > self.receive_window or length > self._streams[stream_id]:
            raise FramingError(FLOW_CONTROL_ERROR, 0 if length > self.receive_window else stream_id,
                               f"{length} bytes of DATA past the receive window on stream {stream_id}")
        self.receive_window -= length
        self._streams[stream_id] -= length
        end_stream = bool(flags & FLAG_END_STREAM)
        if end_stream:
            del self._streams[stream_id]  # the peer's direction is over: its frames are h2's again
        return Data(stream_id, frame[start:stop], end_stream, length)

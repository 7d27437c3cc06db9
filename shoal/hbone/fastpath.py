"""HBONE DATA fast path (issue 13): sans-I/O pieces that read and write the two frame
types carrying an established tunnel's bytes, DATA and WINDOW_UPDATE, without h2.

Profiles of the node proxy put most of its time in h2's per-frame machinery (an event
object, a state-machine step and several copies per frame). Here a frame costs a 9-byte
header parse or encode; payloads are ``memoryview`` slices of the received bytes (no
copy); flow control is plain integers (:class:`FlowControl`).

Who owns what (``framing.HboneConnection`` wires it): the fast path owns the
connection-level flow control in both directions, alone, and every DATA and
WINDOW_UPDATE frame of the streams it owns. h2 never sees a DATA payload, so its own
connection windows never move and cannot disagree with ours: a DATA frame of a stream
the fast path does not own (idle, closed, reset, not answered yet) is counted here and
handed to h2 with its payload cut (:func:`empty_data`), so h2 gives the answer it always
gave for that stream state; END_STREAM reaches h2 the same way, as an empty DATA frame.
Every other frame (HEADERS, SETTINGS, PING, GOAWAY, RST_STREAM, PRIORITY...) is h2's.

Bad input gets h2's answer, as a :class:`FramingError` naming the code and whether it
ends the stream or the connection: an oversized frame (FRAME_SIZE_ERROR), padding
longer than the frame or DATA on stream 0 (PROTOCOL_ERROR), DATA past a receive window
or a send window grown past 2^31-1 (FLOW_CONTROL_ERROR; a stream's send window: stream
error). A peer that ignores flow control cannot make us buffer without bound: its DATA
beyond the window ends the connection, it is not queued.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

FRAME_HEADER = 9
TYPE_DATA = 0x0
TYPE_WINDOW_UPDATE = 0x8
TYPE_CONTINUATION = 0x9
OPENS_HEADER_BLOCK = frozenset((0x1, 0x5, 0x9))   # HEADERS, PUSH_PROMISE, CONTINUATION
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
MAX_WINDOW = 2 ** 31 - 1
DEFAULT_WINDOW = 65_535          # RFC 9113's initial window, stream and connection
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


# -- encoding -----------------------------------------------------------------------------------

# A frame header as one struct: the 24-bit length as 8 + 16 bits, type, flags, stream id.
HEADER = struct.Struct(">BHBBI")


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    return HEADER.pack(length >> 16, length & 0xFFFF, frame_type, flags, stream_id & MAX_WINDOW)


def data_header(stream_id: int, length: int, end_stream: bool = False) -> bytes:
    """The 9 bytes before a DATA payload: write them and the payload (a memoryview of
    the app's bytes) together, so the payload itself is never copied here."""
    return frame_header(length, TYPE_DATA, FLAG_END_STREAM if end_stream else 0, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    if not 0 < increment <= MAX_WINDOW:
        raise ValueError(f"window increment {increment} out of range")
    return frame_header(4, TYPE_WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big")


def empty_data(stream_id: int, flags: int) -> bytes:
    """The DATA frame h2 is given in place of one the fast path counted: no payload (so
    h2's windows never move), the END_STREAM flag kept (so h2's stream states do)."""
    return frame_header(0, TYPE_DATA, flags & FLAG_END_STREAM, stream_id)


# -- decoding -----------------------------------------------------------------------------------

class FrameSplitter:
    """Splits received bytes into whole frames; holds at most one partial frame between
    calls, and refuses a header announcing more than ``max_frame`` before buffering it."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._partial = b""
        self.consumed = 0

    def split(self, data: bytes | memoryview, keep_partial: bool = True) -> Iterator[tuple[int, int, int, int, memoryview]]:
        """(type, flags, stream_id, length, whole frame) for every complete frame so far.
        ``keep_partial`` False: a trailing partial frame is left where it is (the caller's
        read buffer keeps it) and ``consumed`` says how far the whole frames went. Such a
        caller may also stop early (its per-read frame budget): ``consumed`` then ends
        before the frame it was last handed, which stays in its buffer for later."""
        if self._partial:
            data = self._partial + bytes(data)
            self._partial = b""
        view = memoryview(data)
        offset, end, max_frame, unpack = 0, len(view), self.max_frame, HEADER.unpack_from
        while end - offset >= FRAME_HEADER:
            high, low, frame_type, flags, stream_id = unpack(view, offset)
            length = high << 16 | low
            if length > max_frame:
                _check_stream_association(frame_type, stream_id)   # h2 judges that first
                raise FramingError(FRAME_SIZE_ERROR, 0, f"frame of {length} bytes over the {max_frame} maximum")
            stop = offset + FRAME_HEADER + length
            if stop > end:
                _check_stream_association(frame_type, stream_id)
                break
            self.consumed = offset   # what came before this frame: where a caller stopping here resumes
            yield frame_type, flags, stream_id & MAX_WINDOW, length, view[offset:stop]
            offset = stop
        self.consumed = offset
        if offset < end and keep_partial:
            self._partial = bytes(view[offset:])


# Frame types that must name a stream, and those that must not (RFC 9113 section 6). h2
# refuses a wrong one from the header alone; so does the splitter, for a frame it holds.
_ON_A_STREAM = frozenset((0x0, 0x1, 0x2, 0x3, 0x5, 0x9))
_ON_THE_CONNECTION = frozenset((0x4, 0x6, 0x7))


def _check_stream_association(frame_type: int, stream_id: int) -> None:
    stream_id &= MAX_WINDOW
    if (frame_type in _ON_A_STREAM and not stream_id) or (frame_type in _ON_THE_CONNECTION and stream_id):
        raise FramingError(PROTOCOL_ERROR, 0, f"frame type {frame_type} on stream {stream_id}")


def data_payload(frame: memoryview, length: int, flags: int) -> memoryview:
    """The payload of a DATA frame, padding removed (a view: no copy)."""
    if not flags & FLAG_PADDED:
        return frame[FRAME_HEADER:]
    if length < 1:   # no room for the Pad Length field itself: h2's answer is FRAME_SIZE_ERROR
        raise FramingError(FRAME_SIZE_ERROR, 0, "padded DATA frame without its pad length")
    if frame[FRAME_HEADER] >= length:
        raise FramingError(PROTOCOL_ERROR, 0, "DATA padding as long as the frame")
    return frame[FRAME_HEADER + 1:FRAME_HEADER + length - frame[FRAME_HEADER]]


def window_increment(frame: memoryview) -> int:
    """The raw 32 bits: h2 refuses the reserved bit set (PROTOCOL_ERROR), and so do we,
    by leaving such a frame to h2, like a zero increment."""
    return int.from_bytes(frame[FRAME_HEADER:FRAME_HEADER + 4], "big")


# -- flow control ---------------------------------------------------------------------------------

class FlowControl:
    """Every window of one connection in plain integers: the connection's, both ways,
    and those of the streams the fast path owns. Credit is given back in batches (a
    quarter of a window at a time), so a request/response exchange costs no extra frame."""

    def __init__(self, stream_window: int, connection_window: int):
        self.stream_window = stream_window          # what we grant each stream (our SETTINGS)
        self.connection_window = connection_window  # what we grant the connection
        self.receive_connection = connection_window  # what the peer may still send, all streams
        self.send_connection = DEFAULT_WINDOW        # what we may still send, all streams
        self.receive: dict[int, int] = {}            # owned stream -> what the peer may still send on it
        self.send: dict[int, int] = {}               # owned stream -> what we may still send on it
        self.send_ended: set[int] = set()            # owned streams we sent END_STREAM on
        self._credit_connection = 0
        self._credit: dict[int, int] = {}

    # -- ownership
    def own_receive(self, stream_id: int) -> None:
        self.receive[stream_id] = self.stream_window

    def own_send(self, stream_id: int, initial_window: int) -> None:
        self.send[stream_id] = initial_window

    def release(self, stream_id: int) -> None:
        self.receive.pop(stream_id, None)
        self.send.pop(stream_id, None)
        self.send_ended.discard(stream_id)
        self._credit.pop(stream_id, None)

    # -- receiving
    def received(self, stream_id: int, length: int, owned: bool) -> None:
        """Count a DATA frame's flow-controlled length against the windows."""
        if length > self.receive_connection:
            raise FramingError(FLOW_CONTROL_ERROR, 0, f"{length} bytes of DATA past the connection window")
        self.receive_connection -= length
        if owned:
            left = self.receive[stream_id] - length
            if left < 0:  # as h2: a connection error (RFC 9113 6.9.1 allows either)
                raise FramingError(FLOW_CONTROL_ERROR, 0, f"{length} bytes of DATA past the window of stream {stream_id}")
            self.receive[stream_id] = left

    def credit(self, stream_id: int, length: int) -> bytes:
        """``length`` received bytes left the process: the WINDOW_UPDATE frames that are
        due (none until a quarter of a window has gathered)."""
        out = b""
        self._credit_connection += length
        if self._credit_connection * 4 >= self.connection_window:
            self.receive_connection += self._credit_connection
            out = window_update(0, self._credit_connection)
            self._credit_connection = 0
        if stream_id in self.receive and length:
            due = self._credit.get(stream_id, 0) + length
            if due * 4 >= self.stream_window:
                self.receive[stream_id] += due
                out += window_update(stream_id, due)
                due = 0
            self._credit[stream_id] = due
        return out

    # -- sending
    def grant(self, stream_id: int, wanted: int) -> int:
        """How many bytes of ``wanted`` may go on the stream now (taken off both windows)."""
        window = self.send.get(stream_id)
        if window is None or stream_id in self.send_ended:
            return 0
        granted = min(wanted, window, self.send_connection)
        if granted <= 0:
            return 0
        self.send[stream_id] = window - granted
        self.send_connection -= granted
        return granted

    def window_updated(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            if self.send_connection + increment > MAX_WINDOW:
                raise FramingError(FLOW_CONTROL_ERROR, 0, "connection window grown past 2^31-1")
            self.send_connection += increment
            return
        if self.send[stream_id] + increment > MAX_WINDOW:
            raise FramingError(FLOW_CONTROL_ERROR, stream_id, f"window of stream {stream_id} grown past 2^31-1")
        self.send[stream_id] += increment

    def initial_window_changed(self, delta: int) -> None:
        """The peer's SETTINGS_INITIAL_WINDOW_SIZE moved: every stream's send window with it."""
        for stream_id, window in self.send.items():
            if window + delta > MAX_WINDOW:
                raise FramingError(FLOW_CONTROL_ERROR, 0, f"window of stream {stream_id} grown past 2^31-1")
            self.send[stream_id] = window + delta

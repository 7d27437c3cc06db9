"""HBONE: TCP tunnelled in HTTP/2 CONNECT streams, as a pure protocol layer (no I/O).

Bytes from the (TLS-decrypted) connection go in through :meth:`HboneConnection.receive`,
tunnel events come out; commands (``connect``, ``respond``, ``send``, ``end``...) queue
bytes that the driver collects with :meth:`data_to_send`. The asyncio driver owns the
sockets, timers and backpressure; this module owns HTTP/2 (through ``h2``) and the HBONE
rules: ``:authority`` is the destination ``ip:port``, the request carries ``forwarded``
and a W3C ``traceparent``, the answer is 200 / 400 / 401 / 503.

Abuse limits (issue 18), enforced here so every HBONE endpoint gets them: the header
block (HEADERS + CONTINUATION) is capped at 64 KiB before it is buffered; PING,
SETTINGS, PRIORITY, empty DATA and RST_STREAM frames each draw from a per-connection
budget, and streams the peer resets before they were answered (Rapid Reset) may be at
most half of its streams (``shoal.h2guard.PrematureResets``); past either the connection
ends with GOAWAY ``ENHANCE_YOUR_CALM``. Header bytes are decoded here,
strictly: a non-ASCII ``:authority`` is a 400 for that stream, not an exception.

GOAWAY, as RFC 9113 6.8 says: a graceful one (NO_ERROR) from the peer stops new streams
here, while the streams up to its last-stream-id run to their end (h2 alone would close
the connection at once); ours above it are refused, so the driver may retry them on a new
connection. Only an error GOAWAY ends the connection at once.

Speed: windows and frames are large (ztunnel's 4 MiB stream windows, 1 MiB frames), so
Python work is per frame, not per byte; flow control is credited back only once the
driver says the bytes left the process (``consumed``), which is the backpressure.
With ``fast_path`` (the default), DATA and WINDOW_UPDATE frames and all connection-level
flow control are :mod:`shoal.hbone.fastpath`'s, not h2's (see there who owns what);
``fast_path=False`` keeps every frame in h2, the reference the tests compare against.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hyperframe.frame

from shoal.h2guard import CLOSED_STREAMS_PER_OPEN, BoundedH2Connection, PrematureResets
from shoal.hbone import fastpath


# h2 4.x formats repr(frame) for its trace log on every received frame, logging on or
# off, and hyperframe's DATA repr hex-encodes the whole payload to show 20 characters:
# a third of the proxy's CPU with 1 MiB frames. Describe DATA frames by size instead.
def _data_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# A patch of hyperframe's own method (h2 builds the frames, so no subclass can take its place).
# partialmethod binds the frame as a method does, also when this module runs compiled (a
# compiled function is no descriptor).
hyperframe.frame.DataFrame._body_repr = functools.partialmethod(_data_body_repr)  # type: ignore[method-assign,assignment]


class DeferredRepr:
    """``repr(obj)`` computed only when it is formatted: h2's ``_receive_frame`` calls
    ``repr(frame)`` for its trace line on every frame it handles, before the logger can say
    the line is dropped (about 4 µs per HEADERS or SETTINGS frame, on every tunnel's open and
    close). Shadowing ``repr`` in h2.connection's namespace (its one ``repr`` call) with this
    keeps the trace line identical when tracing is on, and costs one small object when off."""
    __slots__ = ("_obj",)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def __str__(self) -> str:
        return repr(self._obj)

    def __repr__(self) -> str:
        return repr(self._obj)


h2.connection.repr = DeferredRepr  # type: ignore[attr-defined]

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100              # per HBONE connection, as ztunnel; the pool opens more beyond
MAX_HEADER_BLOCK = 64 * 1024   # HEADERS + CONTINUATION bytes of one block (and SETTINGS_MAX_HEADER_LIST_SIZE)

# The work one ``receive_buffer`` call does, in frames (issue 18: one peer must not hold
# the event loop). A DATA or WINDOW_UPDATE frame (the fast path's, a few microseconds)
# costs 1; a frame h2 handles (HEADERS with HPACK and validation, RST_STREAM, PING,
# SETTINGS..., up to hundreds of microseconds) costs H2_FRAME_COST. Past it the call
# stops at a frame boundary; the driver stops reading that connection and parses the
# rest on a later loop turn, after every other ready connection had its turn.
READ_BUDGET = 256
H2_FRAME_COST = 8

STATUS_OK = 200
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4, before the first frame
_COPY_BELOW = 16 * 1024  # payloads this small are merged into one write; larger ones go as they are
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401
STATUS_UNAVAILABLE = 503


# -- abuse limits -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Limit:
    """A token bucket: ``burst`` frames at once, refilled at ``per_second``."""
    burst: int
    per_second: float


# Our own peers send none of the first four in steady state (no keepalive PINGs, one
# SETTINGS per drain); legitimate clients stay far below. Streams the peer reset before
# we answered them (each one may have cost an upstream dial) are a ratio, not a budget:
# ``PrematureResets``.
LIMITS: dict[str, Limit] = {
    "ping": Limit(100, 10.0),
    "settings": Limit(50, 5.0),
    "priority": Limit(200, 50.0),
    "empty_data": Limit(200, 50.0),
    "rst_stream": Limit(2000, 500.0),
}


# The reasons a connection ends with our GOAWAY ENHANCE_YOUR_CALM: a limit spent, not a
# malformed frame (what both proxies hold against the peer's address, shoal/hbone/penalty.py).
ABUSE_REASONS = frozenset({f"{kind}_flood" for kind in LIMITS} | {"premature_reset_flood", "header_block_too_large"})


class Budget:
    """Per-connection frame budgets (token buckets); ``spend`` says False once one is empty."""

    def __init__(self, limits: dict[str, Limit] = LIMITS, clock: Callable[[], float] = time.monotonic):
        self._limits = limits
        self._clock = clock
        self._tokens = {kind: float(limit.burst) for kind, limit in limits.items()}
        self._stamp = {kind: clock() for kind in limits}

    def spend(self, kind: str) -> bool:
        limit = self._limits[kind]
        now = self._clock()
        tokens = min(limit.burst, self._tokens[kind] + (now - self._stamp[kind]) * limit.per_second)
        self._stamp[kind] = now
        if tokens < 1:
            self._tokens[kind] = tokens
            return False
        self._tokens[kind] = tokens - 1
        return True


class Abuse(h2.exceptions.ProtocolError):
    """A peer went past a limit: h2 answers it with GOAWAY ENHANCE_YOUR_CALM."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        # Set on the instance: compiled (mypyc, pyproject [tool.shoal] compiled), a class attribute of a subclass of
        # a Python exception is not seen, and h2 would answer PROTOCOL_ERROR.
        self.error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class GuardedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame iterator with the limits applied per frame, before h2 acts on it.

    h2 buffers up to 64 CONTINUATION frames of the peer's maximum frame size (64 MiB
    with our 1 MiB frames) and answers every PING and SETTINGS; here the header block
    is capped in bytes and the control frames are budgeted."""

    def __init__(self, server: bool, budget: Budget, max_header_block: int = MAX_HEADER_BLOCK,
                 budget_data: bool = True):
        super().__init__(server=server)
        self._budget = budget
        self._budget_data = budget_data  # False: the fast path budgets empty DATA itself
        self._max_header_block = max_header_block
        self._header_block = 0
        # The lowest last-stream-id of the graceful GOAWAYs received (None: none yet).
        self.graceful_goaway: int | None = None

    def __next__(self) -> hyperframe.frame.Frame:
        frame = super().__next__()
        # A graceful GOAWAY (NO_ERROR) never reaches h2: h2 would close the connection at
        # once (no frame sent or read any more), but the streams up to its last-stream-id
        # are to run to their end (RFC 9113 6.8). HboneConnection acts on it instead.
        while isinstance(frame, hyperframe.frame.GoAwayFrame) and frame.error_code == 0:
            last = frame.last_stream_id
            self.graceful_goaway = last if self.graceful_goaway is None else min(last, self.graceful_goaway)
            frame = super().__next__()
        kind = _BUDGETED.get(type(frame))
        if kind == "empty_data" and isinstance(frame, hyperframe.frame.DataFrame) and (
                frame.data or "END_STREAM" in frame.flags or not self._budget_data):
            kind = None
        elif kind in ("ping", "settings") and "ACK" in frame.flags:
            kind = None
        if kind is not None and not self._budget.spend(kind):
            raise Abuse(f"{kind}_flood", f"{kind.replace('_', ' ')} budget exhausted")
        return frame

    def _update_header_buffer(self, frame):
        if isinstance(frame, (hyperframe.frame.HeadersFrame, hyperframe.frame.ContinuationFrame,
                              hyperframe.frame.PushPromiseFrame)):
            self._header_block += len(frame.data)
            if self._header_block > self._max_header_block:
                raise Abuse("header_block_too_large",
                            f"header block over {self._max_header_block} bytes (HEADERS + CONTINUATION)")
        result = super()._update_header_buffer(frame)
        if not self._headers_buffer:
            self._header_block = 0
        return result


_BUDGETED = {hyperframe.frame.PingFrame: "ping", hyperframe.frame.SettingsFrame: "settings",
             hyperframe.frame.PriorityFrame: "priority", hyperframe.frame.DataFrame: "empty_data",
             hyperframe.frame.RstStreamFrame: "rst_stream"}


# -- events -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelRequested:
    """Server side: a well-formed CONNECT; answer with ``respond``."""
    stream_id: int
    host: str
    port: int
    forwarded_for: str | None       # the original client's IP (RFC 7239 ``for=``)
    traceparent: str | None
    forwarded_port: int = 0         # and its port, when the client proxy sent one


@dataclass(frozen=True)
class RequestRejected:
    """Server side: a malformed CONNECT, already answered (400); for logs and metrics."""
    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True)
class TunnelResponse:
    """Client side: the server's answer to our CONNECT."""
    stream_id: int
    status: int


@dataclass(frozen=True)
class TunnelData:
    stream_id: int
    data: bytes | memoryview   # the fast path hands a view of the session's read buffer
    flow_controlled_length: int  # pass to ``consumed`` once written out


@dataclass(frozen=True)
class TunnelEnded:
    """The peer half-closed its direction (END_STREAM)."""
    stream_id: int


@dataclass(frozen=True)
class TunnelReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True)
class WindowOpened:
    """Send credit grew (stream_id 0: the connection); retry pending ``send`` data."""
    stream_id: int


@dataclass(frozen=True)
class PingAnswered:
    """The peer acknowledged our PING: it has read everything we sent before it."""
    opaque: bytes


@dataclass(frozen=True)
class SettingsAcked:
    """The peer applied our last SETTINGS (e.g. the drain's zero stream limit)."""


@dataclass(frozen=True)
class PeerGoingAway:
    """A graceful GOAWAY from the peer: no new streams here; streams up to ``last_stream_id``
    carry on to their end. Ours above it were never processed by the peer: each gets a
    ``TunnelReset`` with REFUSED_STREAM (safe to retry on another connection)."""
    last_stream_id: int


@dataclass(frozen=True)
class ConnectionEnded:
    """GOAWAY received, or a protocol violation or abuse (``error`` set; GOAWAY already
    queued). ``reason`` names it for metrics: ``h2_protocol``, ``ping_flood``..."""
    error: str | None
    last_stream_id: int | None = None
    reason: str = ""

    @property
    def refused_peer(self) -> bool:
        """Our error GOAWAY ended it (the peer broke the protocol or a limit), not the peer's."""
        return self.error is not None and self.reason != "peer_goaway"


Event = (TunnelRequested | RequestRejected | TunnelResponse | TunnelData | TunnelEnded
         | TunnelReset | WindowOpened | SettingsAcked | PingAnswered | PeerGoingAway | ConnectionEnded)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(authority: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` -> (ip, port); ValueError for anything else."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"authority {authority!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    address = ipaddress.ip_address(host)  # raises ValueError: names are not allowed
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return str(address), port


def new_traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


class DataSink(Protocol):
    """Where the driver takes one stream's received DATA payloads as they are parsed."""

    def on_stream_data(self, data: bytes | memoryview, length: int) -> None:
        """``data``: a view of the driver's read buffer (valid until its next read);
        ``length``: the flow-controlled length to give back with ``consumed``."""


class HboneConnection:
    """One HTTP/2 connection carrying HBONE tunnels (either side)."""

    def __init__(self, client_side: bool, stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW, max_frame: int = MAX_FRAME,
                 max_streams: int = MAX_STREAMS, limits: dict[str, Limit] = LIMITS,
                 clock: Callable[[], float] = time.monotonic, fast_path: bool = True):
        # Header bytes stay bytes: h2 would decode them as UTF-8 and raise from inside
        # receive_data on a bad byte; we decode the few we read, strictly, per stream.
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self.client_side = client_side
        self._h2 = BoundedH2Connection(config, remember_closed=CLOSED_STREAMS_PER_OPEN * max_streams)
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self._h2.max_inbound_frame_size = max_frame  # h2 reads it once, from the defaults
        self._budget = Budget(limits, clock)
        self._clock = clock
        self._premature = PrematureResets()
        self._frames = GuardedFrameBuffer(server=not client_side, budget=self._budget, budget_data=not fast_path)
        self._h2.incoming_buffer = self._frames
        self._connection_window = connection_window
        self._max_frame = max_frame
        self._max_streams = max_streams
        self._unanswered: dict[int, float] = {}  # server side: CONNECTs not answered yet, when opened
        self.closed = False
        self._closed_by_us = False
        self.peer_going_away = False  # a graceful GOAWAY came: no new streams here
        self.peer_last_stream_id: int | None = None
        self.going_away = False       # we sent one
        # The fast path: its flow control, its frame splitter, and the one outbound buffer
        # that h2's bytes and ours join in order (small pieces merged; large payloads kept
        # as the caller's buffers, so they are not copied before TLS).
        self.fast_path = fast_path
        self._flow = fastpath.FlowControl(stream_window, connection_window)
        self._splitter = fastpath.FrameSplitter(max_frame)
        self._preface = 0 if client_side else len(CLIENT_PREFACE)  # h2 checks the client's magic
        self._header_block_open = False   # a HEADERS went to h2 without END_HEADERS: CONTINUATION due
        # The last ``receive_buffer`` stopped at its budget with whole frames left unparsed.
        self.budget_spent = False
        self._out: list[bytes | memoryview] = []
        self._small = bytearray()
        # The driver's receivers of owned DATA payloads, by stream (the driver's own table
        # of stream peers), each called as its frames are parsed: ``on_stream_data(payload
        # view, flow-controlled length)``. A stream with none (or no table): the payload
        # becomes a ``TunnelData`` event instead. It saves an event object and a dispatch
        # per frame on the request/response path. One difference from events: a payload
        # handed over before a bad frame later in the same read stays delivered (it was
        # valid; the connection still ends with the same GOAWAY).
        self.data_sinks: Mapping[int, DataSink] | None = None

    # -- lifecycle
    def initiate(self) -> None:
        self._h2.initiate_connection()
        extra = self._connection_window - fastpath.DEFAULT_WINDOW
        if self.fast_path:
            self._pull_h2()
            if extra > 0:
                self._small += fastpath.window_update(0, extra)
        elif extra > 0:
            self._h2.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        return b"".join(self.buffers_to_send())

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """What to write, in order, as a list (for ``writelines``): large payloads are the
        buffers they were sent from, the rest is merged. Empties the outbound buffer."""
        if not self.fast_path:
            data = self._h2.data_to_send()
            if self._small:  # our own frames (go_away) queued before h2's
                data, self._small = bytes(self._small) + data, bytearray()
            return [data] if data else []
        # No pull from h2 here: every command that makes h2 write pulls right after it.
        out, small = self._out, self._small
        if not out:
            if not small:
                return out
            data = bytes(small)
            small.clear()
            return [data]
        if small:
            out.append(bytes(small))
            small.clear()
        self._out = []
        return out

    @property
    def output_queued(self) -> bool:
        """Bytes wait for ``buffers_to_send`` (on the h2 path: maybe, h2 does not say cheaply)."""
        return bool(self._small or self._out) or not self.fast_path

    @property
    def views_queued(self) -> bool:
        """Payloads are waiting in the outbound buffer as views of the caller's buffers
        (16 KiB and more; smaller ones are copied): flush before reusing those buffers."""
        return bool(self._out)

    def _pull_h2(self) -> None:
        """Move h2's queued bytes into the one outbound buffer (after every h2 command,
        so its frames and the fast path's leave in the order they were made)."""
        data = self._h2.data_to_send()
        if data:
            self._small += data

    def _emit_payload(self, payload: memoryview) -> None:
        if len(payload) >= _COPY_BELOW:
            if self._small:
                self._out.append(bytes(self._small))
                self._small.clear()
            self._out.append(payload)
        else:
            self._small += payload

    def drain(self) -> None:
        """Ask the peer to open no more tunnels here (MAX_CONCURRENT_STREAMS 0); live tunnels
        carry on. Streams the peer opened before applying it arrive before its ACK and are
        still served; the driver then says ``go_away`` (for peers that ignore the limit)."""
        self._h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
        self._pull_h2_if_fast()

    def ping(self, opaque: bytes) -> None:
        """A PING (8 bytes of ``opaque``) for the peer to echo: its ACK (``PingAnswered``)
        proves the peer reads this connection, however busy it is otherwise."""
        if not self.closed:
            self._h2.ping(opaque)
            self._pull_h2_if_fast()

    def go_away(self) -> None:
        """Graceful GOAWAY (NO_ERROR): the peer opens no more streams here, the ones it
        opened so far (up to the highest we received) run to their end. Sent by hand: h2's
        own GOAWAY would close the connection for those streams too. After ``drain``'s
        SETTINGS are acknowledged, every stream the peer opened before has arrived."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self._h2.highest_inbound_stream_id
        frame.error_code = 0
        self._small += self._h2.data_to_send() + frame.serialize()   # after what h2 queued

    def close(self, error_code: int = 0) -> None:
        if not self.closed:
            self.closed = self._closed_by_us = True
            self._h2.close_connection(error_code)
            self._pull_h2_if_fast()

    def _pull_h2_if_fast(self) -> None:
        if self.fast_path:
            self._pull_h2()

    def table_sizes(self) -> dict[str, int]:
        """Entries in this connection's per-stream tables (for ``/debug/memory``)."""
        flow = self._flow
        return {"h2_streams": len(self._h2.streams), "h2_closed_streams": len(self._h2._closed_streams),
                "flow_streams": len(flow.receive) + len(flow.send) + len(flow.send_ended),
                "unanswered": len(self._unanswered)}

    @property
    def stream_limit(self) -> int:
        """How many tunnels the peer lets us have open at once here (O(1): a settings
        lookup, never h2's scan of its stream table). The driver counts its own."""
        if self.closed or self.peer_going_away:
            return 0
        return min(self._h2.remote_settings.max_concurrent_streams, self._max_streams)

    def release(self, stream_id: int) -> bool:
        """The driver is done with a stream: close it in h2 too, so h2's count of open
        streams never exceeds the driver's. True when closed now; False when it is
        half-closed on our side and closes with the peer's END_STREAM or RST (a normal
        end is not turned into a reset)."""
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.closed or self.closed \
                or self._h2.state_machine.state == h2.connection.ConnectionState.CLOSED:
            self._flow.release(stream_id)
            return True  # nothing can be sent on a closed connection, nor needs to be
        state = stream.state_machine.state
        if state == h2.stream.StreamState.HALF_CLOSED_LOCAL:
            return False
        if state == h2.stream.StreamState.HALF_CLOSED_REMOTE:
            self.end(stream_id)  # the peer is done (a refused CONNECT): end ours, no RST
        else:
            self.reset(stream_id)  # still open both ways and nobody reads it any more
        self._flow.release(stream_id)
        return True

    # -- commands
    def connect(self, host: str, port: int, forwarded_for: str, traceparent: str, forwarded_port: int = 0) -> int:
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, [
            (":method", "CONNECT"),
            (":authority", format_authority(host, port)),
            ("forwarded", f'for="{_forwarded_node(forwarded_for, forwarded_port)}"'),
            ("traceparent", traceparent),
        ])
        if self.fast_path:
            self._pull_h2()
            # Our DATA waits for the 200 (the driver holds it); the peer's is owned then.
            self._flow.own_send(stream_id, self._h2.remote_settings.initial_window_size)
        return stream_id

    def respond(self, stream_id: int, status: int) -> bool:
        """Answer a CONNECT; False when the stream is gone (the peer reset it meanwhile)."""
        if self._unanswered.pop(stream_id, None) is not None:
            self._premature.answered()
        try:
            self._h2.send_headers(stream_id, [(":status", str(status))], end_stream=status != STATUS_OK)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        if self.fast_path:
            self._pull_h2()
            if status == STATUS_OK:
                self._flow.own_send(stream_id, self._h2.remote_settings.initial_window_size)
        return True

    def send(self, stream_id: int, data: memoryview) -> int:
        """Queue as much of ``data`` as flow control allows; return how many bytes went.

        A stream h2 already closed takes nothing (0): h2 processes a whole read before
        we see its events, so a reset can be known here before its ``TunnelReset``
        arrives, which then ends the stream's peer."""
        if self.fast_path:
            return self._send_fast(stream_id, data)
        sent = 0
        total = len(data)
        try:
            while sent < total:
                window = self._h2.local_flow_control_window(stream_id)
                chunk = min(window, self._max_frame, self._h2.max_outbound_frame_size, total - sent)
                if chunk <= 0:
                    break
                self._h2.send_data(stream_id, data[sent:sent + chunk])
                sent += chunk
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return sent
        return sent

    def send_small(self, stream_id: int, data: bytes | memoryview) -> bool:
        """A request or response of a ping-pong exchange, all of it or nothing: True when
        ``data`` (under 16 KiB, within both send windows) went as one DATA frame, merged
        into the outbound buffer with its header (one TLS record, nothing left as a view
        of ``data``). False: nothing was sent, ``send`` decides."""
        length = len(data)
        flow = self._flow
        window = flow.send.get(stream_id)
        if not self.fast_path or self.closed or not 0 < length < _COPY_BELOW or window is None \
                or length > window or length > flow.send_connection or stream_id in flow.send_ended:
            return False
        flow.send[stream_id] = window - length
        flow.send_connection -= length
        small = self._small
        small += fastpath.HEADER.pack(length >> 16, length & 0xFFFF, fastpath.TYPE_DATA, 0, stream_id)
        small += data
        return True

    def _send_fast(self, stream_id: int, data: memoryview) -> int:
        if self.closed:
            return 0
        if self.send_small(stream_id, data):   # every peer takes 16 KiB frames: one frame
            return len(data)
        length = len(data)
        flow = self._flow
        granted = flow.grant(stream_id, length)
        frame = min(self._max_frame, self._h2.max_outbound_frame_size)
        for offset in range(0, granted, frame):
            chunk = data[offset:offset + min(frame, granted - offset)]
            self._small += fastpath.data_header(stream_id, len(chunk))
            self._emit_payload(chunk)
        return granted

    def end(self, stream_id: int) -> None:
        try:
            self._h2.end_stream(stream_id)  # an empty DATA frame: no window, h2's states move
        except h2.exceptions.ProtocolError:
            pass  # the stream was reset or the connection closed meanwhile: the peer knows
        if self.fast_path:
            self._pull_h2()
            if stream_id in self._flow.receive:
                self._flow.send_ended.add(stream_id)
            else:
                self._flow.release(stream_id)  # the peer's direction is over too

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # the stream or the whole connection is already gone: nothing to reset
        if self.fast_path:
            self._pull_h2()
            self._flow.release(stream_id)

    def consumed(self, stream_id: int, length: int) -> None:
        """Credit back ``length`` bytes of received DATA (they have been written out)."""
        if not length or self.closed:
            return
        if self.fast_path:
            self._small += self._flow.credit(stream_id, length)
            return
        try:
            self._h2.acknowledge_received_data(length, stream_id)
        except h2.exceptions.StreamClosedError:
            # The stream ended meanwhile; the connection window still needs the credit.
            self._h2.increment_flow_control_window(length)
        except h2.exceptions.ProtocolError:
            pass  # the connection is closing (GOAWAY): no credit to give any more

    # -- input
    def receive(self, data: bytes | memoryview, keep_partial: bool = True, budget: int = 0) -> list[Event]:
        """Events of the frames in ``data``. ``budget`` (``receive_buffer``'s) needs the
        caller to keep what was not used: only without ``keep_partial``."""
        if budget and keep_partial:
            raise ValueError("a receive budget leaves bytes unused: only for a caller that keeps them")
        if self.closed:
            return []  # after our GOAWAY: nothing more is acted on
        events: list[Event] = []
        try:
            if self.fast_path:
                self._receive_fast(data, events, keep_partial, budget)
            else:
                self._receive_h2(data, events)
        except (h2.exceptions.ProtocolError, fastpath.FramingError) as exc:
            # h2 queued GOAWAY with the error's code (ENHANCE_YOUR_CALM for Abuse),
            # except for a bad preface, which it rejects before its state machine runs.
            # The fast path's connection errors carry the code h2 would have used.
            code = exc.code if isinstance(exc, fastpath.FramingError) else exc.error_code
            if self._h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
                self._h2.close_connection(code)
            self._pull_h2_if_fast()
            self.closed = self._closed_by_us = True
            events.clear()  # as h2, which raises before returning any event of the read
            events.append(ConnectionEnded(f"{type(exc).__name__}: {exc}", reason=getattr(exc, "reason", "h2_protocol")
                                          if isinstance(exc, Abuse) else "h2_protocol"))
        return events

    def receive_buffer(self, data: memoryview, budget: int = READ_BUDGET) -> tuple[list[Event], int]:
        """As ``receive``, for a driver reading into its own buffer: (events, how many
        bytes were used). A trailing partial frame is not copied: it stays in the
        driver's buffer, to be passed again with what follows. At most ``budget`` work
        (READ_BUDGET) is done per call: when ``budget_spent`` says it stopped there, the
        unused bytes hold whole frames, for the driver to pass again on a later turn
        (not reading more meanwhile: backpressure, not buffering). 0: no budget."""
        self.budget_spent = False
        if self.closed:
            return [], len(data)   # after our GOAWAY: read into the void, never parsed
        if not self.fast_path:
            return self.receive(bytes(data)), len(data)
        # The sink loop spends at most all but one of the budget, so that whether frames
        # are left over when it runs out is the general path's to say (``budget_spent``).
        taken, frames, events = self._take_owned_data(data, budget - 1 if budget else -1) \
            if not self._preface else (0, 0, [])
        if taken == len(data):
            return events, taken
        self._splitter.consumed = 0
        preface = self._preface
        rest = self.receive(data[taken:] if taken else data, keep_partial=False, budget=budget - frames if budget else 0)
        if self.closed:
            self.budget_spent = False
            # As ``receive``: no event of a read that ended the connection with our GOAWAY.
            return (rest if self._closed_by_us else events + rest), len(data)
        events += rest
        return events, taken + min(preface, len(data)) + self._splitter.consumed

    def _take_owned_data(self, data: memoryview, limit: int) -> tuple[int, int, list[Event]]:
        """The request/response case, without the splitter, its generator or a frame view:
        the leading complete DATA frames with no flags (not padded, not the end) and a
        payload, of streams the fast path owns, within both windows, each handed to its
        stream's sink as it is parsed; at most ``limit`` of them (-1: no limit). Anything
        else (a flag, another frame type, a partial or oversized frame, a window exceeded)
        stops it; ``_receive_fast`` takes the rest from there and gives every answer,
        errors included. (bytes taken, frames taken, TunnelData events for payloads of
        streams without a sink)."""
        sinks, flow = self.data_sinks, self._flow
        events: list[Event] = []
        if sinks is None or self._header_block_open:
            return 0, 0, events
        windows, unpack, max_frame = flow.receive, fastpath.HEADER.unpack_from, self._max_frame
        offset, end, frames = 0, len(data), 0
        while end - offset >= fastpath.FRAME_HEADER and frames != limit:
            high, low, frame_type, flags, stream_id = unpack(data, offset)
            length = high << 16 | low
            start = offset + fastpath.FRAME_HEADER
            stop = start + length
            if frame_type or flags or not length or stop > end or length > max_frame \
                    or length > flow.receive_connection:
                break
            window = windows.get(stream_id)   # a reserved bit set is no owned stream: left to the general path
            if window is None or length > window:
                break
            flow.receive_connection -= length
            windows[stream_id] = window - length
            payload = data[start:stop]
            sink = sinks.get(stream_id)
            if sink is None:
                events.append(TunnelData(stream_id, payload, length))
            else:
                sink.on_stream_data(payload, length)
            offset = stop
            frames += 1
        return offset, frames, events

    def _receive_fast(self, data: bytes | memoryview, events: list[Event], keep_partial: bool = True,
                      budget: int = 0) -> None:
        """Split the bytes into frames: DATA and WINDOW_UPDATE are the fast path's, runs of
        other frames go to h2 in order. h2 has processed every frame before a DATA frame
        when that DATA frame's ownership is decided (a 200 and its first bytes may share
        a read)."""
        if self._preface:
            head = bytes(data[:self._preface])
            data = data[self._preface:]
            self._preface -= len(head)
            self._receive_h2(head, events)
        flow, sinks = self._flow, self.data_sinks
        for_h2: list[bytes | memoryview] = []
        spent = 0
        try:
            for frame_type, flags, stream_id, length, frame in self._splitter.split(data, keep_partial):
                if budget:
                    if spent >= budget:   # this frame and the rest wait for the driver's next turn
                        self.budget_spent = True
                        break
                    spent += 1 if frame_type == fastpath.TYPE_DATA or frame_type == fastpath.TYPE_WINDOW_UPDATE \
                        else H2_FRAME_COST
                if self._header_block_open:
                    # Only CONTINUATION may follow a header block without END_HEADERS (RFC 9113
                    # 6.10): whatever comes is h2's, which refuses anything else (PROTOCOL_ERROR).
                    for_h2.append(frame)
                    self._header_block_open = frame_type == fastpath.TYPE_CONTINUATION \
                        and not flags & fastpath.FLAG_END_HEADERS
                elif frame_type == fastpath.TYPE_DATA:
                    if for_h2:
                        self._receive_h2(b"".join(for_h2), events)
                        for_h2.clear()
                        if self._closed_by_us:
                            return  # our GOAWAY is out: nothing more is acted on
                    if stream_id == 0:
                        raise fastpath.FramingError(fastpath.PROTOCOL_ERROR, 0, "DATA on stream 0")
                    if not length and not flags & fastpath.FLAG_END_STREAM and not self._budget.spend("empty_data"):
                        raise Abuse("empty_data_flood", "empty data budget exhausted")
                    owned = stream_id in flow.receive
                    payload = fastpath.data_payload(frame, length, flags)
                    flow.received(stream_id, length, owned)
                    end_stream = flags & fastpath.FLAG_END_STREAM
                    if owned:
                        if len(payload):
                            sink = sinks.get(stream_id) if sinks is not None else None
                            if sink is None:
                                events.append(TunnelData(stream_id, payload, length))
                            else:
                                sink.on_stream_data(payload, length)
                        elif length:
                            self._small += flow.credit(stream_id, length)  # all padding: nobody consumes it
                        if end_stream:
                            del flow.receive[stream_id]
                            for_h2.append(fastpath.empty_data(stream_id, flags))
                    else:
                        # Not ours (idle, closed, reset, unanswered): h2 answers as it always
                        # did for that state; the connection window gets its credit back now.
                        if length:
                            self._small += flow.credit(stream_id, length)
                        for_h2.append(fastpath.empty_data(stream_id, flags))
                elif frame_type == fastpath.TYPE_WINDOW_UPDATE and length == 4 and (
                        stream_id == 0 or stream_id in flow.send) \
                        and 0 < (increment := fastpath.window_increment(frame)) <= fastpath.MAX_WINDOW:
                    try:
                        flow.window_updated(stream_id, increment)
                    except fastpath.FramingError as exc:
                        if not exc.stream_id:
                            raise
                        # As h2: RST_STREAM FLOW_CONTROL_ERROR, and the stream is over here.
                        self.reset(stream_id, exc.code)
                        events.append(TunnelReset(stream_id, exc.code))
                        continue
                    events.append(WindowOpened(stream_id))
                else:
                    for_h2.append(frame)  # malformed WINDOW_UPDATEs too: h2 gives its answer
                    if frame_type in fastpath.OPENS_HEADER_BLOCK:
                        self._header_block_open = not flags & fastpath.FLAG_END_HEADERS
        except fastpath.FramingError:
            if for_h2:   # the frames before the bad one first: an error of theirs is the answer
                self._receive_h2(b"".join(for_h2), events)
            raise
        if for_h2:
            self._receive_h2(b"".join(for_h2), events)

    def _receive_h2(self, data: bytes | memoryview, events: list[Event]) -> None:
        h2_events = self._h2.receive_data(data)
        if self._frames.graceful_goaway is not None:
            self._on_graceful_goaway(events)
        if self.fast_path:
            self._pull_h2()
        flow = self._flow
        stillborn = _opened_and_reset(h2_events) if len(h2_events) > 1 else _NONE
        for ev in h2_events:
            if isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    events.append(TunnelData(ev.stream_id, ev.data, ev.flow_controlled_length))
            elif isinstance(ev, h2.events.RequestReceived):
                if self.going_away:  # opened after our GOAWAY: never processed, retry elsewhere
                    self.reset(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                if ev.stream_id in stillborn:
                    # Opened and reset in the same frames (Rapid Reset): the driver never
                    # hears of it (no serving task, no dial); its reset below is counted.
                    self._unanswered[ev.stream_id] = self._clock()
                    continue
                event = self._on_request(ev)
                events.append(event)
                if self.fast_path and isinstance(event, TunnelRequested):
                    flow.own_receive(ev.stream_id)
            elif isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(b":status", b"0")
                events.append(TunnelResponse(ev.stream_id, int(status) if status.isdigit() else 0))
                if self.fast_path and status == b"200" and ev.stream_ended is None:
                    flow.own_receive(ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                if ev.stream_id in flow.send_ended:
                    flow.release(ev.stream_id)  # both directions over
                events.append(TunnelEnded(ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                flow.release(ev.stream_id)
                opened = self._unanswered.pop(ev.stream_id, None)
                if opened is not None and self._premature.reset_unanswered(opened, self._clock()):
                    self.close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                    events.append(ConnectionEnded("half its streams reset before their answer (rapid reset)",
                                                  reason="premature_reset_flood"))
                    return
                if ev.stream_id not in stillborn:
                    events.append(TunnelReset(ev.stream_id, int(ev.error_code)))
            elif isinstance(ev, h2.events.WindowUpdated):
                events.append(WindowOpened(ev.stream_id))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                changed = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
                if self.fast_path and changed is not None and changed.original_value is not None:
                    flow.initial_window_changed(changed.new_value - changed.original_value)
                events.append(WindowOpened(0))  # initial window may have grown
            elif isinstance(ev, h2.events.SettingsAcknowledged):
                events.append(SettingsAcked())
            elif isinstance(ev, h2.events.PingAckReceived):
                events.append(PingAnswered(bytes(ev.ping_data)))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                events.append(ConnectionEnded(None if ev.error_code == 0 else f"GOAWAY {ev.error_code!r}",
                                              ev.last_stream_id, reason="peer_goaway"))

    def _on_graceful_goaway(self, events: list[Event]) -> None:
        """Events for a graceful GOAWAY the frame buffer kept from h2 (first, or a lower
        last-stream-id): the streams we opened above it are refused, the rest carry on."""
        last = self._frames.graceful_goaway
        self._frames.graceful_goaway = None
        if last is None:
            return
        if self.peer_last_stream_id is not None:
            last = min(last, self.peer_last_stream_id)
        self.peer_last_stream_id = last
        self.peer_going_away = True
        events.append(PeerGoingAway(last))
        ours = 1 if self.client_side else 0  # stream ids we open are odd as client, even as server
        refused = sorted(sid for sid, stream in self._h2.streams.items()
                         if sid > last and sid % 2 == ours and not stream.closed)
        for stream_id in refused:
            self.reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            events.append(TunnelReset(stream_id, int(h2.errors.ErrorCodes.REFUSED_STREAM)))

    def _on_request(self, ev: h2.events.RequestReceived) -> Event:
        headers, reason = _decode_headers(ev.headers)
        host, port = "", 0
        if reason is not None:
            pass
        elif self.client_side:
            reason = "request on a client connection"
        elif headers.get(":method") != "CONNECT":
            reason = f"method {headers.get(':method')!r} is not CONNECT"
        elif ":authority" not in headers:
            reason = "CONNECT without :authority"
        else:
            try:
                host, port = parse_authority(headers[":authority"])
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            self.respond(ev.stream_id, STATUS_BAD_REQUEST)
            return RequestRejected(ev.stream_id, STATUS_BAD_REQUEST, reason)
        self._unanswered[ev.stream_id] = self._clock()
        client_ip, client_port = _forwarded_for(headers.get("forwarded"))
        return TunnelRequested(ev.stream_id, host, port, client_ip, headers.get("traceparent"), client_port)


_NONE: frozenset[int] = frozenset()


def _opened_and_reset(h2_events: list) -> set[int] | frozenset[int]:
    """The streams a batch of h2 events both opens (a request) and resets after it."""
    opened: set[int] = set()
    both: set[int] = set()
    for ev in h2_events:
        if isinstance(ev, h2.events.RequestReceived):
            opened.add(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id in opened:
            both.add(ev.stream_id)
    return both or _NONE


# The request headers HBONE reads; all ASCII by their grammars (RFC 9113, 7239, W3C).
_READ_HEADERS = frozenset({b":method", b":authority", b"forwarded", b"traceparent"})


def _decode_headers(raw) -> tuple[dict[str, str], str | None]:
    """(the headers HBONE reads, as text; refusal reason or None). Strict ASCII: a
    stray byte is the sender's error, answered 400 on that stream only."""
    headers: dict[str, str] = {}
    for name, value in raw:
        if name in _READ_HEADERS:
            try:
                headers[name.decode("ascii")] = value.decode("ascii")
            except UnicodeDecodeError:
                return {}, f"non-ASCII bytes in {name.decode('ascii')}"
    return headers, None


def _forwarded_for(value: str | None) -> tuple[str | None, int]:
    """The node of an RFC 7239 ``for=`` (``ip``, ``"ip:port"``, ``"[v6]:port"``) as
    (ip, port); (None, 0) when absent or not an IP address."""
    if not value:
        return None, 0
    for part in value.split(";"):
        key, _, item = part.strip().partition("=")
        if key.strip().lower() != "for":
            continue
        item = item.strip().strip('"')
        port_text = ""
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host = item
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            return None, 0
        port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else 0
        return ip, port
    return None, 0


def _forwarded_node(ip: str, port: int = 0) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}" if port else host

"""The asyncio drivers of the data path.

- :class:`HboneSession`: one TLS connection speaking HBONE (client or server side),
  driving the pure :class:`~shoal.hbone.framing.HboneConnection`.
- :class:`StreamPeer`: a plain TCP socket joined to one HBONE stream.
- :class:`PipeEnd`: two plain TCP sockets joined back to back (passthrough, 15006).

Backpressure, end to end: a stream's send window exhausted or the TLS transport's
write buffer full pauses reading the TCP socket; a TCP socket that cannot drain holds
back the HTTP/2 flow-control credit, so the remote sender stops.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Callable, Protocol, cast

import h2.errors
from mypy_extensions import mypyc_attr

from shoal.hbone import framing as hbone
from shoal.hbone.identity import IdentityError
from shoal.hbone.readbuffer import SessionReadBuffer
from shoal.ratelog import LogLimiter, held_note

log = logging.getLogger(__name__)


class TransferRecord(Protocol):
    """Where the drivers report one connection: bytes each way (plain ints, bumped per
    read) and how it broke. The node proxy's telemetry record implements it; the drivers
    know nothing else of telemetry."""
    bytes_in: int    # client -> server
    bytes_out: int   # server -> client

    def failed(self, reason: str) -> None:
        """The connection broke (first reason wins)."""

    def reset(self, reason: str) -> None:
        """The peer reset the stream before both ends were done."""


class StreamEnd(Protocol):
    """What a session drives at the far end of each of its streams: ``StreamPeer`` (a TCP
    socket) or ``shoal.hbone.stream.HboneStream`` (a reader and writer in the process).
    A Protocol, not the class: compiled (mypyc), an annotation with a class is enforced."""

    def bind(self, session: "HboneSession", stream_id: int) -> None: ...
    def on_response(self, status: int) -> None: ...
    def on_stream_data(self, data: bytes | memoryview, length: int) -> None: ...
    def on_window(self) -> None: ...
    def on_stream_end(self) -> None: ...
    def on_stream_reset(self, reason: str, unprocessed: bool = False) -> None: ...
    def set_paused(self, why: str, paused: bool) -> None: ...


# Write-buffer watermarks: sized to the HTTP/2 frames and windows, not asyncio's 64 KiB.
SESSION_WRITE_HIGH = 8 * 1024 * 1024
SESSION_WRITE_LOW = 2 * 1024 * 1024
TCP_WRITE_HIGH = 2 * 1024 * 1024
TCP_WRITE_LOW = 512 * 1024
# The plain TCP sockets of the tunnels read into one shared buffer (each read is framed,
# and copied into the outbound buffer or written to TLS, before the next socket reads):
# as large as uvloop's own read buffer, so bulk transfers read as much per syscall.
TCP_READ_BUFFER = 256 * 1024
EARLY_READ_BUFFER = 4 * 1024   # a socket that reads before its stream is bound (held, then paused)


class ReadBuffer:
    """One preallocated buffer that many sockets read into in turn (BufferedProtocol): a
    read is consumed before the next begins. Whoever had to leave a view of it queued
    somewhere calls ``lend``: the next read gets a fresh buffer, the queued view stays intact."""

    def __init__(self, size: int):
        self.size = size
        self.view = memoryview(bytearray(size))

    def lend(self) -> None:
        self.view = memoryview(bytearray(self.size))


# The opaque bytes of our liveness PING (``HboneSession.probe``).
PROBE_PING = b"shoalpng"

# Events that change no stream count nor limit (WindowOpened may: the peer's SETTINGS).
_BYTES_ONLY = (hbone.TunnelData,)


class HboneSession(asyncio.BufferedProtocol):
    """An HTTP/2 connection (over TLS) carrying many tunnels.

    Reads land in the connection's ``SessionReadBuffer`` (small until the traffic
    needs more), and the fast path hands out DATA payloads as views of it,
    written to the TCP sockets without a copy. A socket that could not take a view at
    once keeps a reference to it (uvloop queues the view itself), so the buffer is then
    *lent* (``reads.lent``): it is never written over again, and the next compaction
    takes a fresh one."""

    def __init__(self, client_side: bool, idle_timeout: float,
                 on_request: Callable[["HboneSession", hbone.TunnelRequested], asyncio.Task | None] | None = None,
                 on_rejected: Callable[[str], None] | None = None,
                 on_closed: Callable[["HboneSession"], None] | None = None,
                 verify: Callable[[object], str] | None = None, fast_path: bool = True,
                 tcp_reads: ReadBuffer | None = None, log_limiter: LogLimiter | None = None):
        self.h2 = hbone.HboneConnection(client_side=client_side, fast_path=fast_path)
        self._verify = verify  # ssl_object -> peer SPIFFE ID; raises IdentityError
        self.verify_error: Exception | None = None
        self.streams: dict[int, StreamEnd] = {}
        self.transport: asyncio.Transport | None = None
        self.peer_identity: str | None = None
        self.local_identity: str | None = None
        self.write_paused = False
        self.idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._on_request = on_request
        self._on_rejected = on_rejected or (lambda reason: None)
        self._on_closed = on_closed
        # Lines about peers breaking the rules, a line a second per reason at most: a flood of
        # bad connections is counted in full by ``on_rejected``, not logged in full. The
        # node proxy shares one across its sessions; otherwise each has its own.
        self._log_limiter = log_limiter or LogLimiter()
        self.closed = False
        self.draining = False
        self._drain_acked = False
        # Server side: CONNECTs not answered yet, with the task serving each; a reset
        # from the peer cancels the task, which closes its upstream socket at once.
        self._requests: dict[int, asyncio.Task | None] = {}
        # Client side, set by the pool: told whenever has_room may have changed.
        self.on_room: Callable[["HboneSession"], None] | None = None
        self._had_room = False
        self._lingering: set[int] = set()  # done here, still open in h2 until the peer ends them
        # Client side: when the peer last showed progress on this connection: an answer to a
        # CONNECT (any stream) or the ACK of our liveness PING (``probe``). A peer that keeps
        # answering is alive, just busy; one that shows nothing is stuck (outbound's wait).
        self.last_progress = time.monotonic()
        self._probing = False
        self._flush_scheduled = False
        self._parse_later = False   # whole frames wait in ``reads`` for a later turn (reading paused)
        self.reads = SessionReadBuffer()   # starts small, grows with what the connection carries
        self.get_buffer = self.reads.room  # type: ignore[method-assign]  # the same, one frame fewer per read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tcp_reads = tcp_reads   # shared by every session of a node proxy worker, when given
        if fast_path:
            self.h2.data_sinks = self.streams   # DATA straight to its stream's peer, as parsed

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)   # a stream (TLS) transport, as every caller makes
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        # asyncio's 64 KiB default would pause every stream at each 1 MiB frame.
        transport.set_write_buffer_limits(high=SESSION_WRITE_HIGH, low=SESSION_WRITE_LOW)
        if self._verify is not None:
            try:
                self.peer_identity = self._verify(transport.get_extra_info("ssl_object"))
            except IdentityError as exc:
                # Nothing was sent or read yet: refuse before any HTTP/2.
                self.verify_error = exc
                self.closed = True
                transport.abort()
                return
        self.h2.initiate()
        self.flush()
        self._arm_idle()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where TLS decrypts to (replaced per instance by ``reads.room`` itself: uvloop
        looks it up once per connection, and calls it on every read)."""
        return self.reads.room(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._parse(self.reads.filled(nbytes))

    def _parse(self, data: memoryview) -> None:
        """Parse at most a budget of frames (``READ_BUDGET``); the rest waits in the read
        buffer for a later loop turn, with reading paused until it is parsed: one peer's
        flood of small frames never holds the loop for a whole 256 KiB read, and what it
        sends meanwhile waits in its socket (backpressure), not in our memory."""
        events, used = self.h2.receive_buffer(data)
        more = self.h2.budget_spent
        if more:
            # Scheduled before the events are handled, so before the first step of any
            # serving task they start: a CONNECT whose RST_STREAM waits in the rest of the
            # read is cancelled before it dials (Rapid Reset split across two slices).
            if not self._parse_later:
                self._parse_later = True
                cast(asyncio.Transport, self.transport).pause_reading()   # bytes came: it is connected
            (self._loop or asyncio.get_running_loop()).call_soon(self._parse_rest)
        if events or self.h2.output_queued:
            self._handle(events)  # delivers the payloads: only then is it known whether one was lent
        self.reads.used(used)
        if not more and self._parse_later:
            self._parse_later = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _parse_rest(self) -> None:
        if not self.closed:
            self._parse(self.reads.unparsed())

    def data_received(self, data: bytes) -> None:
        """Bytes handed in directly (a caller that does not use the read buffer)."""
        self._handle(self.h2.receive(data))

    @property
    def tcp_reads(self) -> ReadBuffer:
        """The read buffer of this session's tunnels' TCP sockets: the one it was given
        (a node proxy worker's, shared by all its sessions), else its own, made on first use."""
        if self._tcp_reads is None:
            self._tcp_reads = ReadBuffer(TCP_READ_BUFFER)
        return self._tcp_reads

    def _handle(self, events: list[hbone.Event]) -> None:
        if not events:   # DATA only (handed over as parsed): what is left is credit to send
            self.flush()
            return
        for event in events:
            if isinstance(event, hbone.TunnelData):
                peer = self.streams.get(event.stream_id)
                if peer is None:
                    self.h2.consumed(event.stream_id, event.flow_controlled_length)
                    self.h2.reset(event.stream_id)
                else:
                    peer.on_stream_data(event.data, event.flow_controlled_length)
            elif isinstance(event, hbone.WindowOpened):
                targets = list(self.streams.values()) if event.stream_id == 0 else \
                    [p for p in (self.streams.get(event.stream_id),) if p is not None]
                for peer in targets:
                    peer.on_window()
            elif isinstance(event, hbone.TunnelEnded):
                self._lingering.discard(event.stream_id)
                peer = self.streams.get(event.stream_id)
                if peer is not None:
                    peer.on_stream_end()
            elif isinstance(event, hbone.TunnelResponse):
                self.last_progress = time.monotonic()
                peer = self.streams.get(event.stream_id)
                if peer is not None:
                    peer.on_response(event.status)
            elif isinstance(event, hbone.TunnelReset):
                self._lingering.discard(event.stream_id)
                task = self._requests.pop(event.stream_id, None)
                if task is not None:
                    task.cancel()
                peer = self.streams.pop(event.stream_id, None)
                if peer is not None:
                    peer.on_stream_reset(f"stream reset by peer (code {event.error_code})",
                                         unprocessed=event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM)
                self.report_room()
            elif isinstance(event, hbone.TunnelRequested):
                self._cancel_idle()
                if self._on_request is None:
                    self.h2.reset(event.stream_id)
                else:
                    self._requests[event.stream_id] = None  # pending (on_request may answer at once)
                    task = self._on_request(self, event)
                    if task is not None and event.stream_id in self._requests:
                        self._requests[event.stream_id] = task
            elif isinstance(event, hbone.RequestRejected):
                held = self._log_limiter.allow("bad_request")
                if held is not None:
                    log.warning("hbone: rejected stream %d from %s: %s%s", event.stream_id, self.peer_identity,
                                event.reason, held_note(held))
                self._on_rejected("bad_request")
            elif isinstance(event, hbone.PingAnswered):
                if event.opaque == PROBE_PING:
                    self._probing = False
                    self.last_progress = time.monotonic()
            elif isinstance(event, hbone.SettingsAcked):
                if self.draining and not self._drain_acked:
                    # Every stream the peer opened before our zero limit has arrived: say
                    # GOAWAY too (a peer that ignores the limit learns it so), streams go on.
                    self._drain_acked = True
                    self.h2.go_away()
            elif isinstance(event, hbone.PeerGoingAway):
                # Streams up to its last id carry on; ours above it come as REFUSED_STREAM
                # resets next (unanswered: the caller may retry them on a new connection).
                log.debug("hbone: %s going away after stream %d", self.peer_identity, event.last_stream_id)
            elif isinstance(event, hbone.ConnectionEnded):
                if event.error:
                    held = self._log_limiter.allow(event.reason)
                    if held is not None:
                        log.warning("hbone: connection with %s ended: %s%s", self.peer_identity, event.error,
                                    held_note(held))
                    self._on_rejected(event.reason)
                self.flush()
                if event.refused_peer and self.transport is not None:
                    # Our GOAWAY is written (the socket takes it at once); a graceful TLS close
                    # would go on reading and decrypting whatever the abuser still sends, for
                    # up to the shutdown timeout. Cut it off instead.
                    self.transport.abort()
                self._shutdown(event.error or "peer sent GOAWAY")
                return
        self.flush()
        if any(type(event) not in _BYTES_ONLY for event in events):
            self.report_room()  # the peer's stream limit (or our stream count) may have changed
            self._close_if_drained()   # the peer going away, our drain acknowledged, a stream reset

    def eof_received(self) -> bool:
        return False  # TLS: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.verify_error is not None:
            return
        self._shutdown(f"connection lost: {exc}" if exc else "connection closed")

    def pause_writing(self) -> None:
        self.write_paused = True
        for peer in list(self.streams.values()):
            peer.set_paused("tls", True)

    def resume_writing(self) -> None:
        self.write_paused = False
        for peer in list(self.streams.values()):
            peer.set_paused("tls", False)

    # -- used by stream peers and the pool
    def flush(self) -> None:
        """Write everything queued, now (also what ``flush_soon`` scheduled: a flush made
        before it leaves it nothing, and the next ``flush_soon`` schedules again)."""
        self._flush_scheduled = False
        buffers = self.h2.buffers_to_send()
        if buffers and self.transport is not None and not self.transport.is_closing():
            if len(buffers) == 1:
                self.transport.write(buffers[0])
            else:
                # Large payloads as they are, no join copy. uvloop's TLS transport seals each
                # buffer of the list as its own record (a 9-byte record per frame header), yet
                # joining cost more: +20 % CPU per GB on the loopback pair (perf README, session 12).
                self.transport.writelines(buffers)

    def flush_soon(self) -> None:
        """Flush once at the end of this event-loop turn: the DATA frames of every stream
        that read in this turn leave in one TLS write (one record run, one send) instead
        of one each. Bytes stay in order: every flush drains h2's one outbound buffer."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)

    def probe(self) -> None:
        """Ask the peer for a sign of life: one PING at a time, whose ACK moves
        ``last_progress``. A peer busy tearing down thousands of tunnels acknowledges it
        within a loop turn although its answers to new CONNECTs lag; a black-holed path
        (or a dead peer) acknowledges nothing, and is given up on as before."""
        if self._probing or self.closed:
            return
        self._probing = True
        self.h2.ping(PROBE_PING)
        self.flush()

    @property
    def has_room(self) -> bool:
        """Room for one more tunnel. O(1): our own count against the peer's limit."""
        return not self.closed and not self.draining and \
            len(self.streams) + len(self._lingering) < self.h2.stream_limit

    def report_room(self) -> None:
        """Tell the pool when room appeared or ran out (called wherever the count changes)."""
        if self.on_room is not None and self.has_room != self._had_room:
            self._had_room = not self._had_room
            self.on_room(self)

    def drain(self) -> None:
        """When retiring: no new tunnels here (zero stream limit, then a graceful GOAWAY
        once the peer acknowledged it); close once the live ones end."""
        if self.closed or self.draining:
            return
        self.draining = True
        self.h2.drain()
        self.flush()
        self.report_room()

    def _close_if_drained(self) -> None:
        """Close once the last stream ended, when draining (our GOAWAY sent) or when the
        peer is going away."""
        if (self._drain_acked or self.h2.peer_going_away) and not self.closed \
                and not self.streams and not self._requests:
            self.close()

    def open_stream(self, peer: StreamEnd, host: str, port: int, forwarded_for: str, traceparent: str,
                    forwarded_port: int = 0) -> int:
        self._cancel_idle()
        stream_id = self.h2.connect(host, port, forwarded_for, traceparent, forwarded_port)
        self.streams[stream_id] = peer
        peer.bind(self, stream_id)
        self.flush()
        self.report_room()
        return stream_id

    def request_pending(self, stream_id: int) -> bool:
        """Server side: the CONNECT is still waiting for its answer (not reset, not closed)."""
        return not self.closed and stream_id in self._requests

    def accept_stream(self, peer: StreamEnd, stream_id: int) -> bool:
        """Server side: answer 200 and join the stream to ``peer``; False when the
        stream is gone (reset or connection closed meanwhile): the caller closes."""
        if self._requests.pop(stream_id, False) is False or self.closed:
            return False
        if not self.h2.respond(stream_id, hbone.STATUS_OK):
            return False
        self.streams[stream_id] = peer
        peer.bind(self, stream_id)
        self.flush()
        return True

    def refuse_stream(self, stream_id: int, status: int | None) -> None:
        """Server side: answer a CONNECT with ``status``; None: reset it with REFUSED_STREAM,
        which tells the peer nothing of it was processed (RFC 9113 8.7: it may retry)."""
        self._requests.pop(stream_id, None)
        if self.closed:
            return
        if status is None:
            self.h2.reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        else:
            self.h2.respond(stream_id, status)
        self.flush()
        self._close_if_drained()

    def table_sizes(self) -> dict[str, int]:
        """Entries in this connection's per-stream tables and its read buffer's bytes."""
        return {"tunnels": len(self.streams), "lingering": len(self._lingering), "requests": len(self._requests),
                "read_buffer_bytes": len(self.reads.data), **self.h2.table_sizes()}

    def stream_done(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if not self.h2.release(stream_id):
            self._lingering.add(stream_id)  # still counts against the peer's limit
        self.flush_soon()
        if not self.streams:
            self.reads.shrink()   # a quiet connection does not keep a bulk-sized buffer
            self._arm_idle()
            self._close_if_drained()
        self.report_room()

    def close(self) -> None:
        """GOAWAY and close once flushed (used when draining and at idle)."""
        if not self.closed:
            self.h2.close()
            self.flush()
            if self.transport is not None:
                self.transport.close()
            self._shutdown("closed locally")

    # -- internals
    def _shutdown(self, reason: str) -> None:
        if self.closed and not self.streams:
            return
        self.closed = True
        self._cancel_idle()
        requests, self._requests = self._requests, {}
        for task in requests.values():
            if task is not None:
                task.cancel()  # upstream dials still running: stop them, close their sockets
        for peer in list(self.streams.values()):
            peer.on_stream_reset(reason)
        self.streams.clear()
        self.report_room()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self._on_closed is not None:
            callback, self._on_closed = self._on_closed, None
            callback(self)

    def _arm_idle(self) -> None:
        self._cancel_idle()
        if not self.closed and self.idle_timeout > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        if not self.streams:
            self.close()


@mypyc_attr(native_class=False)   # compiled: a subclass of a built-in exception stays a Python class
class StreamRefused(ConnectionResetError):
    """The peer reset our CONNECT with REFUSED_STREAM before answering: it processed none
    of it (overloaded, or going away), so the caller may retry it elsewhere or later."""


def abort_with_reset(transport: asyncio.WriteTransport) -> None:
    """Close at once with a TCP RST (SO_LINGER 0): a FIN to an app that does not read
    would leave the socket in FIN-WAIT-1, orphaned, for minutes (Rapid Reset left 12,443)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass  # already closed: nothing left to linger
    transport.abort()


LINGER_RESET = struct.pack("ii", 1, 0)
NO_BYTES = memoryview(b"")   # read-only and empty: every idle StreamPeer shares it
PAUSE_REASONS = {"tls": 1, "window": 2}


class StreamPeer(asyncio.BufferedProtocol):
    """A plain TCP socket joined to one HBONE stream (either end of the tunnel).

    On the client side the socket is the app's accepted connection (``record`` is the
    outbound view); on the server side it is the upstream connection to the app.
    ``tcp_is_client`` names which record counter the TCP bytes feed.

    The socket reads into its session's shared buffer (``HboneSession.tcp_reads``), no
    bytes object per read: each read becomes DATA frames at once, small ones copied into
    the session's outbound buffer (sent at the end of the loop turn, with every other
    stream's), large ones written to TLS right away, before the next read reuses it.
    """

    # One per tunnel end, 10,000 at a time in a busy worker: no instance dict.
    __slots__ = ("record", "_on_finished", "_tcp_is_client", "session", "stream_id", "transport", "_pending",
                 "_early", "_held", "_reads", "_unacked", "_tcp_write_paused", "_paused", "_eof_from_tcp",
                 "_eof_sent", "_eof_from_stream", "_established", "response", "finished")

    def __init__(self, record: TransferRecord, on_finished: Callable[[TransferRecord], None],
                 tcp_is_client: bool):
        self.record = record
        self._on_finished = on_finished
        self._tcp_is_client = tcp_is_client
        self.session: HboneSession | None = None
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None
        self._pending = NO_BYTES            # TCP bytes waiting for send window
        self._early: list[tuple[bytes, int]] = []  # stream bytes before the TCP side existed (copies)
        self._held: list[bytes] = []        # TCP bytes before the tunnel was established
        self._reads: ReadBuffer | None = None  # the session's, once bound
        self._unacked = 0                   # stream bytes written but not credited back
        self._tcp_write_paused = False
        self._paused = 0                    # PAUSE_REASONS bits: why reading the TCP side is paused
        self._eof_from_tcp = False
        self._eof_sent = False
        self._eof_from_stream = False
        self._established = False
        self.response: asyncio.Future | None = None
        self.finished = False

    # -- joining
    def bind(self, session: HboneSession, stream_id: int) -> None:
        self.session, self.stream_id = session, stream_id
        self._reads = session.tcp_reads
        if session.write_paused:
            self.set_paused("tls", True)

    def start(self, transport: asyncio.Transport) -> None:
        """Take over a TCP transport (``connection_made`` or ``set_protocol`` handover)."""
        self.transport = transport
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH, low=TCP_WRITE_LOW)
        for data, length in self._early:
            self._deliver(data, length)
        self._early.clear()
        self._apply_pause()

    def established(self) -> None:
        """The tunnel is up: start moving TCP bytes into the stream."""
        self._established = True
        held, self._held = self._held, []
        for data in held:
            self._push(memoryview(data))
        self._send_eof_if_ready()
        self._maybe_finish()
        self._apply_pause()

    # -- TCP side (asyncio.Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.start(cast(asyncio.Transport, transport))   # TCP: a stream transport

    def get_buffer(self, sizehint: int) -> memoryview:
        reads = self._reads
        if reads is None:  # reading before the stream is bound (an upstream that connected first)
            reads = self._reads = ReadBuffer(EARLY_READ_BUFFER)
        return reads.view

    def buffer_updated(self, nbytes: int) -> None:
        if self._tcp_is_client:
            self.record.bytes_in += nbytes
        else:
            self.record.bytes_out += nbytes
        data = self._reads.view[:nbytes]   # type: ignore[union-attr]  # get_buffer came first
        if not self._established:
            # uvloop starts reading right after connection_made, paused or not: hold the
            # bytes (a server-first app greets before the tunnel is answered) until then.
            self._held.append(bytes(data))
            cast(asyncio.Transport, self.transport).pause_reading()   # reads come after connection_made
            return
        session = self.session
        # ``_push``'s first case, inline (a request or response of a ping-pong: one frame,
        # merged into the outbound buffer, sent at the end of the loop turn): one interpreter
        # frame fewer on every small read.
        if not self._pending and session is not None and not session.closed \
                and session.h2.send_small(self.stream_id, data):
            session.flush_soon()
            return
        self._push(data)

    def _push(self, data: memoryview) -> None:
        """Frame ``data`` (a view of the shared read buffer, valid until the next read)."""
        session = self.session
        if session is None or session.closed:
            return
        if self._pending:
            self._pending = memoryview(bytes(self._pending) + data)
        else:
            sent = session.h2.send(self.stream_id, data)
            if sent < len(data):
                self._pending = memoryview(bytes(data[sent:]))  # waits for window: a copy
        if self._pending:
            self.set_paused("window", True)
        if session.h2.views_queued:
            # Large payloads are queued as views, not copied: TLS must take them before the
            # next read reuses the buffer. A TLS transport that kept them queued lends it.
            session.flush()
            transport = session.transport
            if transport is not None and transport.get_write_buffer_size() and self._reads is not None:
                self._reads.lend()
        else:
            session.flush_soon()

    def eof_received(self) -> bool:
        self._eof_from_tcp = True
        self._send_eof_if_ready()
        self._maybe_finish()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        self._tcp_write_paused = True

    def resume_writing(self) -> None:
        self._tcp_write_paused = False
        if self._unacked and self.session is not None and not self.session.closed:
            self.session.h2.consumed(self.stream_id, self._unacked)
            self._unacked = 0
            self.session.flush_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            if exc is not None or not (self._eof_sent and self._eof_from_stream):
                if self.session is not None and not self.session.closed:
                    self.session.h2.reset(self.stream_id)
                    self.session.flush_soon()
                if exc is not None:
                    self.record.failed(str(exc))
            self._finish()

    # -- stream side (called by HboneSession)
    def on_response(self, status: int) -> None:
        if self.response is not None and not self.response.done():
            self.response.set_result(status)

    def on_stream_data(self, data: bytes | memoryview, length: int) -> None:
        if self._tcp_is_client:
            self.record.bytes_out += len(data)
        else:
            self.record.bytes_in += len(data)
        transport = self.transport
        if transport is None:
            self._early.append((bytes(data), length))  # a view of the session's read buffer: copied
            return
        # ``_deliver``, inline: this runs for every payload received.
        transport.write(data)
        session = self.session
        if type(data) is memoryview and transport.get_write_buffer_size():
            session.reads.lent = True   # type: ignore[union-attr]  # the socket queued the view itself
        if self._tcp_write_paused:
            self._unacked += length
        else:
            session.h2.consumed(self.stream_id, length)   # type: ignore[union-attr]  # bound before any data

    def _deliver(self, data: bytes | memoryview, length: int) -> None:
        transport, session = self.transport, self.session
        # Stream bytes come from the bound session, and are held in _early until the TCP side is up.
        assert transport is not None and session is not None
        transport.write(data)
        if type(data) is memoryview and transport.get_write_buffer_size():
            session.reads.lent = True  # the socket queued the view itself
        if self._tcp_write_paused:
            self._unacked += length
        else:
            session.h2.consumed(self.stream_id, length)

    def on_window(self) -> None:
        if not self._pending or self.session is None:
            return
        sent = self.session.h2.send(self.stream_id, self._pending)
        self._pending = self._pending[sent:]
        if not self._pending:
            self._pending = NO_BYTES
            self.set_paused("window", False)
            self._send_eof_if_ready()
        self.session.flush_soon()

    def on_stream_end(self) -> None:
        self._eof_from_stream = True
        if self.transport is not None and self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()
        self._maybe_finish()

    def on_stream_reset(self, reason: str, unprocessed: bool = False) -> None:
        if self.response is not None and not self.response.done():
            # Not answered yet: whoever awaits the answer decides (retry or give up).
            self.response.set_exception(StreamRefused(reason) if unprocessed else ConnectionResetError(reason))
            self.finished = True
            return
        if not self.finished:
            if not (self._eof_sent and self._eof_from_stream):
                self.record.reset(reason)
            if self.transport is not None:
                abort_with_reset(self.transport)
            self._finish()

    # -- helpers
    def set_paused(self, why: str, paused: bool) -> None:
        """``why``: "tls" (the session's TLS transport is full) or "window" (no send window)."""
        bit = PAUSE_REASONS[why]
        self._paused = self._paused | bit if paused else self._paused & ~bit
        self._apply_pause()

    def _apply_pause(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._paused or not self._established:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _send_eof_if_ready(self) -> None:
        if self._eof_from_tcp and not self._eof_sent and not self._pending and self.session is not None \
                and not self.session.closed and self._established:
            self._eof_sent = True
            self.session.h2.end(self.stream_id)
            self.session.flush_soon()   # the ends of every stream closing this turn: one TLS write

    def _maybe_finish(self) -> None:
        if self._eof_sent and self._eof_from_stream and not self.finished:
            if self.transport is not None:
                self.transport.close()
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        if self.session is not None:
            self.session.stream_done(self.stream_id)
        self._on_finished(self.record)


class PipeEnd(asyncio.Protocol):
    """One side of a plain TCP relay; two of them point at each other."""

    def __init__(self, record: TransferRecord, is_client: bool, on_finished: Callable[[TransferRecord], None]):
        self.record = record
        self.is_client = is_client
        self._other: PipeEnd | None = None
        self.transport: asyncio.Transport | None = None
        self._on_finished = on_finished
        self._early: list[bytes] = []  # bytes that arrived before the other side was wired
        self._eof = False
        self._done = False

    @staticmethod
    def join(client: "PipeEnd", server: "PipeEnd") -> None:
        client._other, server._other = server, client

    @property
    def other(self) -> PipeEnd:
        """The other end: ``join`` wires both before either socket is connected."""
        if self._other is None:
            raise RuntimeError("PipeEnd used before join()")
        return self._other

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tcp = cast(asyncio.Transport, transport)   # TCP: a stream transport
        other = self.other
        if other._early:
            for data in other._early:
                tcp.write(data)
            other._early.clear()
            if other.transport is not None:   # it held bytes, so it is connected
                other.transport.resume_reading()
        if other._eof:
            other._forward_eof()

    def data_received(self, data: bytes) -> None:
        if self.is_client:
            self.record.bytes_in += len(data)
        else:
            self.record.bytes_out += len(data)
        peer = self.other.transport
        if peer is None:
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        peer.write(data)

    def eof_received(self) -> bool:
        self._eof = True
        if self.other.transport is not None:
            self._forward_eof()
        return True

    def _forward_eof(self) -> None:
        """Half-close the other side (its socket is connected: both callers check)."""
        other = self.other
        peer = other.transport
        if peer is None:
            return
        if peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()
        if other._eof:
            if self.transport is not None:
                self.transport.close()
            peer.close()

    def pause_writing(self) -> None:
        if self.other.transport is not None:   # what fills our buffer is the other side's reading
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.record.failed(str(exc))
        other = self._other
        if other is not None and other.transport is not None:
            if exc is not None:
                other.transport.abort()
            else:
                other.transport.close()
        if not self._done:
            self._done = True
            if other is not None:
                other._done = True
            self._on_finished(self.record)

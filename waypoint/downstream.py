"""Downstream HTTP servers: HTTP/1.1 (llhttp, through ``h1.RequestReader``) and HTTP/2 cleartext (h2) over one byte stream.

The stream is whatever carried the client: an HBONE tunnel (the mesh) or a TCP
connection (tests, benchmarks). ``serve_connection`` sniffs the HTTP/2 preface and
runs one of the two servers; both turn requests into ``ProxyRequest`` + body
iterator and hand them to the proxy pipeline, and enforce ``Limits``: a broken or
hostile client gets 400 / 408 / 431 and loses its own connection (HTTP/1.1) or
stream (HTTP/2), never anyone else's.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from shoal.h2guard import CLOSED_STREAMS_PER_OPEN, ENHANCE_YOUR_CALM, BoundedH2Connection, FloodGuard, PrematureResets
from shoal.hbone.framing import Budget

from .grpc import RESOURCE_EXHAUSTED, MessageSizeLimit, MessageTooLarge, is_grpc
from .h1 import (
    END,
    LAST_CHUNK,
    H1Error,
    RequestHead,
    RequestReader,
    ResponseFraming,
    Upgraded,
    encode_chunk,
    encode_head,
    frame_response_head,
    status_line,
)
from .http import Body, BodyError, Limits, PeerInfo, ProxyRequest, Tunnel, pipe
from .upstream import UpstreamError

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_CHUNK = 65536
REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           501: "Not Implemented", 505: "HTTP Version Not Supported"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[..., Awaitable[None]]   # (request, body, sink[, handoff]) -> the pipeline
Reject = Callable[[str, int], None]  # (reason, status) -> count it


class Handoff:
    """A request the fast path parsed (and routed) but leaves to the pipeline.

    ``body`` yields the request body it already took from the reader; ``routed`` and
    ``record`` are the pipeline's own decisions and record (made once: the authorization
    counter and the rate limiter see each request once), ``attempt`` a first upstream
    attempt that failed before any answer was forwarded.
    """

    __slots__ = ("head", "request", "body", "record", "routed", "attempt")

    def __init__(self, head: RequestHead, request: ProxyRequest, body: Body, record: object = None,
                 routed: object = None, attempt: object = None) -> None:
        self.head = head
        self.request = request
        self.body = body
        self.record = record
        self.routed = routed
        self.attempt = attempt


CLOSE = object()   # what a fast lane returns when the connection ends after its answer


class FastLane(Protocol):
    """Serves plain requests from callbacks (``waypoint.fastpath``); ``serve`` returns when it
    stops: None (the reader holds something for the pipeline), a ``Handoff``, or ``CLOSE``."""

    def serve(self) -> Awaitable["Handoff | object | None"]: ...


FastLaneFactory = Callable[["H1Server"], "FastLane | None"]


async def serve_connection(stream: Tunnel, peer: PeerInfo, handler: Handler, limits: Limits,
                           reject: Reject, on_protocol: Callable[[str], None] = lambda p: None,
                           fast_lane: "FastLaneFactory | None" = None) -> None:
    """Serve one downstream connection until it closes; never raises for client misbehaviour."""
    try:
        try:
            first = await read_within(stream, limits.keepalive_timeout)
            while first and len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
                more = await read_within(stream, limits.header_timeout)
                if not more:
                    break
                first += more
        except (TimeoutError, OSError):
            return
        if not first:
            return
        if first.startswith(H2_PREFACE):
            on_protocol("HTTP/2")
            await H2Server(stream, peer, handler, limits, reject).run(first)
        else:
            on_protocol("HTTP/1.1")
            server = H1Server(stream, peer, handler, limits, reject)
            if fast_lane is not None:
                server.lane = fast_lane(server)
            await server.run(first)
    except (ConnectionError, OSError) as err:
        log.debug("downstream %s:%d: %s", peer.source_ip, peer.source_port, err)
    finally:
        stream.close()


async def read_within(stream: Tunnel, timeout: float | None) -> bytes:
    """One read with a deadline (asyncio.timeout: no extra task per read, unlike wait_for)."""
    async with asyncio.timeout(timeout):
        return await stream.read(READ_CHUNK)


def _raw_error(status: int, detail: str) -> bytes:
    """An error answer for clients whose request never parsed."""
    body = f"{detail}\n".encode()
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _Close(Exception):
    """Stop serving this connection (after an answer was written, or silently)."""


class H1Server:
    """HTTP/1.1 on one connection: ``RequestReader`` (llhttp) events in, the pipeline's answers out.

    Requests are served one after the other (pipelined ones wait in the reader's queue,
    parsed from at most one read chunk). Bytes are read only when the reader has no
    event left, so a client that sends faster than it is served is held back by the
    stream's own backpressure.
    """

    def __init__(self, stream: Tunnel, peer: PeerInfo, handler: Handler, limits: Limits, reject: Reject) -> None:
        self.stream = stream
        self.peer = peer
        self.handler = handler
        self.limits = limits
        self.reject = reject
        self.reader = RequestReader(limits.max_header_bytes, limits.max_headers)
        self.response_started = False
        self._head: RequestHead | None = None
        self._body_done = False        # the current request's END was consumed
        self._held = b""               # response head, sent with the first body bytes
        self._chunked = False          # the current response is chunk-encoded
        self._no_body = False          # ...or has no body at all (HEAD, 204, 304)
        self._close_after = False      # the connection ends with the current response
        self._switched = False
        self.lane: FastLane | None = None   # callback fast path for plain requests (waypoint.fastpath)
        self._last_head: RequestHead | None = None       # request_for's last head and request
        self._last_request: ProxyRequest | None = None

    def _fail(self, status: int, reason: str, detail: str) -> _Close:
        self.reject(reason, status)
        log.info("downstream %s:%d: %d %s (%s)", self.peer.source_ip, self.peer.source_port, status, reason, detail)
        if not self.response_started:
            self.stream.write(_raw_error(status, detail))
        return _Close()

    async def run(self, initial: bytes) -> None:
        self.reader.feed(initial)
        lane = self.lane
        try:
            while True:
                handoff = None
                if lane is not None:
                    handoff = await lane.serve()
                    if handoff is CLOSE:
                        raise _Close()
                self.response_started = False
                if handoff is None:
                    head = await self._read_head()
                    if head is None:
                        return
                    await self._serve(head)
                else:
                    assert isinstance(handoff, Handoff)
                    await self._serve(handoff.head, handoff)
                if self._switched or self._close_after or not self._body_done:
                    return
        except _Close:
            pass
        try:
            await self.stream.drain()
        except (ConnectionError, OSError):
            pass

    async def _read_head(self) -> RequestHead | None:
        events = self.reader.events
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.header_timeout if self.reader.in_head else None
        while not events:
            timeout = deadline - loop.time() if deadline is not None else self.limits.keepalive_timeout
            try:
                data = await read_within(self.stream, max(timeout, 0.001))
            except TimeoutError:
                if deadline is None:
                    return None  # idle keep-alive connection: close quietly
                raise self._fail(408, "header_timeout", "request head not received in time") from None
            if not data:
                return None      # the client closed (mid-head or between requests)
            if deadline is None:
                deadline = loop.time() + self.limits.header_timeout
            self.reader.feed(data)
        event = events.popleft()
        if isinstance(event, RequestHead):
            return event
        if isinstance(event, H1Error):
            raise self._fail(event.status, event.reason, event.detail)
        raise self._fail(400, "malformed_request", f"unexpected {event!r}")

    def begin(self, head: RequestHead) -> None:
        """A new request: its head is the current one, its body not consumed yet."""
        self.response_started = False
        self._head = head
        self._body_done = False
        events = self.reader.events
        if events and events[0] is END and head.content_length == 0:
            # An empty body is complete already: consumed now, so the connection is
            # reusable however the handler answers.
            events.popleft()
            self._body_done = True

    def request_for(self, head: RequestHead) -> ProxyRequest:
        """The request a head makes on this connection; the same head (the reader's same
        object: the same bytes) makes the same request, which nothing changes once made."""
        last = self._last_request
        if last is not None and head is self._last_head:
            return last
        authority = ""
        headers = []
        header_map: dict[str, str] = {}     # ProxyRequest's, built in the same pass
        for name, value in head.headers:
            if name == "host":
                authority = value
            else:
                headers.append((name, value))
                # Repeated headers match as one comma-joined value, as Envoy does.
                header_map[name] = f"{header_map[name]},{value}" if name in header_map else value
        request = ProxyRequest(method=head.method, target=head.target, authority=authority, headers=headers,
                               protocol="HTTP/1.1" if head.version == "1.1" else "HTTP/1.0", peer=self.peer,
                               content_length=head.content_length, upgrade=head.upgrade, header_map=header_map)
        self._last_head, self._last_request = head, request
        return request

    @property
    def body_done(self) -> bool:
        """The current request's body was read to its end."""
        return self._body_done

    def body_taken(self) -> None:
        """The current request's body was consumed to its end (by the fast path)."""
        self._body_done = True

    def buffered_body(self, chunks: list[bytes]) -> Body:
        """A body the fast path already took from the reader, as the pipeline reads one."""
        return _BufferedBody(self, chunks)

    async def _serve(self, head: RequestHead, handoff: Handoff | None = None) -> None:
        try:
            if handoff is None:
                self.begin(head)
                await self.handler(self.request_for(head), _H1Body(self), self)
            else:
                await self.handler(handoff.request, handoff.body, self, handoff)
        except BodyError as err:
            raise self._fail(err.status, "bad_body", err.reason) from None
        except _Close:
            raise
        except (UpstreamError, ConnectionError, OSError) as err:
            # The upstream broke mid-response, or this client went away: this connection only.
            if self.response_started:
                log.info("response to %s:%d aborted: %s", self.peer.source_ip, self.peer.source_port, err)
                raise _Close() from None
            raise

    def body_ended(self) -> None:
        """The current request's END was consumed (by the pipeline's body)."""
        self._body_done = True

    # -- ResponseSink -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.response_started

    async def start(self, status: int, headers: list[tuple[str, str]], content_length: int | None) -> None:
        self.start_head(status, headers, content_length)

    def start_head(self, status: int, headers: list[tuple[str, str]], content_length: int | None) -> None:
        """The answer's head, held until its first body bytes (or its end) go out with it."""
        head = self._head
        assert head is not None
        self.start_framed(frame_response_head(status, headers, content_length, head.method, head.version,
                                              self.closes_after_answer))

    @property
    def closes_after_answer(self) -> bool:
        """The connection cannot carry another request after the current answer: the client
        said so, a protocol switch was asked for, or the answer starts before the whole
        request body arrived (403, 429...: rather than reading a body nobody wants)."""
        head = self._head
        assert head is not None
        return not head.keep_alive or self.reader.upgraded or not self._body_done

    def start_framed(self, framing: ResponseFraming) -> None:
        """Start the answer with a head ``h1.frame_response_head`` made for the current request."""
        self.response_started = True
        self._held, self._chunked, self._no_body, self._close_after = framing

    async def send(self, chunk: bytes) -> None:
        if self.write_body(chunk):
            await self.stream.drain()

    def write_body(self, chunk: bytes) -> bool:
        """Frame and write body bytes (with the held head); False when nothing was written."""
        if self._no_body or not chunk:
            return False
        data = encode_chunk(chunk) if self._chunked else chunk
        if self._held:
            data, self._held = self._held + data, b""
        self.stream.write(data)
        return True

    async def end(self) -> None:
        self.write_end()
        await self.stream.drain()

    def write_end(self) -> None:
        """The answer's last bytes: the held head if nothing went yet, the last chunk."""
        data = LAST_CHUNK if self._chunked else b""
        if self._held:
            data, self._held = self._held + data, b""
        if data:
            self.stream.write(data)

    @property
    def close_after(self) -> bool:
        """The connection ends with the current answer."""
        return self._close_after

    async def upgrade(self, headers: list[tuple[str, str]], upstream: Tunnel, leftover: bytes) -> None:
        """101 Switching Protocols: from now on both sides are raw bytes (websockets)."""
        self.response_started = True
        self._switched = True
        self.stream.write(encode_head(status_line(101), headers))
        await self.stream.drain()
        if leftover:
            self.stream.write(leftover)
        for event in self.reader.events:
            if isinstance(event, Upgraded) and event.leftover:
                upstream.write(event.leftover)
        up = asyncio.ensure_future(pipe(self.stream, upstream))
        down = asyncio.ensure_future(pipe(upstream, self.stream))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)


class _H2Stream:
    def __init__(self, stream_id: int, opened: float) -> None:
        self.stream_id = stream_id
        self.opened = opened   # monotonic: a reset before its answer soon after is premature
        self.chunks: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.window_open = asyncio.Event()
        self.started = False
        self.reset = False


class H2Server:
    """HTTP/2 cleartext (prior knowledge, as inside an HBONE tunnel)."""

    def __init__(self, stream: Tunnel, peer: PeerInfo, handler: Handler, limits: Limits, reject: Reject) -> None:
        self.stream = stream
        self.peer = peer
        self.handler = handler
        self.limits = limits
        self.reject = reject
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        self.h2 = BoundedH2Connection(config, remember_closed=CLOSED_STREAMS_PER_OPEN * limits.max_concurrent_streams)
        # hpack refuses header lists past twice our limit (connection error); between 1x and 2x
        # the stream gets a clean 431.
        self.h2.max_inbound_frame_size = limits.max_h2_frame
        self.streams: dict[int, _H2Stream] = {}
        self.closed = False
        self.cut = False   # ended by us for a flood
        # What h2 itself lets through, judged as the HBONE side judges it (shoal.hbone.framing),
        # so both proxies cut the same peers: CONTINUATION floods and control-frame floods
        # (its budgets) here, before h2 reads the bytes; Rapid Reset by the ratio of streams
        # reset before their answer (``PrematureResets``), never by counting cancels.
        self.guard = FloodGuard(max_header_block=2 * limits.max_header_bytes, expect_preface=True, budget=Budget())
        self.premature = PrematureResets()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.stream.write(data)

    async def run(self, initial: bytes) -> None:
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: self.limits.max_h2_frame,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes,
        })
        self.h2.initiate_connection()
        self.h2.decoder.max_header_list_size = 2 * self.limits.max_header_bytes
        self.h2.increment_flow_control_window(16 << 20)
        self.flush()
        data = initial
        try:
            while data:
                flood = self.guard.feed(data)
                if flood is not None:
                    self._calm_down(*flood)
                    return
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as err:
                    self.reject("h2_protocol_error", 400)
                    log.info("downstream %s:%d: HTTP/2 protocol error: %s", self.peer.source_ip, self.peer.source_port, err)
                    self.flush()  # h2 queued the GOAWAY
                    return
                for event in events:
                    self._on_event(event)
                    if self.cut:
                        return
                self.flush()
                await self.stream.drain()
                timeout = None if self.streams else self.limits.keepalive_timeout
                try:
                    data = await read_within(self.stream, timeout)
                except TimeoutError:
                    self.h2.close_connection()
                    self.flush()
                    return
        finally:
            self.closed = True
            for s in list(self.streams.values()):
                if s.task is not None:
                    s.task.cancel()
                s.window_open.set()
            tasks = [s.task for s in self.streams.values() if s.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _on_event(self, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            s = self.streams.get(event.stream_id)
            if s is None or s.reset:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                s.chunks.put_nowait((event.data, event.flow_controlled_length))
        elif isinstance(event, h2.events.StreamEnded):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.chunks.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            s = self.streams.get(event.stream_id)
            if s is not None and not s.started and self.premature.reset_unanswered(s.opened, time.monotonic()):
                self._calm_down("premature_reset_flood", "half its streams reset before their answer (rapid reset)")
            if s is not None:
                s.reset = True
                s.window_open.set()
                if s.task is not None:
                    s.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self.streams.values() if event.stream_id == 0 else [self.streams.get(event.stream_id)]
            for s in targets:
                if s is not None:
                    s.window_open.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    def _calm_down(self, reason: str, detail: str) -> None:
        """A flood: GOAWAY ENHANCE_YOUR_CALM, counted as ``h2_<reason>`` (the HBONE side's
        names, ``hbone_<reason>``), and the connection ends."""
        self.reject(f"h2_{reason}", 400)
        log.warning("downstream %s:%d: %s: GOAWAY", self.peer.source_ip, self.peer.source_port, detail)
        self.h2.close_connection(ENHANCE_YOUR_CALM)
        self.flush()
        self.cut = True

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        s = self.streams[stream_id] = _H2Stream(stream_id, time.monotonic())
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
        size = sum(len(n) + len(v) + 32 for n, v in headers)
        if len(headers) > self.limits.max_headers or size > self.limits.max_header_bytes:
            self.reject("header_too_large", 431)
            s.task = asyncio.ensure_future(self._reply_error(s, 431, "request headers too large"))
            return
        pseudo = {n: v for n, v in headers if n.startswith(":")}
        regular = [(n, v) for n, v in headers if not n.startswith(":")]
        method = pseudo.get(":method", "")
        if method == "CONNECT" or ":path" not in pseudo:
            self.reject("malformed_request", 400 if method != "CONNECT" else 501)
            s.task = asyncio.ensure_future(self._reply_error(s, 501 if method == "CONNECT" else 400, "unsupported request"))
            return
        content_length = None
        for name, value in regular:
            if name == "content-length":
                content_length = int(value)  # h2 validated it
        if event.stream_ended is not None:
            content_length = 0
            s.chunks.put_nowait(None)
        authority = pseudo.get(":authority") or next((v for n, v in regular if n == "host"), "")
        request = ProxyRequest(method=method, target=pseudo[":path"], authority=authority,
                               headers=[(n, v) for n, v in regular if n != "host"], protocol="HTTP/2",
                               peer=self.peer, content_length=content_length, scheme=pseudo.get(":scheme", "http"))
        s.task = asyncio.ensure_future(self._serve_stream(s, request))

    async def _reply_error(self, s: _H2Stream, status: int, detail: str) -> None:
        sink = _H2Sink(self, s)
        payload = (detail + "\n").encode()
        try:
            await sink.start(status, [("content-type", "text/plain"), ("content-length", str(len(payload)))], len(payload))
            await sink.send(payload)
            await sink.end()
        finally:
            self._forget(s)

    async def _serve_stream(self, s: _H2Stream, request: ProxyRequest) -> None:
        sink = _H2Sink(self, s)
        try:
            grpc_limit = MessageSizeLimit(self.limits.max_grpc_message) \
                if is_grpc(request.header_map.get("content-type", "")) else None
            await self.handler(request, _H2Body(self, s, grpc_limit), sink)
        except BodyError as err:
            self.reject("bad_body", err.status)
            self._reset(s, h2.errors.ErrorCodes.CANCEL)
        except asyncio.CancelledError:
            self._reset(s, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as err:
            log.debug("stream %d: %s", s.stream_id, err)
        except (UpstreamError, ConnectionError, OSError) as err:
            # The upstream broke mid-response: reset this stream only.
            log.info("stream %d from %s aborted: %s", s.stream_id, self.peer.source_ip, err)
            self._reset(s, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self._forget(s)

    def _forget(self, s: _H2Stream) -> None:
        self.streams.pop(s.stream_id, None)
        # Unread body bytes still count against the connection window: give them back.
        while not s.chunks.empty():
            item = s.chunks.get_nowait()
            if item is not None and not self.closed:
                self.h2.acknowledge_received_data(item[1], s.stream_id)
        if not self.closed:
            self.flush()

    def _reset(self, s: _H2Stream, code: int) -> None:
        if self.closed or s.reset:
            return
        s.reset = True
        try:
            self.h2.reset_stream(s.stream_id, code)
        except h2.exceptions.StreamClosedError:
            return
        self.flush()


class BodyIterator:
    """A request body as the pipeline reads it (``Body``): an async iterator of chunks, each
    from ``next_chunk``. Here and in the proxy's counting body.

    Written as a class, not an async generator (mypyc compiles no async generator), and
    ending as one does: once it has ended or raised, it yields nothing more."""

    def __init__(self) -> None:
        self.finished = False

    def __aiter__(self) -> "BodyIterator":
        return self

    async def __anext__(self) -> bytes:
        if self.finished:
            raise StopAsyncIteration
        self.finished = True       # until a chunk comes: an error or the end finishes it
        chunk = await self.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        self.finished = False
        return chunk

    async def next_chunk(self) -> bytes | None:
        """The next chunk, or None at the end."""
        raise NotImplementedError


class _BufferedBody(BodyIterator):
    """The chunks the fast path already took from the reader, up to the request's END."""

    def __init__(self, server: H1Server, chunks: list[bytes]) -> None:
        super().__init__()
        self.server = server
        self.chunks = chunks
        self.index = 0

    async def next_chunk(self) -> bytes | None:
        index = self.index
        if index < len(self.chunks):
            self.index = index + 1
            return self.chunks[index]
        self.server.body_ended()
        return None


class _H1Body(BodyIterator):
    """The current request's body from the reader's events, reading the stream when they run out."""

    def __init__(self, server: H1Server) -> None:
        super().__init__()
        self.server = server
        self.received = False

    async def next_chunk(self) -> bytes | None:
        server = self.server
        events = server.reader.events
        head = server._head
        assert head is not None
        while True:
            if not events:
                if head.expect_continue and not self.received and not server.response_started:
                    server.stream.write(CONTINUE)
                    self.received = True
                try:
                    data = await read_within(server.stream, server.limits.body_idle_timeout)
                except TimeoutError:
                    raise BodyError(408, "request body stalled") from None
                if not data:
                    raise BodyError(400, "connection closed inside the request body")
                server.reader.feed(data)
                continue
            event = events.popleft()
            if isinstance(event, bytes):
                self.received = True
                return event
            if event is END:
                server.body_ended()
                return None
            if isinstance(event, H1Error):
                raise BodyError(400, f"malformed body: {event.detail}")
            raise BodyError(400, f"unexpected {event!r} inside the request body")


class _H2Body(BodyIterator):
    """One HTTP/2 stream's request body, its flow-control credit given back as it is read."""

    def __init__(self, server: H2Server, s: _H2Stream, grpc_limit: MessageSizeLimit | None = None) -> None:
        super().__init__()
        self.server = server
        self.s = s
        self.grpc_limit = grpc_limit

    async def next_chunk(self) -> bytes | None:
        server, s = self.server, self.s
        try:
            item = await asyncio.wait_for(s.chunks.get(), server.limits.body_idle_timeout)
        except TimeoutError:
            raise BodyError(408, "request body stalled") from None
        if item is None:
            return None
        data, flow_length = item
        if not server.closed:
            server.h2.acknowledge_received_data(flow_length, s.stream_id)
            server.flush()
        if self.grpc_limit is not None:
            try:
                self.grpc_limit.feed(data)
            except MessageTooLarge as err:
                server.reject("grpc_message_too_large", 413)
                raise BodyError(413, str(err), grpc_status=RESOURCE_EXHAUSTED) from None
        return data


class _H2Sink:
    def __init__(self, server: H2Server, s: _H2Stream) -> None:
        self.server = server
        self.s = s
        self._held: list[tuple[str, str]] | None = None

    @property
    def started(self) -> bool:
        return self.s.started

    async def start(self, status: int, headers: list[tuple[str, str]], content_length: int | None) -> None:
        if not self.s.started:
            self.server.premature.answered()
        self.s.started = True
        h2_headers = [(":status", str(status))] + [(n, v) for n, v in headers if n not in ("connection", "keep-alive")]
        if content_length == 0:
            # Held for end(): one HEADERS frame with END_STREAM (gRPC's trailers-only form).
            self._held = h2_headers
            return
        self.server.h2.send_headers(self.s.stream_id, h2_headers)
        self.server.flush()

    async def send(self, chunk: bytes) -> None:
        server, stream_id = self.server, self.s.stream_id
        if self._held is not None:
            held, self._held = self._held, None
            server.h2.send_headers(stream_id, held)
        view = memoryview(chunk)
        while view:
            if server.closed or self.s.reset:
                raise ConnectionError("downstream stream closed")
            window = min(server.h2.local_flow_control_window(stream_id), server.h2.max_outbound_frame_size)
            if window <= 0:
                self.s.window_open.clear()
                await self.s.window_open.wait()
                continue
            server.h2.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            server.flush()
        await server.stream.drain()

    async def end_with_trailers(self, trailers: list[tuple[str, str]]) -> None:
        """Ends the stream with a HEADERS frame of trailers (an HTTP/2 upstream's grpc-status)."""
        server = self.server
        if server.closed or self.s.reset:
            return
        if self._held is not None:
            held, self._held = self._held, None
            server.h2.send_headers(self.s.stream_id, held)
        server.h2.send_headers(self.s.stream_id, [(n, v) for n, v in trailers if not n.startswith(":")],
                               end_stream=True)
        server.flush()
        await server.stream.drain()

    async def end(self) -> None:
        if not self.server.closed and not self.s.reset:
            if self._held is not None:
                held, self._held = self._held, None
                self.server.h2.send_headers(self.s.stream_id, held, end_stream=True)
                self.server.flush()
                await self.server.stream.drain()
                return
            self.server.h2.end_stream(self.s.stream_id)
            self.server.flush()
            await self.server.stream.drain()

"""The fast path: plain HTTP/1.1 requests served from I/O callbacks, without a task hop.

One ``FastLane`` per downstream HTTP/1.1 connection. While it holds the connection, the
connection's coroutine (``downstream.H1Server.run``) waits on one future, and requests
are served from the streams' ``on_readable`` callbacks: the downstream bytes are parsed
(``h1.RequestReader``), the request is decided by the pipeline's own synchronous part
(``WaypointProxy.route``: service, L7 authorization, rate limit, route, filters,
endpoints), written to an idle pooled upstream connection, and the answer is parsed
(``h1.ResponseReader``) and written back as it comes, all by the same functions the
pipeline uses (``H1Server.start_head/write_body/write_end``, ``_upstream_headers``),
so the bytes, the telemetry record and the counters are the pipeline's.

A request takes the fast path only when it is *plain*: a complete request already
received (head, a body of known length within the replay buffer, its end), no Upgrade,
a route decision that goes upstream (no local answer: denials, 404, redirects, 5xx go to
the pipeline), an HTTP/1.1 backend without retries, faults, timeouts, mirrors or outlier
detection, a free circuit breaker and an idle keep-alive connection to the endpoint.
Anything else is handed to the pipeline (``downstream.Handoff``) with what was already
decided, so nothing is counted twice; so is an upstream that fails before answering (the
pipeline then retries on a fresh connection, as for any stale pooled connection). The
lane also gives the connection back when it has been idle for a second, so the
pipeline's keep-alive and slow-head deadlines apply to idle connections (about one
second later than they would). Backpressure is the same as the pipeline's: the lane
reads the downstream only between exchanges, and stops reading the upstream while the
downstream's write buffer is full.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, cast

from .downstream import CLOSE, H1Server, Handoff
from .h1 import END, RequestHead, ResponseFraming, UpstreamFramingError, frame_response_head
from .http import CallbackStream, ResponseHead, strip_hop_by_hop
from .proxy import ConnectionMemo, Routed, WaypointProxy, _Attempt, _Cluster
from .resilience import RESET
from .routing import RequestPlan, apply_response_filters
from .upstream import ClusterPool, UpstreamConnection

log = logging.getLogger(__name__)

IDLE_HANDBACK = 1.0     # seconds without a request before the connection goes back to its coroutine
FRAMINGS_KEPT = 256     # answer heads remembered (answers alike get the same head bytes)
_NOTHING_TRIED: frozenset = frozenset()


def fast_lanes(proxy: WaypointProxy) -> Callable[[H1Server], "FastLane | None"] | None:
    """The lane factory ``downstream.serve_connection`` takes, or None when the fast path is off."""
    if not proxy.fast_path:
        return None

    # Answer heads by what makes them (h1.frame_response_head is pure): one dict for all lanes.
    framings: dict[tuple, ResponseFraming] = {}

    def lane(server: H1Server) -> FastLane | None:
        return FastLane(proxy, server, framings) if hasattr(server.stream, "read_nowait") else None

    return lane


def _plain(routed: Routed) -> bool:
    """A route decision the fast path serves as the pipeline would (no retry, fault, timer, mirror)."""
    cluster, policy, rule, plan = routed.cluster, routed.request_policy, routed.rule, routed.plan
    assert cluster is not None and policy is not None and plan is not None   # not a local reply
    return (not cluster.http2 and cluster.outliers is None and policy.retries is None and policy.faults is None
            and not rule.timeouts.request and not rule.timeouts.backend_request and not plan.mirrors)


class _Exchange:
    """One request in flight on the fast path (``plan``, ``cluster``, ``pool``: the routed
    decision's, ``stream``: the connection's, as the types the fast path knows them to be)."""

    __slots__ = ("head", "request", "chunks", "record", "routed", "plan", "cluster", "pool", "conn", "stream",
                 "answered", "paused")

    def __init__(self, head: RequestHead, request, chunks: list[bytes], record, routed: Routed, plan: RequestPlan,
                 cluster: _Cluster, pool: ClusterPool, conn: UpstreamConnection, stream: CallbackStream) -> None:
        self.head = head
        self.request = request
        self.chunks = chunks
        self.record = record
        self.routed = routed
        self.plan = plan
        self.cluster = cluster
        self.pool = pool
        self.conn = conn
        self.stream = stream
        self.answered = False   # the upstream's head came and was handed to the downstream side
        self.paused = False     # waiting for the downstream's write buffer to drain


class FastLane:
    def __init__(self, proxy: WaypointProxy, server: H1Server,
                 framings: dict[tuple, ResponseFraming] | None = None) -> None:
        self.proxy = proxy
        self.framings = framings if framings is not None else {}
        self.server = server
        # fast_lanes makes a lane only for a stream that reads from callbacks (read_nowait).
        self.stream = cast(CallbackStream, server.stream)
        self.reader = server.reader
        self.body_limit = proxy.limits.retry_buffer_bytes
        self.memo = ConnectionMemo()   # route decisions shared by this connection's requests
        self.loop = asyncio.get_running_loop()
        self.exchange: _Exchange | None = None
        self._waiter: asyncio.Future | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._drainer: asyncio.Task | None = None
        self._active_at = 0.0
        # Framings by the identity of the answer and request heads (the readers hand the same
        # objects out for the same bytes): (id, id, close) -> (answer head, request head, framing).
        # One per upstream connection this lane's requests met, kept with the heads they name.
        self._framed: dict[tuple[int, int, bool], tuple[ResponseHead, RequestHead, ResponseFraming]] = {}

    # -- the connection's coroutine

    def serve(self) -> asyncio.Future:
        """Hold the connection until something needs the pipeline: None, a ``Handoff`` or ``CLOSE``."""
        waiter = self._waiter = self.loop.create_future()
        waiter.add_done_callback(self._on_waiter_done)
        self.stream.on_readable = self._advance
        self._active_at = self.loop.time()
        self._watchdog = self.loop.call_later(IDLE_HANDBACK, self._watch)
        self._advance()
        return waiter

    def _stop(self, result: object) -> None:
        self.stream.on_readable = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _on_waiter_done(self, waiter: asyncio.Future) -> None:
        if waiter.cancelled():
            # The connection's task was cancelled (shutdown): as the pipeline, "DC".
            self._waiter = None
            self._stop(None)
            if self._drainer is not None:
                self._drainer.cancel()
            exchange, self.exchange = self.exchange, None
            if exchange is not None:
                exchange.record.flags.add("DC")
                self._settle(exchange, reuse=False)

    def _watch(self) -> None:
        self._watchdog = None
        if self._waiter is None:
            return
        idle = self.loop.time() - self._active_at
        if self.exchange is None and idle >= IDLE_HANDBACK:
            self._stop(None)
            return
        self._watchdog = self.loop.call_later(IDLE_HANDBACK if self.exchange is not None else IDLE_HANDBACK - idle,
                                              self._watch)

    # -- downstream: requests in

    def _advance(self) -> None:
        """Serve the next request if it is complete and plain; read more; or give the connection back."""
        if self.exchange is not None or self._waiter is None:
            return
        events = self.reader.events
        while True:
            if events:
                head = events[0]
                if not isinstance(head, RequestHead) or head.upgrade is not None \
                        or head.content_length is None or head.content_length > self.body_limit:
                    return self._stop(None)
                # A request whose body came in one piece (the common case), else _body_complete.
                complete = True if len(events) == 3 and events[2] is END and type(events[1]) is bytes \
                    else self._body_complete()
                if complete is None:
                    return self._stop(None)
                if complete:
                    return self._start(head)
            try:
                data = self.stream.read_nowait()
            except OSError:
                return self._stop(None)      # the pipeline reads the same error
            if data is None:
                return
            if not data:
                return self._stop(None)      # the client closed: the pipeline sees it as it would
            self.reader.feed(data)

    def _body_complete(self) -> bool | None:
        """The head at events[0] is followed by its whole body and END (None: something else is)."""
        events = self.reader.events
        for index in range(1, len(events)):
            event = events[index]
            if event is END:
                return True
            if type(event) is not bytes:
                return None
        return False

    def _start(self, head: RequestHead) -> None:
        server, events, proxy = self.server, self.reader.events, self.proxy
        events.popleft()
        server.begin(head)
        chunks: list[bytes] = []
        if not server.body_done:
            while (event := events.popleft()) is not END:
                chunks.append(event)   # type: ignore[arg-type]
        request = server.request_for(head)
        record = proxy.new_record(request, self.memo)
        routed = proxy.route(request, record, self.memo)
        if routed.reply is not None:
            return self._hand_off(head, request, chunks, record, routed)
        plain = routed.plain
        if plain is None:
            plain = routed.plain = _plain(routed)    # the same Routed answers requests alike
        if not plain:
            return self._hand_off(head, request, chunks, record, routed)
        cluster, endpoints, plan = routed.cluster, routed.endpoints, routed.plan
        assert cluster is not None and endpoints is not None and plan is not None   # not a local reply
        try:
            upstream_head = proxy.upstream_head(routed, request, record)
        except ValueError:
            return self._hand_off(head, request, chunks, record, routed)   # the pipeline answers 502
        if not cluster.breaker.try_acquire():
            return self._hand_off(head, request, chunks, record, routed)   # ...503 UO
        pool = cast(ClusterPool, cluster.pool)    # an HTTP/1.1 cluster's (_plain)
        endpoint = cluster.pick(endpoints, _NOTHING_TRIED, advance=False)
        conn = pool.take_idle(endpoint) if endpoint is not None else None
        if endpoint is None or conn is None or not hasattr(conn.stream, "read_nowait"):
            if conn is not None:
                pool.release(conn)
            cluster.breaker.release()
            # The pipeline picks the same endpoint (the turn did not advance) and connects.
            return self._hand_off(head, request, chunks, record, routed)
        cluster.turn += 1
        server.body_taken()
        record.attempts = 1
        record.upstream_host = endpoint.address
        record.destination = endpoint.peer_labels()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)     # the body in one piece
        record.request_bytes = len(body)
        stream = cast(CallbackStream, conn.stream)    # it has read_nowait (above)
        exchange = self.exchange = _Exchange(head, request, chunks, record, routed, plan, cluster, pool, conn, stream)
        conn.start_exchange(head_only=request.method == "HEAD")
        stream.on_readable = self._pump
        try:
            stream.write(upstream_head + body if body else upstream_head)
        except OSError as err:
            return self._upstream_failed(exchange, RESET, str(err) or type(err).__name__)
        self._pump()

    def _hand_off(self, head: RequestHead, request, chunks: list[bytes], record, routed: Routed,
                  attempt: _Attempt | None = None) -> None:
        self._stop(Handoff(head, request, self.server.buffered_body(chunks), record, routed, attempt))

    # -- upstream: the answer back

    def _pump(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.paused:
            return
        reader = exchange.conn.reader
        assert reader is not None
        events = reader.events
        server, stream = self.server, exchange.stream
        while True:
            while not events:
                try:
                    data = stream.read_nowait()
                except OSError as err:
                    return self._upstream_failed(exchange, RESET, str(err) or type(err).__name__)
                if data is None:
                    return
                try:
                    if data:
                        reader.feed(data)
                    else:
                        reader.eof()
                except UpstreamFramingError as err:
                    # Nothing at all came back: a stale keep-alive connection, not a bad answer.
                    outcome = RESET if reader.received == 0 or exchange.answered else "protocol-error"
                    return self._upstream_failed(exchange, outcome, str(err))
            event = events.popleft()
            if type(event) is bytes:
                exchange.record.response_bytes += len(event)
                try:
                    written = server.write_body(event)
                except OSError as err:
                    return self._downstream_gone(exchange, err)
                if written and self.stream.write_blocked:
                    exchange.paused = True
                    self._drainer = self.loop.create_task(self._drain(exchange))
                    return
            elif event is END:
                return self._finish(exchange)
            elif not exchange.answered:
                if not isinstance(event, ResponseHead) or event.status == 101:
                    # Not an answer this path forwards: the pipeline sends the request again
                    # on a fresh connection and handles what comes (as for a stale connection).
                    return self._upstream_failed(exchange, RESET if isinstance(event, ResponseHead) else "protocol-error",
                                                 f"unexpected {event!r} before the response head")
                exchange.answered = True
                exchange.record.status = event.status
                self._start_answer(exchange, event)
            else:
                return self._upstream_failed(exchange, RESET, f"unexpected {event!r} inside the response body")

    def _start_answer(self, exchange: _Exchange, answer: ResponseHead) -> None:
        """The answer's head to the client, as ``H1Server.start_head`` makes it; answers alike
        (same status, headers and length, to requests alike) reuse the head bytes."""
        server, plan = self.server, exchange.plan
        if plan.response_filters:
            return server.start_head(answer.status, apply_response_filters(plan, strip_hop_by_hop(answer.headers)),
                                     answer.content_length)
        head, close = exchange.head, server.closes_after_answer
        # The same answer head to the same request head (the readers' same objects) frames alike;
        # the entry holds both heads, so their ids stay theirs while it is kept.
        framed = self._framed
        identity = (id(answer), id(head), close)
        known = framed.get(identity)
        if known is not None and known[0] is answer and known[1] is head:
            return server.start_framed(known[2])
        key = (answer.status, tuple(answer.headers), answer.content_length, head.method, head.version, close)
        framing = self.framings.get(key)
        if framing is None:
            if len(self.framings) >= FRAMINGS_KEPT:
                self.framings.clear()
            framing = self.framings[key] = frame_response_head(answer.status, strip_hop_by_hop(answer.headers),
                                                               answer.content_length, head.method, head.version, close)
        if len(framed) >= FRAMINGS_KEPT:
            framed.clear()
        framed[identity] = (answer, head, framing)
        server.start_framed(framing)

    async def _drain(self, exchange: _Exchange) -> None:
        try:
            await self.stream.drain()
        except OSError as err:
            self._drainer = None
            if self.exchange is exchange:
                return self._downstream_gone(exchange, err)
            return self._closing(err)      # after the answer's end: only the connection is left
        self._drainer = None
        if self.exchange is exchange:
            exchange.paused = False
            self._pump()
        elif self.exchange is None:
            self._advance()

    def _finish(self, exchange: _Exchange) -> None:
        self.exchange = None
        exchange.stream.on_readable = None
        exchange.pool.release(exchange.conn)   # idle again if the answer was complete and keep-alive
        try:
            self.server.write_end()
        except OSError as err:
            self._settle(exchange, reuse=True)
            return self._closing(err)
        self._settle(exchange, reuse=True)
        self._active_at = self.loop.time()
        if self.server.close_after:
            return self._stop(CLOSE)
        if self.stream.write_blocked:
            self._drainer = self.loop.create_task(self._drain(exchange))
            return
        self._advance()

    def _settle(self, exchange: _Exchange, reuse: bool) -> None:
        """The exchange is over: its connection released (or closed), its breaker slot back, its record out."""
        if not reuse:
            exchange.stream.on_readable = None
            exchange.pool.discard(exchange.conn)
        exchange.cluster.breaker.release()
        self.proxy.fast_served += 1
        self.proxy.telemetry.record(exchange.record)

    def _upstream_failed(self, exchange: _Exchange, outcome: str, detail: str) -> None:
        self.exchange = None
        if not exchange.answered:
            # Before any answer went out: the pipeline takes over with this failed first try
            # (it retries a stale connection on a fresh one, or answers 502/503).
            log.debug("upstream %s failed before answering: %s", exchange.conn.endpoint.address, detail)
            exchange.stream.on_readable = None
            exchange.pool.discard(exchange.conn)
            exchange.cluster.breaker.release()
            attempt = _Attempt(outcome, endpoint=exchange.conn.endpoint)
            attempt.stale = outcome == RESET   # pooled connections only, here
            # The pipeline sends this attempt's headers again (the upstream head was encoded from
            # them), in a plan of its own: the routed one is shared by the requests alike.
            plan = exchange.plan.copy()
            plan.headers = self.proxy._upstream_headers(plan, exchange.request, exchange.record)
            return self._hand_off(exchange.head, exchange.request, exchange.chunks, exchange.record,
                                  exchange.routed.with_plan(plan), attempt)
        exchange.record.flags.add("UC")
        self._settle(exchange, reuse=False)
        self._closing(ConnectionResetError(f"{outcome}: {detail}"))

    def _downstream_gone(self, exchange: _Exchange, err: Exception) -> None:
        self.exchange = None
        self._settle(exchange, reuse=False)
        self._closing(err)

    def _closing(self, err: Exception) -> None:
        peer = self.server.peer
        log.info("response to %s:%d aborted: %s", peer.source_ip, peer.source_port, err)
        self._stop(CLOSE)

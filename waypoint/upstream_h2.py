"""HTTP/2 to upstreams that speak it (h2c, prior knowledge): gRPC and HTTP/2 Services.

Which backends get HTTP/2 follows Istio's protocol selection for a Service port
(``speaks_h2c``): ``appProtocol`` ``http2``, ``grpc`` or ``kubernetes.io/h2c``, else a port
name ``http2``/``grpc``/``h2c`` (or ``<that>-suffix``). Everything else keeps HTTP/1.1
(``upstream.py``). HTTP/2 keeps what HTTP/1.1 cannot carry: many concurrent streams on
one connection, request and response streaming at once (gRPC bidi), and trailers
(``grpc-status``).

Two layers, as everywhere in Shoal:

- ``H2ClientCore``: the protocol, sans-I/O. Requests in, bytes out (``data_to_send``);
  bytes in (``receive``), response events out. No sockets, no clocks: tested alone.
- ``H2UpstreamConnection`` and ``H2ClusterPool``: the asyncio driver. A connection runs
  over any ``Tunnel`` (an HBONE stream to the endpoint's node proxy, or TCP); the pool
  multiplexes requests on one connection per endpoint (more once the peer's stream limit
  is reached) within the Service's circuit-breaker limits. ``send_request_h2`` has the
  signature of HTTP/1.1's ``send_request``, so the proxy pipeline picks one per backend.
"""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from shoal.h2guard import CLOSED_STREAMS_PER_OPEN, BoundedH2Connection
from shoal.hbone.framing import Budget, GuardedFrameBuffer

from .http import Body, ResponseHead, Tunnel
from .model import ConnectionPoolPolicy
from .resilience import CONNECT_FAILURE, RESET
from .upstream import Connector, Endpoint, PoolOverflow, UpstreamError

log = logging.getLogger(__name__)

H2C_APP_PROTOCOLS = frozenset({"http2", "grpc", "kubernetes.io/h2c"})
H2C_PORT_NAMES = ("http2", "grpc", "h2c")
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1 << 20
MAX_STREAMS = 100                 # per connection from our side; the peer may allow fewer
MAX_RESPONSE_HEADERS = 64 * 1024
READ_CHUNK = 65536
# Headers HTTP/2 forbids (RFC 9113 8.2.2) or carries as pseudo-headers.
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                                 "host", "te"})


def speaks_h2c(app_protocol: str, port_name: str) -> bool:
    """Istio's protocol selection for a Service port: appProtocol first, else the name."""
    if app_protocol:
        return app_protocol.lower() in H2C_APP_PROTOCOLS
    name = port_name.lower()
    if name.startswith("grpc-web"):
        return False   # gRPC-Web is HTTP/1.1
    return any(name == p or name.startswith(p + "-") for p in H2C_PORT_NAMES)


# -- sans-I/O core ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResponseData:
    stream_id: int
    data: bytes
    flow_length: int             # to hand back with ``consumed`` once the bytes left


@dataclass(frozen=True)
class ResponseTrailers:
    stream_id: int
    headers: list[tuple[str, str]]


@dataclass(frozen=True)
class ResponseEnded:
    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    stream_id: int
    error_code: int
    unprocessed: bool            # REFUSED_STREAM: the server did nothing with it (safe to retry)


@dataclass(frozen=True)
class WindowOpened:
    stream_id: int               # 0: the whole connection


@dataclass(frozen=True)
class ConnectionGone:
    """GOAWAY or a protocol error: streams above ``last_stream_id`` were never processed
    (safe to retry elsewhere); after a graceful GOAWAY (no ``error``) the others finish."""
    last_stream_id: int
    error: str | None


Event = ResponseHead | ResponseData | ResponseTrailers | ResponseEnded | StreamReset | WindowOpened | ConnectionGone


def _text(headers) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


class H2ClientCore:
    """One client HTTP/2 connection as a protocol state machine (h2 underneath)."""

    def __init__(self, stream_window: int = STREAM_WINDOW, connection_window: int = CONNECTION_WINDOW,
                 max_frame: int = MAX_FRAME, max_streams: int = MAX_STREAMS) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        self._h2 = BoundedH2Connection(config, remember_closed=CLOSED_STREAMS_PER_OPEN * max_streams)
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEADERS,
        })
        self._h2.max_inbound_frame_size = max_frame
        # An upstream is a workload, not a trusted peer: the frame limits every HBONE
        # endpoint applies (header-block cap, PING/SETTINGS/empty-DATA/RST budgets) hold here too.
        self._frames = GuardedFrameBuffer(server=False, budget=Budget(), max_header_block=MAX_RESPONSE_HEADERS)
        self._h2.incoming_buffer = self._frames
        self._h2.initiate_connection()
        if connection_window > 65535:
            self._h2.increment_flow_control_window(connection_window - 65535)
        self._max_streams = max_streams
        self.open_streams: set[int] = set()   # counted against the peer's limit until released
        self.going_away = False               # a graceful GOAWAY (either way): no new streams, live ones finish
        self.gone = False                     # closed or broken: nothing more is sent or read

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    @property
    def stream_limit(self) -> int:
        return 0 if self.gone or self.going_away else min(self._h2.remote_settings.max_concurrent_streams, self._max_streams)

    def request(self, method: str, authority: str, path: str, headers: list[tuple[str, str]],
                end_stream: bool, scheme: str = "http") -> int:
        """Open a stream with this request head; the headers' names are lower-case."""
        if self.gone or self.going_away:
            raise h2.exceptions.ProtocolError("connection is going away")
        stream_id = self._h2.get_next_available_stream_id()
        block = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
        block += [(n, v) for n, v in headers if n not in CONNECTION_SPECIFIC and not n.startswith(":")]
        if any(n == "te" and v.strip().lower() == "trailers" for n, v in headers):
            block.append(("te", "trailers"))   # the one TE HTTP/2 allows; gRPC servers want it
        self._h2.send_headers(stream_id, block, end_stream=end_stream)
        self.open_streams.add(stream_id)
        return stream_id

    def send(self, stream_id: int, data: memoryview) -> int:
        """Queue as much of ``data`` as the flow-control windows allow; returns how much."""
        sent = 0
        while sent < len(data):
            window = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
            if window <= 0:
                break
            piece = data[sent:sent + window]
            self._h2.send_data(stream_id, bytes(piece))
            sent += len(piece)
        return sent

    def end(self, stream_id: int) -> None:
        self._h2.end_stream(stream_id)

    def release(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """The driver is done with a stream: reset it if either side is still open."""
        self.open_streams.discard(stream_id)
        if self.gone:
            return
        try:
            stream = self._h2.streams.get(stream_id)
            if stream is not None and not stream.closed:
                self._h2.reset_stream(stream_id, error_code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass   # closed meanwhile: nothing to reset

    def consumed(self, stream_id: int, length: int) -> None:
        """``length`` received bytes left the process: credit them back to the peer."""
        if not length or self.gone:
            return
        try:
            self._h2.acknowledge_received_data(length, stream_id)
        except h2.exceptions.StreamClosedError:
            self._h2.increment_flow_control_window(length)   # the connection still needs it
        except h2.exceptions.ProtocolError:
            pass

    def close(self) -> None:
        if not self.gone:
            self.gone = self.going_away = True
            self._h2.close_connection()

    def receive(self, data: bytes) -> list[Event]:
        if self.gone and self._h2.state_machine.state == h2.connection.ConnectionState.CLOSED:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            if self._h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
                self._h2.close_connection(err.error_code)
            self.gone = self.going_away = True
            return [ConnectionGone(0, f"upstream HTTP/2 protocol error: {err}")]   # Abuse included
        events: list[Event] = []
        for ev in h2_events:
            if isinstance(ev, h2.events.ResponseReceived):
                headers = _text(ev.headers)
                status = next((v for n, v in headers if n == ":status"), "0")
                events.append(ResponseHead(int(status) if status.isdigit() else 0,
                                           [(n, v) for n, v in headers if not n.startswith(":")],
                                           stream_id=ev.stream_id, ended=ev.stream_ended is not None))
            elif isinstance(ev, h2.events.DataReceived):
                events.append(ResponseData(ev.stream_id, ev.data, ev.flow_controlled_length))
            elif isinstance(ev, h2.events.TrailersReceived):
                events.append(ResponseTrailers(ev.stream_id, _text(ev.headers)))
            elif isinstance(ev, h2.events.StreamEnded):
                events.append(ResponseEnded(ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                events.append(StreamReset(ev.stream_id, int(ev.error_code),
                                          ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM))
            elif isinstance(ev, h2.events.WindowUpdated):
                events.append(WindowOpened(ev.stream_id))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                events.append(WindowOpened(0))   # the initial window or the stream limit may have grown
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.gone = self.going_away = True
                error = None if ev.error_code == 0 else f"GOAWAY {ev.error_code!r}"
                events.append(ConnectionGone(ev.last_stream_id or 0, error))
        # A graceful GOAWAY is kept from h2 by the shared frame buffer (h2 would close at
        # once): streams up to its last-stream-id run to their end, no new ones start here.
        if self._frames.graceful_goaway is not None and not self.going_away:
            self.going_away = True
            events.append(ConnectionGone(self._frames.graceful_goaway, None))
        return events


# -- asyncio driver -----------------------------------------------------------------------------

class H2Exchange:
    """One request/response on a pooled HTTP/2 connection: what the proxy's attempt holds
    (``reused`` says the connection served before, so a reset before any answer may just
    mean a stale connection and is worth one fresh try)."""

    def __init__(self, connection: "H2UpstreamConnection", reused: bool) -> None:
        self.connection = connection
        self.endpoint = connection.endpoint
        self.reused = reused
        self.stream_id = 0
        self.head: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self.chunks: asyncio.Queue[tuple[bytes, int] | Exception | None] = asyncio.Queue()
        self.trailers: list[tuple[str, str]] = []
        self.window_open = asyncio.Event()
        self.pump: asyncio.Task | None = None
        self.finished = False     # released: response complete, abandoned or failed

    def pump_done(self, pump: asyncio.Task) -> None:
        """A request body that breaks after the answer began fails the answer too."""
        if not pump.cancelled() and pump.exception() is not None and not self.finished:
            self.fail(pump.exception())

    def fail(self, error: Exception) -> None:
        if not self.head.done():
            self.head.set_exception(error)
        else:
            self.chunks.put_nowait(error)
        self.window_open.set()

    def finish(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        if self.finished:
            return
        self.finished = True
        self.window_open.set()
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        if self.head.done() and not self.head.cancelled():
            self.head.exception()   # retrieved: a failure nobody awaited is not an error here
        self.connection.release(self, error_code)

    async def send_body(self, body: Body | bytes) -> None:
        """The request body, within the stream's send window (the backpressure), then END_STREAM."""
        conn = self.connection
        try:
            if isinstance(body, bytes):
                await self._write(body)
            else:
                async for chunk in body:
                    await self._write(chunk)
            if not self.finished:
                conn.core.end(self.stream_id)
                conn.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as err:
            if not self.finished:
                self.fail(UpstreamError(RESET, f"request body: {err}"))

    async def _write(self, chunk: bytes) -> None:
        conn = self.connection
        view = memoryview(chunk)
        while view and not self.finished:
            sent = conn.core.send(self.stream_id, view)
            if sent == 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            view = view[sent:]
            conn.flush()
        await conn.tunnel.drain()


class H2UpstreamConnection:
    """An ``H2ClientCore`` over one tunnel: a reader task dispatches events to exchanges."""

    def __init__(self, endpoint: Endpoint, tunnel: Tunnel, on_closed, on_room) -> None:
        self.endpoint = endpoint
        self.tunnel = tunnel
        self.core = H2ClientCore()
        self.exchanges: dict[int, H2Exchange] = {}
        self.reserved = 0          # exchanges handed out that have not opened their stream yet
        self.served = 0
        self.closed = False
        self._on_closed = on_closed
        self._on_room = on_room
        self.flush()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def has_room(self) -> bool:
        return not self.closed and len(self.core.open_streams) + self.reserved < self.core.stream_limit

    def reserve(self) -> H2Exchange:
        self.reserved += 1
        exchange = H2Exchange(self, reused=self.served > 0)
        self.served += 1
        return exchange

    def open(self, exchange: H2Exchange, method: str, authority: str, path: str,
             headers: list[tuple[str, str]], end_stream: bool) -> None:
        if self.closed or self.core.going_away:
            raise UpstreamError(RESET, f"HTTP/2 connection to {self.endpoint.address} is closing")
        stream_id = self.core.request(method, authority, path, headers, end_stream)
        self.reserved -= 1
        exchange.stream_id = stream_id
        self.exchanges[stream_id] = exchange
        self.flush()

    def release(self, exchange: H2Exchange, error_code: int) -> None:
        if exchange.stream_id == 0:
            self.reserved -= 1     # never opened
        else:
            self.exchanges.pop(exchange.stream_id, None)
            self.core.release(exchange.stream_id, error_code)
            self.flush()
        if self.core.going_away and not self.exchanges:
            self.close()
        self._on_room(self)

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and not self.closed:
            try:
                self.tunnel.write(data)
            except (ConnectionError, OSError) as err:
                self._lost(f"write failed: {err}")

    async def _read(self) -> None:
        reason = "upstream closed the connection"
        try:
            while not self.closed:
                data = await self.tunnel.read(READ_CHUNK)
                if not data:
                    break
                for event in self.core.receive(data):
                    self._dispatch(event)
                self.flush()
        except (ConnectionError, OSError) as err:
            reason = f"upstream connection lost: {err}"
        self._lost(reason)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, ConnectionGone):
            if event.error:
                log.info("HTTP/2 upstream %s: %s", self.endpoint.address, event.error)
            for stream_id, exchange in list(self.exchanges.items()):
                if stream_id > event.last_stream_id or event.error:
                    exchange.fail(UpstreamError(RESET, event.error or "upstream GOAWAY before this stream"))
            if not self.exchanges:
                self.close()
            self._on_room(self)
            return
        if isinstance(event, WindowOpened):
            targets = self.exchanges.values() if event.stream_id == 0 else \
                [e for e in (self.exchanges.get(event.stream_id),) if e is not None]
            for exchange in targets:
                exchange.window_open.set()
            if event.stream_id == 0:
                self._on_room(self)   # the peer's stream limit may have changed
            return
        exchange = self.exchanges.get(event.stream_id)
        if exchange is None:
            if isinstance(event, ResponseData):
                self.core.consumed(event.stream_id, event.flow_length)
            return
        if isinstance(event, ResponseHead):
            if not exchange.head.done():
                exchange.head.set_result(event)
        elif isinstance(event, ResponseData):
            exchange.chunks.put_nowait((event.data, event.flow_length))
        elif isinstance(event, ResponseTrailers):
            exchange.trailers = event.headers
        elif isinstance(event, ResponseEnded):
            exchange.chunks.put_nowait(None)
        elif isinstance(event, StreamReset):
            exchange.fail(UpstreamError(RESET, f"upstream reset the stream (code {event.error_code})"))

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.core.gone = self.core.going_away = True
        for exchange in list(self.exchanges.values()):
            exchange.fail(UpstreamError(RESET, reason))
        self.tunnel.close()
        self._on_closed(self)

    def close(self) -> None:
        """GOAWAY, then close (the pool retiring it, or a GOAWAY'd connection gone idle)."""
        if self.closed:
            return
        self.core.close()
        self.flush()
        self._lost("connection closed")
        if not self._reader.done() and self._reader is not asyncio.current_task():
            self._reader.cancel()


@dataclass
class H2Response:
    """The answer's head; the body streams after it, ``trailers`` are known once it ends."""

    status: int
    headers: list[tuple[str, str]]
    content_length: int | None
    body: "_H2ResponseBody"
    connection: H2Exchange
    upgraded: bool = False
    leftover: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)


class _H2ResponseBody:
    """Response DATA, credited back to the upstream once the next chunk is asked for
    (that is, once the previous one was written downstream): the flow-control
    backpressure from a slow client to the upstream."""

    def __init__(self, exchange: H2Exchange, response: H2Response) -> None:
        self._exchange = exchange
        self._response = response
        self._unacked = 0

    def __aiter__(self) -> "_H2ResponseBody":
        return self

    async def __anext__(self) -> bytes:
        exchange = self._exchange
        conn = exchange.connection
        if self._unacked:
            conn.core.consumed(exchange.stream_id, self._unacked)
            conn.flush()
            self._unacked = 0
        if exchange.finished:
            raise StopAsyncIteration
        item = await exchange.chunks.get()
        if item is None:
            self._response.trailers = exchange.trailers
            exchange.finish(h2.errors.ErrorCodes.NO_ERROR)
            raise StopAsyncIteration
        if isinstance(item, Exception):
            exchange.finish()
            raise item
        data, self._unacked = item
        return data

    def abandon(self) -> None:
        self._exchange.finish()


async def send_request_h2(pool: "H2ClusterPool", exchange: H2Exchange, method: str, target: str,
                          headers: list[tuple[str, str]], body: Body | bytes, chunked: bool) -> H2Response:
    """One HTTP/2 exchange up to the response head; the request body keeps streaming
    meanwhile (a gRPC server may answer before the client is done), the response body
    after it. Raises UpstreamError(RESET) when the stream dies before a head."""
    del chunked   # HTTP/2 frames bodies itself
    authority = next((v for n, v in headers if n == "host"), exchange.endpoint.address)
    if any(n == "content-type" and v.startswith("application/grpc") for n, v in headers):
        headers = headers + [("te", "trailers")]
    empty = isinstance(body, bytes) and not body
    try:
        exchange.connection.open(exchange, method, authority, target, headers, end_stream=empty)
    except (h2.exceptions.ProtocolError, ValueError) as err:
        raise UpstreamError(RESET, f"HTTP/2 request refused locally: {err}") from None
    if not empty:
        pump = exchange.pump = asyncio.get_running_loop().create_task(exchange.send_body(body))
        pump.add_done_callback(exchange.pump_done)
        await asyncio.wait({pump, exchange.head}, return_when=asyncio.FIRST_COMPLETED)
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()   # the downstream body broke (too large, stalled, client gone)
    head = await exchange.head
    length = 0 if head.ended else None
    if length is None:
        for name, value in head.headers:
            if name == "content-length" and value.isdigit():
                length = int(value)
    response = H2Response(head.status, head.headers, length, None, exchange)  # type: ignore[arg-type]
    response.body = _H2ResponseBody(exchange, response)
    return response


class H2ClusterPool:
    """HTTP/2 connections to the endpoints of one backend Service: requests share a
    connection per endpoint up to the peer's stream limit, then another opens, within
    ``maxConnections``; past that, up to ``maxPendingRequests`` wait (else 503 UO)."""

    def __init__(self, connector: Connector, policy: ConnectionPoolPolicy) -> None:
        self.connector = connector
        self.policy = policy
        self.open_connections = 0
        self.pending = 0
        self._conns: dict[Endpoint, list[H2UpstreamConnection]] = defaultdict(list)
        self._dialing: dict[Endpoint, asyncio.Future] = {}
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, endpoint: Endpoint, fresh: bool = False) -> H2Exchange:
        while True:
            if not fresh:
                for conn in self._conns.get(endpoint, ()):
                    if conn.has_room:
                        return conn.reserve()
                dialing = self._dialing.get(endpoint)
                if dialing is not None:
                    await asyncio.shield(dialing)
                    continue
            if self.open_connections < self.policy.max_connections:
                return (await self._dial(endpoint)).reserve()
            if self.pending >= self.policy.max_pending_requests:
                raise PoolOverflow(f"{self.open_connections} HTTP/2 connections full, {self.pending} requests pending")
            self.pending += 1
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self.pending -= 1
                self._waiters.remove(waiter)
            fresh = False

    async def _dial(self, endpoint: Endpoint) -> H2UpstreamConnection:
        self.open_connections += 1
        done = asyncio.get_running_loop().create_future()
        self._dialing.setdefault(endpoint, done)
        try:
            tunnel = await self.connector.open(endpoint)
        except (OSError, asyncio.TimeoutError) as err:
            self.open_connections -= 1
            raise UpstreamError(CONNECT_FAILURE, f"{endpoint.address}: {err or type(err).__name__}") from None
        except BaseException:
            self.open_connections -= 1
            raise
        finally:
            if self._dialing.get(endpoint) is done:
                del self._dialing[endpoint]
            done.set_result(None)
        conn = H2UpstreamConnection(endpoint, tunnel, self._closed, self._room)
        self._conns[endpoint].append(conn)
        return conn

    def _closed(self, conn: H2UpstreamConnection) -> None:
        conns = self._conns.get(conn.endpoint)
        if conns is not None and conn in conns:
            conns.remove(conn)
            self.open_connections -= 1
            if not conns:
                del self._conns[conn.endpoint]
        self._room(conn)

    def _room(self, _conn: H2UpstreamConnection) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def discard(self, exchange: H2Exchange) -> None:
        """The attempt failed or was abandoned: its stream is reset, the connection stays
        (unless it broke, which its reader notices by itself)."""
        exchange.finish()

    def close(self) -> None:
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
        self._conns.clear()

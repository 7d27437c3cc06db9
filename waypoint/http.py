"""Types shared by the downstream servers, the proxy pipeline and the upstream client.

A request travels as a ``ProxyRequest`` (head) plus an async iterator of body chunks;
the answer goes back through a ``ResponseSink``. HTTP/1.1 and HTTP/2 downstream
connections both speak these, so the pipeline never knows which one it serves.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

# Hop-by-hop headers (RFC 9110 7.6.1): never forwarded as they are.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                        "upgrade", "trailer", "proxy-authenticate", "proxy-authorization"})


@dataclass(frozen=True)
class Limits:
    """Documented bounds on what one client may send (see waypoint/README.md).

    Past a bound the waypoint answers 400 / 408 / 431 and closes that connection
    (HTTP/1.1) or resets that stream (HTTP/2); other clients are not affected.
    """

    max_header_bytes: int = 64 * 1024      # request line + headers -> 431
    max_headers: int = 100                 # header count -> 431
    header_timeout: float = 10.0           # whole request head must arrive within -> 408 (slowloris)
    body_idle_timeout: float = 30.0        # longest silence inside a request body -> 408
    keepalive_timeout: float = 60.0        # idle keep-alive connection closed silently
    max_concurrent_streams: int = 100      # HTTP/2 per connection
    retry_buffer_bytes: int = 64 * 1024    # bodies up to this size (known length) are read whole: replayable
    max_h2_frame: int = 1 << 20
    max_grpc_message: int = 4 * 1024 * 1024   # one gRPC request message -> RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class PeerInfo:
    """Who is on the other end of a downstream connection."""

    source_ip: str
    source_port: int
    source_principal: str = ""            # SPIFFE id from the HBONE peer certificate
    destination_ip: str = ""              # the original destination (service VIP) from HBONE
    destination_port: int = 0
    mtls: bool = False


@dataclass(slots=True, init=False)
class ProxyRequest:
    """A request's head as the pipeline reads it; never changed once made (an HTTP/1.1
    connection hands the same object out again for the same head, ``H1Server.request_for``).

    ``__init__`` is written out, the one the dataclass would make: mypyc compiles it, while
    a generated one stays Python (the pipeline makes one per request)."""

    method: str
    target: str                          # path + query, as received
    authority: str
    headers: list[tuple[str, str]]       # lower-case names, hop-by-hop removed
    protocol: str                        # "HTTP/1.1" | "HTTP/2"
    peer: PeerInfo
    content_length: int | None = None    # None: unknown (chunked / h2 without content-length)
    upgrade: str | None = None           # e.g. "websocket" on an HTTP/1.1 Upgrade request
    scheme: str = "http"
    header_map: dict[str, str] = field(default_factory=dict)
    path: str = field(init=False, default="")   # the target without its query (read by each request's record)

    def __init__(self, method: str, target: str, authority: str, headers: list[tuple[str, str]], protocol: str,
                 peer: PeerInfo, content_length: int | None = None, upgrade: str | None = None,
                 scheme: str = "http", header_map: dict[str, str] | None = None) -> None:
        self.method = method
        self.target = target
        self.authority = authority
        self.headers = headers
        self.protocol = protocol
        self.peer = peer
        self.content_length = content_length
        self.upgrade = upgrade
        self.scheme = scheme
        self.path = target.partition("?")[0]
        self.header_map = joined = {} if header_map is None else header_map
        if not joined:
            for name, value in headers:
                # Repeated headers match as one comma-joined value, as Envoy does.
                joined[name] = f"{joined[name]},{value}" if name in joined else value


@dataclass(slots=True)
class ResponseHead:
    """An upstream's response head, whichever protocol carried it (``h1`` or ``upstream_h2``);
    never changed once made (``h1.ResponseReader`` hands the same object out again for the
    same head on its connection)."""

    status: int
    headers: list[tuple[str, str]]      # lower-case names, in order (no pseudo-headers)
    content_length: int | None = None   # None: chunked, until the connection closes, or not announced
    keep_alive: bool = False            # HTTP/1.1: the connection can carry another exchange afterwards
    stream_id: int = 0                  # HTTP/2: the stream it answers
    ended: bool = False                 # HTTP/2: a trailers-only or empty answer, nothing follows


class ResponseSink(Protocol):
    """Where the pipeline writes its answer; the downstream connection implements it."""

    started: bool

    async def start(self, status: int, headers: list[tuple[str, str]], content_length: int | None) -> None: ...

    async def send(self, chunk: bytes) -> None: ...

    async def end(self) -> None: ...


class Tunnel(Protocol):
    """A raw byte stream left after a successful Upgrade (101)."""

    async def read(self, n: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class CallbackStream(Tunnel, Protocol):
    """A ``Tunnel`` that can also be read from I/O callbacks (``TcpStream``, the HBONE stream):
    ``on_readable`` is called whenever ``read_nowait`` may have something new (the fast path)."""

    on_readable: Callable[[], None] | None

    def read_nowait(self) -> bytes | None: ...

    @property
    def write_blocked(self) -> bool: ...


class BodyError(Exception):
    """The downstream request body broke (client vanished, lied about its length, stalled)."""

    def __init__(self, status: int, reason: str, grpc_status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.grpc_status = grpc_status   # for gRPC requests: the code the client sees


Body = AsyncIterator[bytes]


class EmptyBody:
    """A body without a chunk (a class: mypyc compiles no async generator)."""

    def __aiter__(self) -> "EmptyBody":
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


def empty_body() -> Body:
    return EmptyBody()


def strip_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers, including those named by ``Connection``."""
    named: set[str] = set()
    for name, value in headers:
        if name == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


async def pipe(src: Tunnel, dst: Tunnel, chunk: int = 65536) -> None:
    """Copy bytes until EOF (used for upgraded connections)."""
    while True:
        data = await src.read(chunk)
        if not data:
            break
        dst.write(data)
        await dst.drain()


class StreamPair:
    """An asyncio (reader, writer) pair as one ``Tunnel``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, n: int) -> bytes:
        return await self.reader.read(n)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()


class TcpStream(asyncio.Protocol):
    """A TCP connection as a ``Tunnel``, straight on the transport (no StreamReader/Writer).

    Received chunks are handed out as they came (no copying into one buffer); past
    ``high_water`` unread bytes the socket stops being read, which is the backpressure
    towards a fast sender. Half-close is kept: EOF from the peer ends ``read`` but the
    answer can still be written.

    Callback use (the waypoint's fast path, ``waypoint.fastpath``): ``on_readable`` is
    called whenever ``read_nowait`` may have something new (bytes, EOF, an error), so a
    reader needs no task or future; the same buffer and backpressure serve both uses.

    ``on_connected`` is called once the connection is made (a listener starts serving it
    there: a callback, not a subclass, since this class is compiled and a subclass in
    interpreted code would slow its every call).
    """

    def __init__(self, high_water: int = 256 * 1024, on_connected: Callable[["TcpStream"], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_connected = on_connected
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._high_water = high_water
        self._reading_paused = False
        self._eof = False
        self._lost = False
        self._error: Exception | None = None
        self._read_waiter: asyncio.Future | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self.on_readable: Callable[[], None] | None = None

    # -- asyncio.Protocol
    # asyncio hands a stream protocol its stream transport (typed BaseTransport there; uvloop's
    # is no asyncio.Transport subclass, so this cannot be an isinstance check).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        if self.on_connected is not None:
            self.on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._high_water and not self._reading_paused:
            transport = self.transport
            assert transport is not None   # bytes come after connection_made
            self._reading_paused = True
            transport.pause_reading()
        # _wake_reader, written out: once per read (a call fewer on every request's two reads).
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        on_readable = self.on_readable
        if on_readable is not None:
            on_readable()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True  # keep our direction open: the answer may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._error = exc
        self._wake_reader()
        self._write_paused = False
        self._wake_drainer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainer()

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_readable is not None:
            self.on_readable()

    def _wake_drainer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- Tunnel
    async def read(self, n: int) -> bytes:
        while (data := self.read_nowait()) is None:
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
        return data

    def read_nowait(self) -> bytes | None:
        """The next received chunk, b"" at EOF, None when nothing came yet (raises if reset)."""
        if not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise ConnectionResetError(str(self._error))
                return b""
            return None
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._reading_paused and self._buffered <= self._high_water // 2 and not self._lost:
            transport = self.transport
            assert transport is not None   # reading was paused by data_received
            self._reading_paused = False
            transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        transport = self.transport
        assert transport is not None, "write before the connection was made"
        transport.write(data)

    @property
    def write_blocked(self) -> bool:
        """The transport's buffer is past its high-water mark: ``drain`` would wait."""
        return self._write_paused and not self._lost

    async def drain(self) -> None:
        while self._write_paused and not self._lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._lost and self._error is not None:
            raise ConnectionResetError(str(self._error))

    def write_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

"""Upstream side: pooled HTTP/1.1 connections to endpoints, over a pluggable transport.

The transport (``Connector``) opens a byte stream to one endpoint: HBONE (an HTTP/2
CONNECT stream over mTLS to the endpoint's node proxy, the normal case in the mesh)
or plain TCP (endpoints outside the mesh, tests, benchmarks). On top of it the
waypoint speaks HTTP/1.1 (``h1``: llhttp framing, sans I/O) and keeps idle connections per endpoint, within the
per-Service circuit-breaker limits (max connections, max pending).
"""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from mypy_extensions import mypyc_attr

from shoal.telemetry_labels import UNKNOWN, PeerLabels, principal

from .h1 import (
    END,
    LAST_CHUNK,
    ResponseReader,
    Upgraded,
    UpstreamFramingError,
    encode_chunk,
    encode_request_head,
)
from .http import Body, ResponseHead, TcpStream, Tunnel
from .model import ConnectionPoolPolicy
from .resilience import CONNECT_FAILURE, RESET

log = logging.getLogger(__name__)

READ_CHUNK = 65536


@mypyc_attr(native_class=False)   # compiled: keeps its __dict__, where it caches its address, hash and labels
@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    uid: str = ""
    name: str = ""
    namespace: str = ""
    spiffe_id: str = ""
    protocol: str = "TCP"   # "HBONE" | "TCP"
    app: str = ""           # canonical service, for telemetry labels
    labels: PeerLabels | None = None   # Istio's labels of the workload (shoal.telemetry_labels)

    @property
    def address(self) -> str:
        address = self.__dict__.get("_address")     # built once (each request's record asks)
        if address is None:
            address = f"{self.ip}:{self.port}"
            object.__setattr__(self, "_address", address)
        return address

    def __hash__(self) -> int:
        # A pool key on every request: hashed once (the generated hash reads nine fields each time).
        value = self.__dict__.get("_hash")
        if value is None:
            value = hash((self.ip, self.port, self.uid, self.name, self.namespace, self.spiffe_id, self.protocol,
                          self.app, self.labels))
            object.__setattr__(self, "_hash", value)
        return value

    def peer_labels(self) -> PeerLabels:
        if self.labels is not None:
            return self.labels
        labels = self.__dict__.get("_derived_labels")   # built once (each answer's telemetry asks)
        if labels is None:
            labels = PeerLabels(workload=self.name or UNKNOWN, namespace=self.namespace or UNKNOWN,
                                principal=principal(self.spiffe_id), app=self.app or UNKNOWN,
                                canonical_service=self.app or UNKNOWN)
            object.__setattr__(self, "_derived_labels", labels)
        return labels


class Connector(Protocol):
    async def open(self, endpoint: Endpoint) -> Tunnel: ...


class UpstreamError(Exception):
    """One attempt failed before a response head arrived; ``outcome`` feeds retry_on."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.detail = detail


class PoolOverflow(Exception):
    """Circuit breaker: too many connections and too many requests waiting for one."""


class TcpConnector:
    """Plain TCP: for endpoints that are not in the mesh, tests and benchmarks."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout

    async def open(self, endpoint: Endpoint) -> Tunnel:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, stream = await loop.create_connection(TcpStream, endpoint.ip, endpoint.port)
        return stream


class UpstreamConnection:
    def __init__(self, endpoint: Endpoint, stream: Tunnel) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.reader: ResponseReader | None = None   # the current exchange's answer
        self.reused = False

    def start_exchange(self, head_only: bool) -> ResponseReader:
        """A reader for the answer to the request about to be sent."""
        reader = self.reader = self.reader.next_answer(head_only) if self.reader is not None else ResponseReader(head_only)
        return reader

    @property
    def reusable(self) -> bool:
        """The last answer is complete and the connection may carry another exchange."""
        return self.reader is not None and self.reader.reusable

    async def next_event(self):
        """The next event of the current answer, reading as needed (OSError -> RESET)."""
        reader = self.reader
        assert reader is not None
        events = reader.events
        while not events:
            if reader.done:
                raise UpstreamFramingError("read past the end of the answer")
            try:
                data = await self.stream.read(READ_CHUNK)
            except OSError as err:
                raise UpstreamError(RESET, str(err) or type(err).__name__) from None
            if data:
                reader.feed(data)
            else:
                reader.eof()
        return events.popleft()

    def close(self) -> None:
        self.stream.close()


@dataclass(init=False)
class UpstreamResponse:
    """One per request through the pipeline: ``__init__`` written out, the dataclass's own,
    so that mypyc compiles it."""

    status: int
    headers: list[tuple[str, str]]
    content_length: int | None
    body: "_ResponseBody | _NoBody"
    connection: UpstreamConnection
    upgraded: bool = False   # 101: ``connection.stream`` is now a raw tunnel (plus ``leftover`` bytes)
    leftover: bytes = b""

    def __init__(self, status: int, headers: list[tuple[str, str]], content_length: int | None,
                 body: "_ResponseBody | _NoBody", connection: UpstreamConnection, upgraded: bool = False,
                 leftover: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.body = body
        self.connection = connection
        self.upgraded = upgraded
        self.leftover = leftover


class ClusterPool:
    """Connections to the endpoints of one backend Service, with its circuit-breaker limits."""

    def __init__(self, connector: Connector, policy: ConnectionPoolPolicy) -> None:
        self.connector = connector
        self.policy = policy
        self.open_connections = 0
        self.pending = 0
        self._idle: dict[Endpoint, list[UpstreamConnection]] = defaultdict(list)
        self._released = asyncio.Condition()

    async def acquire(self, endpoint: Endpoint, fresh: bool = False) -> UpstreamConnection:
        while True:
            conn = None if fresh else self.take_idle(endpoint)
            if conn is not None:
                return conn
            if self.open_connections < self.policy.max_connections:
                self.open_connections += 1
                try:
                    stream = await self.connector.open(endpoint)
                except (OSError, asyncio.TimeoutError) as err:
                    self.open_connections -= 1
                    raise UpstreamError(CONNECT_FAILURE, f"{endpoint.address}: {err or type(err).__name__}") from None
                except UpstreamError:
                    self.open_connections -= 1
                    raise
                return UpstreamConnection(endpoint, stream)
            if self._close_one_idle():
                continue
            if self.pending >= self.policy.max_pending_requests:
                raise PoolOverflow(f"{self.open_connections} connections open, {self.pending} requests pending")
            self.pending += 1
            try:
                async with self._released:
                    await self._released.wait()
            finally:
                self.pending -= 1

    def take_idle(self, endpoint: Endpoint) -> UpstreamConnection | None:
        """An idle keep-alive connection to ``endpoint``, without waiting (the fast path's acquire)."""
        idle = self._idle.get(endpoint)
        if not idle:
            return None
        conn = idle.pop()
        conn.reused = True
        return conn

    def _close_one_idle(self) -> bool:
        """At the connection limit, an idle connection to another endpoint makes room."""
        for conns in self._idle.values():
            if conns:
                self.discard(conns.pop(0))
                return True
        return False

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the idle list if the exchange finished cleanly, else closed."""
        if conn.reusable:
            self._idle[conn.endpoint].append(conn)
            self._wake()
        else:
            self.discard(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        conn.close()
        self.open_connections -= 1
        self._wake()

    def _wake(self) -> None:
        if self.pending:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._released:
            self._released.notify()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


async def send_request(pool: ClusterPool, conn: UpstreamConnection, method: str, target: str,
                       headers: list[tuple[str, str]], body: Body | bytes, chunked: bool) -> UpstreamResponse:
    """One HTTP/1.1 exchange up to the response head; the body streams afterwards.

    Raises UpstreamError(RESET) when the connection dies before a response head, and
    UpstreamError("protocol-error") when what came back is not HTTP/1.1.
    """
    stream = conn.stream
    reader = conn.start_exchange(head_only=method == "HEAD")
    if chunked:
        headers = headers + [("transfer-encoding", "chunked")]
    try:
        head = encode_request_head(method, target, headers)
    except ValueError as err:
        # Nothing was sent: the request itself cannot be written as HTTP/1.1 (a filter's doing).
        raise UpstreamError("protocol-error", str(err)) from None
    try:
        if isinstance(body, bytes):
            # A buffered body goes out with the head in one write (one syscall, one TLS record).
            if chunked:
                body = encode_chunk(body) + LAST_CHUNK
            stream.write(head + body if body else head)
        else:
            stream.write(head)
            async for chunk in body:
                if chunk:
                    stream.write(encode_chunk(chunk) if chunked else chunk)
                    await stream.drain()
            if chunked:
                stream.write(LAST_CHUNK)
        await stream.drain()
        event = await conn.next_event()
    except OSError as err:
        raise UpstreamError(RESET, str(err) or type(err).__name__) from None
    except UpstreamFramingError as err:
        # Nothing at all came back: the peer hung up (a stale keep-alive connection), not a bad answer.
        raise UpstreamError(RESET if reader.received == 0 else "protocol-error", str(err)) from None
    if not isinstance(event, ResponseHead):
        raise UpstreamError("protocol-error", f"unexpected {event!r} before the response head")
    if event.status == 101:
        leftover = next((e.leftover for e in reader.events if isinstance(e, Upgraded)), b"")
        return UpstreamResponse(101, event.headers, None, _NoBody(), conn, True, leftover)
    return UpstreamResponse(event.status, event.headers, event.content_length, _ResponseBody(pool, conn), conn)


class _NoBody:
    """The body of a 101 answer: nothing (the connection became a tunnel)."""

    def __aiter__(self) -> "_NoBody":
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration

    def abandon(self) -> None:
        pass


class _ResponseBody:
    """Streams one response body; the connection returns to the pool only when complete.

    ``abandon()`` (a retried 5xx, a client gone) closes the connection instead: its
    unread bytes would poison the next exchange.
    """

    def __init__(self, pool: ClusterPool, conn: UpstreamConnection) -> None:
        self._pool = pool
        self._conn = conn
        self._settled = False

    def __aiter__(self) -> "_ResponseBody":
        return self

    async def __anext__(self) -> bytes:
        if self._settled:
            raise StopAsyncIteration
        try:
            event = await self._conn.next_event()
        except UpstreamFramingError as err:
            self.abandon()
            raise UpstreamError(RESET, f"response body: {err}") from None
        except UpstreamError:
            self.abandon()
            raise
        if isinstance(event, bytes):
            return event
        if event is END:
            self._settled = True
            self._pool.release(self._conn)
            raise StopAsyncIteration
        self.abandon()
        raise UpstreamError(RESET, f"unexpected {event!r} inside the response body")

    def abandon(self) -> None:
        if not self._settled:
            self._settled = True
            self._pool.discard(self._conn)

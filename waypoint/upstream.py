"""Upstream side: pooled HTTP/1.1 connections to endpoints, over a pluggable transport.

The transport (``Connector``) opens a byte stream to one endpoint: HBONE (an HTTP/2
CONNECT stream over mTLS to the endpoint's node proxy, the normal case in the mesh)
or plain TCP (endpoints outside the mesh, tests, benchmarks). On top of it the
waypoint speaks HTTP/1.1 with h11 and keeps idle connections per endpoint, within the
per-Service circuit-breaker limits (max connections, max pending).
"""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import h11

from shoal.telemetry_labels import UNKNOWN, PeerLabels, principal

from .http import Body, TcpStream, Tunnel
from .model import ConnectionPoolPolicy
from .resilience import CONNECT_FAILURE, RESET

log = logging.getLogger(__name__)

READ_CHUNK = 65536


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
        return f"{self.ip}:{self.port}"

    def peer_labels(self) -> PeerLabels:
        return self.labels or PeerLabels(workload=self.name or UNKNOWN, namespace=self.namespace or UNKNOWN,
                                         principal=principal(self.spiffe_id), app=self.app or UNKNOWN,
                                         canonical_service=self.app or UNKNOWN)


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
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False
        self.received = 0  # bytes read on this connection, all exchanges

    async def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.read(READ_CHUNK)
                except OSError as err:
                    raise UpstreamError(RESET, str(err)) from None
                self.received += len(data)
                self.h11.receive_data(data)
                continue
            return event

    def close(self) -> None:
        self.stream.close()


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    content_length: int | None
    body: "_ResponseBody | _NoBody"
    connection: UpstreamConnection
    upgraded: bool = False   # 101: ``connection.stream`` is now a raw tunnel (plus ``leftover`` bytes)
    leftover: bytes = b""


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
            idle = self._idle.get(endpoint)
            if idle and not fresh:
                conn = idle.pop()
                conn.reused = True
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

    def _close_one_idle(self) -> bool:
        """At the connection limit, an idle connection to another endpoint makes room."""
        for conns in self._idle.values():
            if conns:
                self.discard(conns.pop(0))
                return True
        return False

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the idle list if the exchange finished cleanly, else closed."""
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
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

    Raises UpstreamError(RESET) when the connection dies before a response head.
    """
    h = conn.h11
    stream = conn.stream
    received_before = conn.received
    if chunked:
        headers = headers + [("transfer-encoding", "chunked")]
    try:
        head = h.send(h11.Request(method=method, target=target, headers=headers))
        if isinstance(body, bytes):
            # A buffered body goes out with the head in one write (one syscall, one TLS record).
            stream.write(head + (h.send(h11.Data(data=body)) if body else b"") + h.send(h11.EndOfMessage()))
        else:
            stream.write(head)
            async for chunk in body:
                stream.write(h.send(h11.Data(data=chunk)))
                await stream.drain()
            stream.write(h.send(h11.EndOfMessage()))
        await stream.drain()
        while True:
            event = await conn._next_event()
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    leftover, _ = h.trailing_data
                    return UpstreamResponse(101, _decode(event.headers), None, _NoBody(), conn, True, leftover)
                continue  # 100 Continue and friends
            if isinstance(event, h11.Response):
                break
            raise UpstreamError(RESET, f"connection closed before the response ({type(event).__name__})")
    except (OSError, h11.LocalProtocolError) as err:
        raise UpstreamError(RESET, str(err) or type(err).__name__) from None
    except h11.RemoteProtocolError as err:
        # Nothing at all came back: the peer hung up (a stale keep-alive connection), not a bad answer.
        outcome = RESET if conn.received == received_before else "protocol-error"
        raise UpstreamError(outcome, str(err)) from None
    response_headers = _decode(event.headers)
    length = None
    for name, value in response_headers:
        if name == "content-length":
            length = int(value)
    return UpstreamResponse(event.status_code, response_headers, length, _ResponseBody(pool, conn), conn)


def _decode(headers) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


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
            event = await self._conn._next_event()
        except h11.RemoteProtocolError as err:
            self.abandon()
            raise UpstreamError(RESET, f"response body: {err}") from None
        except UpstreamError:
            self.abandon()
            raise
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self._settled = True
            self._pool.release(self._conn)
            raise StopAsyncIteration
        self.abandon()
        raise UpstreamError(RESET, "connection closed inside the response body")

    def abandon(self) -> None:
        if not self._settled:
            self._settled = True
            self._pool.discard(self._conn)

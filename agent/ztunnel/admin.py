"""Per-node HTTP endpoints: admin on loopback 15000, Prometheus on 15020, readiness on 15021.

A few GETs answered by a tiny HTTP/1.1 responder on asyncio streams (one request per
connection): aiohttp would cost the proxy ~10 MB of RSS for three read-only pages.
Malformed or oversized requests get a 400 and are counted; other methods a 405.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shoal.memdebug import MemoryReport

if TYPE_CHECKING:   # the supervisor serves these pages without the data path's modules
    from shoal.agent.ztunnel.context import ProxyContext, ServedPod

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 5.0

Page = Callable[[], Awaitable[tuple[int, str, bytes]]]  # -> (status, content type, body)
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def json_page(data, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data, indent=1, default=str).encode()


def parse_request_line(head: bytes) -> tuple[str, str]:
    """(method, path) of an HTTP/1.x request head; ValueError when malformed."""
    line = head.split(b"\r\n", 1)[0].decode("ascii")
    method, target, version = line.split(" ")
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise ValueError(f"bad request line {line!r}")
    return method, target.split("?", 1)[0]


class HttpEndpoint:
    """One listening socket serving a fixed set of GET pages."""

    def __init__(self, pages: dict[str, Page], on_bad_request: Callable[[], None]):
        self.pages = pages
        self._on_bad_request = on_bad_request
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # a successor binds beside us
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
        self.server = await asyncio.start_server(self._serve, sock=sock)

    async def start_unix(self, path: str) -> None:
        """Serve on a Unix socket (a worker's pages, fetched by its supervisor), owner only."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.server = await asyncio.start_unix_server(self._serve, path=path)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
                if len(head) > MAX_REQUEST_HEAD:
                    raise ValueError("request head too large")
                method, path = parse_request_line(head)
            except (ValueError, UnicodeDecodeError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError) as exc:
                self._on_bad_request()
                log.info("admin: bad request: %s", exc)
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                page = self.pages.get(path)
                if page is None:
                    status, ctype, body = 404, "text/plain", b"not found\n"
                elif method != "GET":
                    status, ctype, body = 405, "text/plain", b"GET only\n"
                else:
                    status, ctype, body = await page()
            writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def admin_pages(ctx: ProxyContext, served: Callable[[], Iterable[ServedPod]]) -> dict[str, Page]:
    """Loopback only: /config_dump, /certs, /connections, /debug/memory[/objects], read from the data
    path's context."""

    async def config_dump():
        return json_page({
            "node": ctx.config.node,
            "data_path": data_path_build(),
            "config_version": ctx.state.version,
            "pods": [pod.describe() for pod in served()],
            "workloads": [dataclasses.asdict(w) for w in ctx.state.all_workloads()],
            "services": [dataclasses.asdict(s) for s in ctx.state.all_services()],
            "policies": [dataclasses.asdict(p) for p in ctx.state.all_policies()],
        })

    async def certs():
        return json_page({"certificates": ctx.identities.describe(), "rotations": ctx.identities.rotations})

    async def connections():
        if ctx.bypass is not None:
            ctx.bypass.count_live_bytes()   # the kernel carries those bytes: read them now
        return json_page({"connections": ctx.telemetry.live_connections(), "pool": ctx.pool.describe(),
                      "inbound_hbone_sessions": len(ctx.inbound_sessions)})

    report = MemoryReport(lambda: proxy_tables(ctx))

    async def memory():
        return json_page(report.page())

    async def memory_objects():
        return json_page(report.page(objects=True))

    return {"/config_dump": config_dump, "/certs": certs, "/connections": connections, "/debug/memory": memory,
            "/debug/memory/objects": memory_objects}


def data_path_build() -> str:
    """"compiled" when the HBONE data path runs as mypyc's extensions (the install's
    default), "interpreted" when installed with SHOAL_COMPILE=0 or the build is missing."""
    from shoal.hbone import session
    return "compiled" if (session.__file__ or "").endswith(".so") else "interpreted"


def proxy_tables(ctx: ProxyContext) -> dict[str, int]:
    """The sizes of every table of the data path that traffic could grow (``/debug/memory``):
    connection records, HBONE connections and their per-stream tables and read buffers,
    metric label sets, TLS session caches."""
    telemetry = ctx.telemetry
    tables = {"connection_records": len(telemetry.live), "closes_unreported": len(telemetry.pending_closes),
              "flows_unsent": len(telemetry.pending_flows), "pool_connections": len(ctx.pool),
              "inbound_hbone_connections": len(ctx.inbound_sessions), "served_pods": len(ctx.served_pods),
              "tasks": len(asyncio.all_tasks())}
    sessions = [*ctx.pool.sessions(), *ctx.inbound_sessions]
    for session in sessions:
        for name, size in session.table_sizes().items():
            tables[f"hbone_{name}"] = tables.get(f"hbone_{name}", 0) + size
    for family in ctx.metrics.registry.collect():
        tables[f"metric_samples:{family.name}"] = len(family.samples)
    for name, size in ctx.identities.table_sizes().items():
        tables[name] = size
    return tables


def metrics_pages(registry: CollectorRegistry) -> dict[str, Page]:
    async def metrics():
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    return {"/metrics": metrics, "/stats/prometheus": metrics}


def ready_pages(is_ready: Callable[[], bool]) -> dict[str, Page]:
    async def ready():
        if is_ready():
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", b"not ready: waiting for the agent's pod snapshot\n"

    return {"/healthz/ready": ready}

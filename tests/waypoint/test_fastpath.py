"""The fast path (waypoint/fastpath.py) against the pipeline: same requests, same bytes, same telemetry.

Each scenario runs twice on fresh beds, once with the fast path and once without, in front
of a scripted origin whose answers are byte-for-byte deterministic (no Date header). The
client's raw bytes, what the origin received (minus the waypoint's fresh span id), the
access log (minus times, client ports and trace ids) and the Istio and authorization
metrics must be equal; plain requests must really have taken the fast path.
"""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from shoal.waypoint.h1 import END, H1Error, RequestHead, RequestReader
from shoal.waypoint.upstream import Endpoint
from shoal.xds.model import Authorization, Operation, Rule

from .conftest import Bed, route, traffic_policy

pytestmark = pytest.mark.timeout(60)

BIG = 8 * 1024 * 1024
VOLATILE_LOG_FIELDS = ("start_time", "duration_ms", "downstream_remote_address", "trace_id", "x_request_id")


class Origin:
    """HTTP/1.1 with scripted, deterministic answers, chosen by path:

    ``/chunked`` a chunked answer; ``/big`` 8 MiB; ``/cut`` announces 1,000 bytes, sends 10
    and closes; ``/bye`` answers (keep-alive) then closes; anything else a small echo of
    the method, target and body length.
    """

    def __init__(self) -> None:
        self.received: list[list[str]] = []    # each request's head lines, traceparent left out
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        parser = RequestReader()
        head: RequestHead | None = None
        body = 0
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while parser.events:
                    event = parser.events.popleft()
                    if isinstance(event, RequestHead):
                        head, body = event, 0
                        self.received.append([f"{event.method} {event.target}"] +
                                             [f"{n}: {v}" for n, v in event.headers if n != "traceparent"])
                    elif isinstance(event, bytes):
                        body += len(event)
                    elif event is END and head is not None:
                        if not await self._answer(writer, head, body):
                            return
                    elif isinstance(event, H1Error):
                        return
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, head: RequestHead, body: int) -> bool:
        path = head.target
        if path == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-origin: chunks\r\n\r\n"
                         b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
        elif path == "/big":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
            block = bytes(range(256)) * 256
            for _ in range(BIG // len(block)):
                writer.write(block)
                await writer.drain()
        elif path == "/cut":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            await writer.drain()
            return False
        else:
            text = f"{head.method} {path} {body}\n".encode()
            writer.write(b"HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\nx-origin: echo\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(text), b"" if head.method == "HEAD" else text))
        await writer.drain()
        return path != "/bye"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def exchange(bed: Bed, data: bytes, slow_reader: bool = False, half_close: bool = False) -> bytes:
    """Send ``data`` on one connection and read everything until the waypoint closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.port)
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    received = bytearray()
    while chunk := await reader.read(65536):
        received += chunk
        if slow_reader:
            await asyncio.sleep(0.002)   # lets the waypoint's write buffer fill: backpressure
    writer.close()
    return bytes(received)


def request(method: str, path: str, body: bytes = b"", close: bool = False, headers: str = "") -> bytes:
    length = f"content-length: {len(body)}\r\n" if body or method in ("POST", "PUT") else ""
    return (f"{method} {path} HTTP/1.1\r\nhost: web.demo:8080\r\nx-request-id: fixed-id\r\n{headers}{length}"
            + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


async def observe(fast: bool, scenario, **start) -> dict:
    """Run ``scenario(bed)`` on a fresh bed and origin; everything a client or an operator can see."""
    origin = Origin()
    await origin.start()
    bed = Bed()
    try:
        bed.services[("demo", "web")] = [Endpoint("127.0.0.1", origin.port, uid="web-0", name="web-0", namespace="demo")]
        await bed.start(fast_path=fast, **start)
        # One request first: the pooled upstream connection the fast path needs (the
        # pipeline opens connections).
        await exchange(bed, request("GET", "/warm-up", close=True))
        client = await scenario(bed)
        await asyncio.sleep(0.05)   # records of connections that just ended
        log = [{k: v for k, v in line.items() if k not in VOLATILE_LOG_FIELDS} for line in bed.access_log]
        for line in log:
            assert line.pop("upstream_host") in (None, f"127.0.0.1:{origin.port}")
        metrics = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for family in bed.registry.collect()
                         for s in family.samples
                         if s.name in ("istio_requests_total", "istio_request_bytes_sum", "istio_response_bytes_sum",
                                       "shoal_waypoint_authorization_decisions_total",
                                       "shoal_waypoint_rejected_requests_total"))
        return {"client": client, "origin": origin.received, "log": log, "metrics": metrics,
                "fast_served": bed.proxy.fast_served}
    finally:
        await bed.close()
        await origin.close()


async def same_both_ways(scenario, expect_fast: bool = True, **start) -> dict:
    fast = await observe(True, scenario, **start)
    slow = await observe(False, scenario, **start)
    assert slow["fast_served"] == 0
    assert (fast["fast_served"] > 0) == expect_fast, fast["fast_served"]
    for key in ("client", "origin", "log", "metrics"):
        assert fast[key] == slow[key], key
    return fast


async def test_pipelined_requests_give_the_same_bytes_and_records():
    async def scenario(bed):
        return await exchange(bed, request("GET", "/a") + request("POST", "/b", b"12345") + request("HEAD", "/h")
                              + request("GET", "/chunked") + request("DELETE", "/c", close=True))

    seen = await same_both_ways(scenario)
    assert seen["fast_served"] == 5
    assert seen["client"].count(b"HTTP/1.1 201 Created") == 4 and b"hello world" not in seen["client"]
    assert b"5\r\nhello\r\n" in seen["client"]      # the chunked answer stays chunked
    assert [line[0] for line in seen["origin"]][1:] == ["GET /a", "POST /b", "HEAD /h", "GET /chunked", "DELETE /c"]
    assert [line["response_code"] for line in seen["log"]][1:] == [201, 201, 201, 200, 201]


async def test_keep_alive_requests_one_after_the_other():
    async def scenario(bed):
        reader, writer = await asyncio.open_connection("127.0.0.1", bed.port)
        received = b""
        for index in range(5):
            writer.write(request("POST", f"/k{index}", b"x" * (100 * index)))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            received += head + await reader.readexactly(length)
        writer.write(request("GET", "/last", close=True))
        received += await reader.read()
        writer.close()
        return received

    seen = await same_both_ways(scenario)
    assert seen["fast_served"] == 6
    assert len(seen["origin"]) == 7 and all("connection: close" not in line for line in seen["origin"][1:6])


async def test_chunked_request_bodies_take_the_pipeline_and_the_answer_is_the_same():
    async def scenario(bed):
        chunked = (b"POST /up HTTP/1.1\r\nhost: web.demo:8080\r\nx-request-id: fixed-id\r\n"
                   b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        return await exchange(bed, chunked + request("GET", "/after", close=True))

    seen = await same_both_ways(scenario)
    assert seen["fast_served"] == 1       # the chunked request went the pipeline's way, the next one fast
    assert b"POST /up 5\n" in seen["client"]


async def test_large_bodies_with_backpressure():
    async def scenario(bed):
        big_request = request("POST", "/in", b"y" * 300_000)     # past the replay buffer: the pipeline streams it
        received = await exchange(bed, request("GET", "/big") + big_request + request("GET", "/end", close=True),
                                  slow_reader=True)
        return hashlib.sha256(received).hexdigest().encode() + b" %d" % len(received)

    seen = await same_both_ways(scenario)
    assert seen["fast_served"] == 2
    assert seen["log"][1]["bytes_sent"] == BIG
    assert seen["log"][2]["bytes_received"] == 300_000


async def test_upstream_closing_mid_answer_cuts_the_client_off_the_same_way():
    async def scenario(bed):
        return await exchange(bed, request("GET", "/cut") + request("GET", "/never"))

    seen = await same_both_ways(scenario)
    assert seen["client"].endswith(b"\r\n\r\n0123456789")
    assert seen["log"][1]["response_flags"] == "UC" and len(seen["log"]) == 2


async def test_a_stale_pooled_connection_is_retried_fresh_the_same_way():
    async def scenario(bed):
        first = await exchange(bed, request("GET", "/bye", close=True))
        await asyncio.sleep(0.1)   # the origin's FIN reaches the pooled connection
        return first + await exchange(bed, request("GET", "/again", close=True))

    seen = await same_both_ways(scenario, expect_fast=True)
    assert [line["response_code"] for line in seen["log"]] == [201, 201, 201]
    assert [line[0] for line in seen["origin"]] == ["GET /warm-up", "GET /bye", "GET /again"]
    assert seen["fast_served"] == 1     # /bye; /again failed on the stale connection and the pipeline retried it


async def test_client_closing_mid_request_is_answered_the_same_way():
    async def half_closed(bed):
        partial = request("POST", "/p", b"0123456789")[:-5]    # announces 10 bytes, sends 5, then FIN
        return await exchange(bed, request("GET", "/first") + partial, half_close=True)

    seen = await same_both_ways(half_closed)
    assert seen["client"].count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400 Bad Request" in seen["client"]
    assert [line["response_flags"] for line in seen["log"]] == ["-", "-", "DPE"]

    async def gone(bed):
        reader, writer = await asyncio.open_connection("127.0.0.1", bed.port)
        writer.write(request("POST", "/p", b"0123456789")[:-5])
        await writer.drain()
        writer.transport.abort()
        return b""

    await same_both_ways(gone, expect_fast=False)


async def test_a_denied_request_is_answered_and_counted_the_same_way():
    deny = Authorization("no-admin-delete", "demo", "DENY",
                         rules=(Rule(operations=(Operation(methods=("DELETE",), paths=("/admin*",)),)),))

    async def scenario(bed):
        return await exchange(bed, request("GET", "/ok") + request("DELETE", "/admin/x")
                              + request("GET", "/ok2", close=True))

    seen = await same_both_ways(scenario, authz=[deny])
    assert b"403 Forbidden" in seen["client"] and seen["fast_served"] == 2
    assert [line[0] for line in seen["origin"]] == ["GET /warm-up", "GET /ok", "GET /ok2"]
    assert ("shoal_waypoint_authorization_decisions_total", (("decision", "deny"), ("policy", "demo/no-admin-delete")),
            1.0) in seen["metrics"]


@pytest.mark.parametrize("start", [
    {"policies": [traffic_policy({"retries": {"attempts": 2, "retryOn": ["5xx"]}})]},
    {"routes": [route([{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "web", "port": 8080}}}],
                        "backendRefs": [{"name": "web", "port": 8080}]}])]},
    {"routes": [route([{"timeouts": {"request": "5s"}, "backendRefs": [{"name": "web", "port": 8080}]}])]},
], ids=["retries", "mirror", "timeout"])
async def test_routes_with_retries_mirrors_or_timeouts_take_the_pipeline(start):
    async def scenario(bed):
        return await exchange(bed, request("GET", "/a") + request("GET", "/b", close=True))

    seen = await same_both_ways(scenario, expect_fast=False, **start)
    assert seen["client"].count(b"HTTP/1.1 201 Created") == 2

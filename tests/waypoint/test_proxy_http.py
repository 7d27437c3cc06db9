"""End to end over loopback: HTTP/1.1 and HTTP/2 through the waypoint to real backends."""
import asyncio
import json
import time

import aiohttp
import h2.config
import h2.connection
import h2.events
import pytest

from shoal.waypoint.model import parse_httproute
from shoal.xds.model import Authorization, Operation, Rule

from .conftest import route, traffic_policy

pytestmark = pytest.mark.timeout(60)


async def get(bed, path, method="GET", host="web.demo:8080", session=None, **kw):
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.request(method, f"http://127.0.0.1:{bed.port}{path}", headers={"host": host, **kw.pop("headers", {})},
                                   allow_redirects=False, **kw) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()
    finally:
        if own:
            await session.close()


async def test_proxies_keeps_alive_and_propagates_trace(bed):
    await bed.backend("web")
    await bed.start()
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with aiohttp.ClientSession() as session:
        s1, h1, b1 = await get(bed, "/hello?x=1", session=session, headers={"traceparent": trace, "connection": "keep-alive"})
        s2, _, _ = await get(bed, "/again", session=session)
    assert s1 == 200 and s2 == 200 and h1["x-backend"] == "web"
    seen = json.loads(b1)
    assert seen["path"] == "/hello?x=1"
    upstream_trace = seen["headers"]["traceparent"].split("-")
    assert upstream_trace[1] == "0af7651916cd43dd8448eb211c80319c" and upstream_trace[2] != "b7ad6b7169203331"
    assert bed.metric("istio_requests_total", response_code="200", reporter="waypoint",
                      destination_service="web.demo.svc.cluster.local", response_flags="-") == 2
    assert bed.metric("shoal_waypoint_downstream_connections_total", protocol="HTTP/1.1") == 1  # keep-alive reused
    log = bed.access_log[0]
    assert log["response_code"] == 200 and log["path"] == "/hello" and log["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


async def test_streams_large_bodies_both_ways(bed):
    await bed.backend("web")
    await bed.start()
    payload = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB

    async def gen():
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{bed.port}/stream", data=gen(), headers={"host": "web"}) as resp:
            got = await resp.read()
    assert resp.status == 200 and got == payload
    assert bed.access_log[0]["bytes_received"] == len(payload) and bed.access_log[0]["bytes_sent"] == len(payload)


async def test_http2_cleartext_concurrent_streams(bed):
    await bed.backend("web")
    await bed.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    ids = []
    for i in range(5):
        sid = conn.get_next_available_stream_id()
        ids.append(sid)
        end = i % 2 == 0
        conn.send_headers(sid, [(":method", "GET" if end else "POST"), (":path", f"/s{i}?delay_ms={50 * (5 - i)}"),
                                (":scheme", "http"), (":authority", "web.demo:8080")], end_stream=end)
        if not end:
            conn.send_data(sid, b"x" * 1000, end_stream=True)
    writer.write(conn.data_to_send())
    statuses, bodies, done = {}, {}, set()
    while len(done) < len(ids):
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, "server closed"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                statuses[ev.stream_id] = dict(ev.headers)[":status"]
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                done.add(ev.stream_id)
        writer.write(conn.data_to_send())
    writer.close()
    assert all(statuses[i] == "200" for i in ids)
    assert [json.loads(bodies[i])["body_len"] for i in ids] == [0, 1000, 0, 1000, 0]
    assert bed.metric("istio_requests_total", request_protocol="http2") == 5


async def test_weighted_split_redirect_and_header_filters(bed):
    await bed.backend("web-v1")
    await bed.backend("web-v2")
    await bed.backend("web")
    await bed.start(routes=[route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
        {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-canary-split", "value": "yes"}]}},
                     {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["server"], "set": [{"name": "x-via", "value": "waypoint"}]}}],
         "backendRefs": [{"name": "web-v1", "port": 8080, "weight": 90}, {"name": "web-v2", "port": 8080, "weight": 10}]},
    ])])
    counts = {"web-v1": 0, "web-v2": 0}
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            status, headers, body = await get(bed, "/", session=session)
            counts[headers["x-backend"]] += 1
        assert "server" not in {k.lower() for k in headers} and headers["x-via"] == "waypoint"
        assert json.loads(body)["headers"]["x-canary-split"] == "yes"
        status, headers, _ = await get(bed, "/old/x?y=1", session=session)
    assert abs(counts["web-v2"] / 400 - 0.10) < 0.04, counts
    assert status == 302 and headers["location"] == "http://web.demo:8080/new/x?y=1"


async def test_fault_abort_is_recovered_by_retries(bed):
    await bed.backend("web")
    await bed.start(policies=[traffic_policy({
        "faults": {"abort": {"httpStatus": 503, "percentage": 50}},
        "retries": {"attempts": 3, "retryOn": ["5xx"], "backoff": {"baseInterval": "1ms", "maxInterval": "2ms"}}})])
    async with aiohttp.ClientSession() as session:
        statuses = [(await get(bed, "/", session=session))[0] for _ in range(100)]
    assert statuses.count(200) >= 99
    assert bed.metric("shoal_waypoint_upstream_retries_total") >= 40


async def test_fault_abort_without_retries_fails_half(bed):
    await bed.backend("web")
    await bed.start(policies=[traffic_policy({"faults": {"abort": {"httpStatus": 503, "percentage": 50}}})])
    async with aiohttp.ClientSession() as session:
        statuses = [(await get(bed, "/", session=session))[0] for _ in range(40)]
    assert statuses.count(503) == 20
    assert bed.metric("istio_requests_total", response_code="503", response_flags="FI") == 20


async def test_request_timeout_answers_504_quickly(bed):
    await bed.backend("web")
    await bed.start(routes=[route([{"timeouts": {"request": "100ms"}, "backendRefs": [{"name": "web", "port": 8080}]}])])
    start = time.monotonic()
    status, _, body = await get(bed, "/?delay_ms=1000")
    elapsed = time.monotonic() - start
    assert status == 504 and 0.09 < elapsed < 0.6, elapsed
    assert bed.access_log[-1]["response_flags"] == "UT"


async def test_fixed_delay_fault(bed):
    await bed.backend("web")
    await bed.start(policies=[traffic_policy({"faults": {"delay": {"fixedDelay": "200ms", "percentage": 100}}})])
    start = time.monotonic()
    status, _, _ = await get(bed, "/")
    assert status == 200 and time.monotonic() - start >= 0.2
    assert "DI" in bed.access_log[-1]["response_flags"]


async def test_l7_deny_answers_403_and_is_recorded(bed):
    await bed.backend("web")
    deny = Authorization("no-admin-delete", "demo", "DENY",
                         rules=(Rule(operations=(Operation(methods=("DELETE",), paths=("/admin*",)),)),))
    await bed.start(authz=[deny])
    assert (await get(bed, "/admin/users", method="DELETE"))[0] == 403
    assert (await get(bed, "/admin/users", method="GET"))[0] == 200
    assert (await get(bed, "/items", method="DELETE"))[0] == 200
    assert bed.metric("istio_requests_total", response_code="403", response_flags="RBAC") == 1
    assert bed.metric("shoal_waypoint_authorization_decisions_total", decision="deny", policy="demo/no-admin-delete") == 1
    assert bed.access_log[0]["authz_policy"] == "demo/no-admin-delete"
    assert all(m != "DELETE" or "/admin" not in p for m, p, _ in bed.seen["web"])


async def test_rate_limit_answers_429(bed):
    await bed.backend("web")
    await bed.start(policies=[traffic_policy({"rateLimit": {"maxTokens": 5, "tokensPerFill": 5, "fillInterval": "1h"}})])
    async with aiohttp.ClientSession() as session:
        statuses = [(await get(bed, "/", session=session))[0] for _ in range(8)]
    assert statuses == [200] * 5 + [429] * 3


async def test_circuit_breaker_overflow(bed):
    await bed.backend("web")
    await bed.start(policies=[traffic_policy({"connectionPool": {"maxRequests": 2, "maxConnections": 2, "maxPendingRequests": 0}})])
    results = await asyncio.gather(*[get(bed, "/?delay_ms=300") for _ in range(5)])
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 2 and statuses.count(503) == 3
    assert bed.metric("istio_requests_total", response_flags="UO") == 3


async def test_outlier_detection_ejects_failing_endpoint(bed):
    await bed.backend("web", name="good")
    await bed.backend("web", name="bad")
    await bed.start(routes=[route([
        {"matches": [{"headers": [{"name": "x-fail", "value": "1"}]}], "backendRefs": [{"name": "web", "port": 8080}]},
        {"backendRefs": [{"name": "web", "port": 8080}]}])],
        policies=[traffic_policy({"outlierDetection": {"consecutive5xxErrors": 2, "baseEjectionTime": "30s", "maxEjectionPercent": 50}})])
    async with aiohttp.ClientSession() as session:
        # the "bad" endpoint answers 500 when asked to by the query; drive it until ejected
        for _ in range(6):
            await get(bed, "/?status=500", session=session)
        hits = [(await get(bed, "/", session=session))[1]["x-backend"] for _ in range(10)]
    assert bed.metric("shoal_waypoint_outlier_ejections_total") == 1
    assert len(set(hits)) == 1  # one of the two was ejected: everything goes to the other


async def test_retry_on_connect_failure_reaches_live_endpoint(bed):
    bed.dead_endpoint("web")
    await bed.backend("web")
    await bed.start(policies=[traffic_policy({"retries": {"attempts": 2, "retryOn": ["connect-failure"],
                                                          "backoff": {"baseInterval": "1ms", "maxInterval": "1ms"}}})])
    async with aiohttp.ClientSession() as session:
        statuses = [(await get(bed, "/", session=session))[0] for _ in range(6)]
    assert statuses == [200] * 6


async def test_no_retry_policy_reports_connect_failure(bed):
    bed.dead_endpoint("web")
    await bed.start()
    status, _, _ = await get(bed, "/")
    assert status == 503 and bed.access_log[-1]["response_flags"] == "UF"


async def test_request_mirror_sends_a_copy(bed):
    await bed.backend("web")
    await bed.backend("shadow")
    await bed.start(routes=[route([{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 8080}}}],
                                    "backendRefs": [{"name": "web", "port": 8080}]}])])
    status, _, _ = await get(bed, "/copy-me", method="POST", data=b"hello")
    assert status == 200
    for _ in range(50):
        if bed.seen.get("shadow"):
            break
        await asyncio.sleep(0.02)
    method, path, headers = bed.seen["shadow"][0]
    assert (method, path) == ("POST", "/copy-me") and headers["Host"].startswith("web.demo-shadow")


async def test_unknown_service_and_no_matching_route(bed):
    await bed.backend("web")
    await bed.start(routes=[route([{"matches": [{"path": {"type": "Exact", "value": "/only"}}], "backendRefs": [{"name": "web", "port": 8080}]}])])
    assert (await get(bed, "/", host="nothing.demo"))[0] == 404
    assert (await get(bed, "/other"))[0] == 404
    assert (await get(bed, "/only"))[0] == 200


async def test_websocket_upgrade_passthrough(bed):
    await bed.backend("web")
    await bed.start()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{bed.port}/ws", headers={"host": "web.demo"}) as ws:
            await ws.send_str("ping")
            assert (await ws.receive(timeout=5)).data == "web:ping"
            await ws.send_str("again")
            assert (await ws.receive(timeout=5)).data == "web:again"


async def test_route_update_applies_without_restart(bed):
    await bed.backend("web-v1")
    await bed.backend("web-v2")
    await bed.backend("web")
    await bed.start()
    assert (await get(bed, "/"))[1]["x-backend"] == "web"
    bed.proxy.update([parse_httproute(route([{"backendRefs": [{"name": "web-v2", "port": 8080}]}]))], [])
    assert (await get(bed, "/"))[1]["x-backend"] == "web-v2"
    bed.proxy.update([], [])
    assert (await get(bed, "/"))[1]["x-backend"] == "web"


async def test_decisions_remembered_on_a_connection_follow_route_and_cluster_changes(bed):
    """The fast path remembers route decisions per connection (proxy.ConnectionMemo): per path
    when the routes read only the path, and a route update or a cluster change (the
    resolver's generation) applies to the very next request on the same connection."""
    await bed.backend("web-v1")
    await bed.backend("web-v2")
    await bed.backend("web")
    await bed.start(routes=[route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/two"}}], "backendRefs": [{"name": "web-v2", "port": 8080}]},
        {"backendRefs": [{"name": "web-v1", "port": 8080}]}])])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        paths = ("/one", "/two", "/one", "/two/x", "/", "/two")
        assert [(await get(bed, p, session=session))[1]["x-backend"] for p in paths] == \
            ["web-v1", "web-v2", "web-v1", "web-v2", "web-v1", "web-v2"]
        assert (await get(bed, "/two", host="nowhere.demo", session=session))[0] == 404
        bed.proxy.update([], [])
        assert (await get(bed, "/two", session=session))[1]["x-backend"] == "web"
        bed.services[("demo", "web")] = list(bed.services[("demo", "web-v2")])
        bed.proxy.resolver.generation += 1
        assert (await get(bed, "/two", session=session))[1]["x-backend"] == "web-v2"
    assert bed.proxy.fast_served >= 3   # the first request to each backend opens its connection on the pipeline


async def test_stale_pooled_connection_is_replaced_transparently(bed):
    """A backend that silently closes keep-alive connections: the next request gets a fresh one."""
    served = []

    async def one_shot(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # no "connection: close": the waypoint pools it and finds it dead later

    server = await asyncio.start_server(one_shot, "127.0.0.1", 0)
    from shoal.waypoint.upstream import Endpoint
    bed.services[("demo", "web")] = [Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])]
    await bed.start()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                await asyncio.sleep(0.05)  # let the close reach the waypoint's idle connection
                assert (await get(bed, "/", session=session))[0] == 200
    finally:
        server.close()
    assert len(served) == 3 and bed.metric("istio_requests_total", response_code="200") == 3


async def test_a_rule_whose_backend_is_missing_answers_500_and_others_still_route(bed):
    """Gateway API: requests matched by a rule with an unresolvable backend get 500."""
    await bed.backend("web")
    await bed.start(routes=[route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/ghost"}}],
         "backendRefs": [{"name": "no-such-service", "port": 80}]},
        {"backendRefs": [{"name": "web", "port": 80}]}])])
    status, _, body = await get(bed, "/ghost/x")
    assert status == 500 and b"no-such-service" in body
    assert (await get(bed, "/fine"))[0] == 200
    assert bed.metric("istio_requests_total", response_code="500") == 1


async def _raw_exchanges(bed, requests: list[bytes]) -> list[tuple[int, dict]]:
    """Each request on one keep-alive connection, in turn: (status, the backend's JSON echo)."""
    from shoal.waypoint.h1 import END, ResponseReader
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.port)
    answers = []
    try:
        for raw in requests:
            writer.write(raw)
            parser, status, body = ResponseReader(), 0, b""
            while True:
                while not parser.events:
                    data = await asyncio.wait_for(reader.read(65536), 10)
                    assert data, "the waypoint closed the connection"
                    parser.feed(data)
                event = parser.events.popleft()
                if event is END:
                    break
                if isinstance(event, bytes):
                    body += event
                else:
                    status = event.status
            answers.append((status, json.loads(body) if status == 200 else body))
    finally:
        writer.close()
    return answers


def _raw(path: str, headers: str = "", body: bytes = b"") -> bytes:
    length = f"content-length: {len(body)}\r\n" if body else ""
    return f"POST {path} HTTP/1.1\r\nhost: web.demo:8080\r\n{headers}{length}\r\n".encode() + body if body else \
        f"GET {path} HTTP/1.1\r\nhost: web.demo:8080\r\n{headers}\r\n".encode()


async def test_requests_alike_on_one_connection_each_go_upstream_as_sent(bed):
    """The same head bytes again on a keep-alive connection reuse its parsed head, its request,
    its plan and the upstream head up to the ids (h1.RequestReader, H1Server.request_for,
    proxy._Planned): each request still goes upstream with its own x-request-id and span, and
    a request that differs in a header value, the client's x-request-id, the body or the path
    is sent as itself, through the same route filter."""
    await bed.backend("web")
    await bed.backend("web-v1")
    await bed.start(routes=[route([{
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [{"name": "web-v1", "port": 8080}],
        "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-added", "value": "yes"}]}}]}])])
    same = _raw("/a", "x-note: 1\r\n")
    sent = [same, same, _raw("/a", "x-note: 2\r\n"), _raw("/a", "x-note: 2\r\nx-request-id: mine\r\n"),
            _raw("/a", "x-note: 2\r\n", b"abc"), _raw("/b", "x-note: 2\r\n"), same]
    answers = await _raw_exchanges(bed, sent)
    assert [status for status, _ in answers] == [200] * 7
    echoes = [{**echo, "headers": {k.lower(): v for k, v in echo["headers"].items()}} for _, echo in answers]
    assert [(e["path"], e["headers"]["x-note"], e["headers"]["x-added"], e["body_len"]) for e in echoes] == \
        [("/a", "1", "yes", 0), ("/a", "1", "yes", 0), ("/a", "2", "yes", 0), ("/a", "2", "yes", 0),
         ("/a", "2", "yes", 3), ("/b", "2", "yes", 0), ("/a", "1", "yes", 0)]
    ids = [e["headers"]["x-request-id"] for e in echoes]
    assert ids[3] == "mine" and len(set(ids)) == 7
    spans = [e["headers"]["traceparent"].split("-")[2] for e in echoes]
    assert len(set(spans)) == 7
    # Besides the ids, requests alike reach the backend with the very same headers.
    fixed = [{k: v for k, v in e["headers"].items() if k not in ("x-request-id", "traceparent")} for e in echoes]
    assert fixed[0] == fixed[1] == fixed[6] and fixed[0] != fixed[2]
    assert bed.proxy.fast_served >= 6   # all but the first (which opens the upstream connection)


async def test_a_header_that_picks_the_route_is_read_on_each_request_of_a_connection(bed):
    """A route that matches a header decides every request: the same head again, then one that
    differs only in that header, on one keep-alive connection, each reach their own backend."""
    await bed.backend("web")
    await bed.backend("web-v1")
    await bed.backend("web-v2")
    await bed.start(routes=[route([
        {"matches": [{"headers": [{"name": "x-pick", "value": "two"}]}], "backendRefs": [{"name": "web-v2", "port": 8080}]},
        {"backendRefs": [{"name": "web-v1", "port": 8080}]}])])
    two, one = _raw("/", "x-pick: two\r\n"), _raw("/", "x-pick: one\r\n")
    answers = await _raw_exchanges(bed, [two, two, one, one, two, one])
    assert [echo["backend"] for _, echo in answers] == ["web-v2", "web-v2", "web-v1", "web-v1", "web-v2", "web-v1"]


def test_a_request_record_starts_with_the_request_and_peer_it_belongs_to():
    """new_record fills the record positionally (RequestRecord's field order): each field from its own source."""
    from prometheus_client import CollectorRegistry

    from shoal.waypoint.http import PeerInfo, ProxyRequest
    from shoal.waypoint.proxy import WaypointProxy
    from shoal.waypoint.resolver import StaticResolver
    from shoal.waypoint.telemetry import RequestTelemetry

    proxy = WaypointProxy(StaticResolver({}), None, RequestTelemetry(CollectorRegistry()), clock=lambda: 12.5)
    peer = PeerInfo("10.0.0.7", 41000, "spiffe://td/ns/a/sa/b", mtls=True)
    headers = [("user-agent", "ua/1"), ("x-request-id", "rid"), ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")]
    rec = proxy.new_record(ProxyRequest("PUT", "/p/q?x=1", "web.demo:8080", headers, "HTTP/1.0", peer, 3))
    assert (rec.start, rec.method, rec.path, rec.authority, rec.protocol, rec.user_agent, rec.request_id, rec.source_ip,
            rec.source_port, rec.source_principal, rec.mtls, rec.grpc) == \
        (12.5, "PUT", "/p/q", "web.demo:8080", "HTTP/1.0", "ua/1", "rid", "10.0.0.7", 41000, "spiffe://td/ns/a/sa/b",
         True, False)
    assert (rec.trace.trace_id, rec.trace.parent_span_id, rec.trace.sampled) == ("a" * 32, "b" * 16, True)
    fresh = proxy.new_record(ProxyRequest("GET", "/", "web", [("content-type", "application/grpc")], "HTTP/2", peer))
    assert len(fresh.request_id) == 32 and len(fresh.trace.trace_id) == 32 and len(fresh.trace.span_id) == 16
    assert fresh.trace.parent_span_id == "" and fresh.trace.trace_id != fresh.request_id and fresh.grpc
    for made in (fresh.request_id, fresh.trace.trace_id, fresh.trace.span_id, rec.trace.span_id):
        assert set(made) <= set("0123456789abcdef")   # lower-case hex digits, zero-padded (lengths above)
    assert fresh.trace.traceparent == f"00-{fresh.trace.trace_id}-{fresh.trace.span_id}-01"


async def test_requests_alike_handed_to_the_pipeline_each_go_upstream_as_sent(bed):
    """A route with a timeout is the pipeline's: the fast path hands each request over with its
    route decision, which requests alike share (proxy._Planned.routed). Each still goes upstream
    with its own ids and the same other headers, and the shared plan keeps the client's
    headers (the pipeline sets the upstream headers on a copy)."""
    await bed.backend("web")
    await bed.backend("web-v1")
    await bed.start(routes=[route([{
        "timeouts": {"request": "5s"}, "backendRefs": [{"name": "web-v1", "port": 8080}],
        "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-added", "value": "yes"}]}}]}])])
    same = _raw("/a", "x-note: handed-1\r\n")
    answers = await _raw_exchanges(bed, [same] * 4 + [_raw("/a", "x-note: handed-2\r\n"), same])
    assert [status for status, _ in answers] == [200] * 6 and bed.proxy.fast_served == 0
    headers = [{k.lower(): v for k, v in echo["headers"].items()} for _, echo in answers]
    assert len({h["x-request-id"] for h in headers}) == 6 and len({h["traceparent"] for h in headers}) == 6
    fixed = [{k: v for k, v in h.items() if k not in ("x-request-id", "traceparent")} for h in headers]
    assert fixed[0] == fixed[1] == fixed[2] == fixed[3] == fixed[5] != fixed[4]
    assert fixed[0]["x-added"] == "yes" and fixed[0]["x-note"] == "handed-1"
    import gc

    from shoal.waypoint.proxy import _Planned
    remembered = [o for o in gc.get_objects()
                  if type(o) is _Planned and any(v.startswith("handed-") for _, v in o.plan.headers)]
    assert remembered
    assert not any(name in ("x-request-id", "traceparent", "host") for p in remembered for name, _ in p.plan.headers)


def test_the_same_request_again_on_a_connection_gets_the_same_route_decision():
    """route() answers the same request (the connection's same ProxyRequest) with the same Routed
    once its plan is remembered; authorization is still counted per request, and another
    request, a route change or a cluster change each get a decision of their own."""
    from prometheus_client import CollectorRegistry

    from shoal.waypoint.http import PeerInfo, ProxyRequest
    from shoal.waypoint.proxy import ConnectionMemo, WaypointProxy
    from shoal.waypoint.resolver import StaticResolver
    from shoal.waypoint.telemetry import RequestTelemetry
    from shoal.waypoint.upstream import Endpoint

    resolver = StaticResolver({("demo", "web"): [Endpoint("127.0.0.1", 9, name="web-0", namespace="demo")]}, namespace="demo")
    proxy = WaypointProxy(resolver, None, RequestTelemetry(CollectorRegistry()))
    peer = PeerInfo("10.0.0.7", 41000)
    request = ProxyRequest("GET", "/a", "web.demo:8080", [("x-note", "1")], "HTTP/1.1", peer)
    memo = ConnectionMemo()
    decisions = [proxy.route(request, proxy.new_record(request, memo), memo) for _ in range(4)]
    first, second = decisions[0], decisions[1]
    assert first is not second and decisions[2] is second and decisions[3] is second
    assert first.plan == second.plan and second.plan.headers == [("x-note", "1")]
    assert first.cluster is second.cluster and first.endpoints is second.endpoints
    assert proxy.telemetry.metrics.authz.labels("allow", "-").value == 4
    other = ProxyRequest("GET", "/a", "web.demo:8080", [("x-note", "1")], "HTTP/1.1", peer)
    assert proxy.route(other, proxy.new_record(other, memo), memo) is not second
    proxy.update([], [])
    assert proxy.route(request, proxy.new_record(request, memo), memo) is not second
    again = proxy.route(request, proxy.new_record(request, memo), memo)
    resolver.generation += 1
    assert proxy.route(request, proxy.new_record(request, memo), memo) is not again

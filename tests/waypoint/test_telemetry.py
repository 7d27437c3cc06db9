"""W3C trace context, OTLP export of the waypoint's spans, the request metrics."""
import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client import CollectorRegistry

from shoal.telemetry_labels import PeerLabels, ServiceLabels
from shoal.waypoint.telemetry import (
    ID_POOL_BYTES,
    ISTIO_LABELS,
    BatchedLines,
    RandomHex,
    RequestRecord,
    RequestTelemetry,
    TraceContext,
)

from .conftest import generated_twin, init_values


def test_traceparent_is_continued_or_started():
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = TraceContext.from_header(parent)
    assert ctx.trace_id == "0af7651916cd43dd8448eb211c80319c" and ctx.parent_span_id == "b7ad6b7169203331"
    assert ctx.span_id != ctx.parent_span_id and ctx.traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    unsampled = TraceContext.from_header("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    assert not unsampled.sampled and unsampled.traceparent.endswith("-00")
    for bad in (None, "", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"):
        fresh = TraceContext.from_header(bad)
        assert fresh.parent_span_id == "" and len(fresh.trace_id) == 32 and fresh.sampled


def test_ids_are_fresh_hex_digits_across_draws():
    """RandomHex hands out slices of the PRNG's digits: lower-case hex of the length asked, never
    the same digits twice, across the refills of its pool; a trace continued or started with it
    has ids of its W3C lengths."""
    ids = RandomHex()
    taken = [ids.take(32) for _ in range(3 * ID_POOL_BYTES // 16 + 7)]    # past three refills
    assert all(len(t) == 32 and set(t) <= set("0123456789abcdef") for t in taken)
    assert len(set(taken)) == len(taken)
    assert len(ids.take(2 * ID_POOL_BYTES)) == 2 * ID_POOL_BYTES
    started = TraceContext.from_header(None, ids)
    continued = TraceContext.from_header("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", ids)
    assert (len(started.trace_id), len(started.span_id), started.parent_span_id, started.sampled) == (32, 16, "", True)
    assert continued.trace_id == "0af7651916cd43dd8448eb211c80319c" and len(continued.span_id) == 16
    assert continued.span_id not in (started.span_id, "b7ad6b7169203331")


def test_spans_are_exported_over_otlp():
    pytest.importorskip("opentelemetry.sdk", reason="optional extra shoal[otel] not installed")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from shoal.waypoint.telemetry import OtlpSpanExporter

    received = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        exporter = OtlpSpanExporter(f"http://127.0.0.1:{server.server_port}/v1/traces", "waypoint.demo")
        rec = RequestRecord(start=0.0, method="GET", path="/x", status=503, end=0.01)
        rec.flags.add("UF")
        rec.trace = TraceContext.from_header("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        exporter.export(rec)
        exporter.shutdown()  # flushes the batch
    finally:
        server.shutdown()
    assert received and received[0][0] == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(received[0][1])
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent_span_id.hex() == "b7ad6b7169203331"
    assert span.span_id.hex() == rec.trace.span_id
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["http.response.status_code"].int_value == 503 and attrs["shoal.response_flags"].string_value == "UF"


def samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    return {(s.labels.get("le"), s.labels["response_code"]): s.value
            for family in registry.collect() for s in family.samples if s.name == name}


def test_counts_and_histograms_follow_prometheus_semantics():
    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry)
    for duration_s, code, sent, got in ((0.0005, 200, 10, 100), (0.0007, 200, 1000, 0), (0.004, 200, 5, 7),
                                        (2.0, 503, 0, 20000)):
        telemetry.record(RequestRecord(start=0.0, end=duration_s, status=code, response_bytes=sent, request_bytes=got))
    assert samples(registry, "istio_requests_total") == {(None, "200"): 3, (None, "503"): 1}
    buckets = samples(registry, "istio_request_duration_milliseconds_bucket")
    # "le" is inclusive (0.5 ms lands in le=0.5) and buckets are cumulative, up to +Inf.
    assert buckets[("0.5", "200")] == 1 and buckets[("1.0", "200")] == 2 and buckets[("5.0", "200")] == 3
    assert buckets[("+Inf", "200")] == 3 and buckets[("1000.0", "503")] == 0 and buckets[("2500.0", "503")] == 1
    assert samples(registry, "istio_request_duration_milliseconds_count")[(None, "200")] == 3
    assert abs(samples(registry, "istio_request_duration_milliseconds_sum")[(None, "200")] - 5.2) < 1e-9
    sizes = samples(registry, "istio_response_bytes_bucket")
    assert sizes[("10.0", "200")] == 2 and sizes[("1000.0", "200")] == 3
    assert samples(registry, "istio_response_bytes_sum")[(None, "200")] == 1015
    received = samples(registry, "istio_request_bytes_bucket")
    assert received[("1.0", "200")] == 1 and received[("10.0", "200")] == 2 and received[("100.0", "200")] == 3
    assert received[("10000.0", "503")] == 0 and received[("100000.0", "503")] == 1
    assert samples(registry, "istio_request_bytes_sum")[(None, "200")] == 107
    labelled = next(s for f in registry.collect() for s in f.samples if s.name == "istio_requests_total")
    assert set(labelled.labels) == set(ISTIO_LABELS)


async def test_access_log_lines_are_written_in_batches_and_flushed_on_demand():
    writes: list[str] = []
    lines = BatchedLines(writes.append, interval=0.05, limit=100)
    lines('{"a":1}')
    lines('{"a":2}')
    assert writes == []                                   # waiting for the interval
    await asyncio.sleep(0.15)
    assert writes == ['{"a":1}\n{"a":2}\n']              # one write for both, in order
    lines("x" * 120)                                      # past the size limit: at once
    assert writes[-1] == "x" * 120 + "\n"
    lines('{"a":3}')
    lines.flush()                                         # the app's stop
    assert writes[-1] == '{"a":3}\n' and len(writes) == 3
    await asyncio.sleep(0.1)
    assert len(writes) == 3                               # the cancelled timer wrote nothing more


def test_access_log_without_a_loop_writes_at_once_and_a_failed_write_only_drops_lines():
    writes: list[str] = []
    BatchedLines(writes.append)("line")
    assert writes == ["line\n"]

    def broken(_text: str) -> None:
        raise BrokenPipeError("stdout closed")

    lines = BatchedLines(broken)
    lines("lost")                                         # logged, not raised into the request
    lines.flush()


async def test_requests_alike_share_one_istio_series_on_the_fast_path_and_the_pipeline():
    """Series are found by the identity of the label objects: the Service's must be one object
    for every request, or each request would add an entry (found again only by its values)."""
    import aiohttp

    from .conftest import Bed

    for fast in (True, False):
        bed = Bed()
        try:
            await bed.backend("web")
            await bed.start(fast_path=fast)
            async with aiohttp.ClientSession() as session:
                for _ in range(5):
                    async with session.get(f"http://127.0.0.1:{bed.port}/", headers={"host": "web.demo:8080"}) as resp:
                        assert resp.status == 200
            telemetry = bed.proxy.telemetry
            assert len(telemetry._series_by_peers) == 1, fast
            assert bed.metric("istio_requests_total", response_code="200") == 5
        finally:
            await bed.close()


async def test_log_lines_and_flows_of_requests_close_together_are_made_together(tmp_path, monkeypatch):
    """``record`` only counts (it runs on the answer's path): the log lines and flows of the
    requests of up to ``REPORT_DELAY`` are made together afterwards, every request's, and the
    flows leave in one datagram, not one each (each wakes the agent); ``REPORT_BATCH``
    waiting go from the end of the loop turn on, ``REPORT_SLICE`` per turn, never inside
    ``record``."""
    import socket

    from shoal.api.flow import flow_pb2
    from shoal.flows.emitter import KIND_BATCH, KIND_FLOW, FlowEmitter, decode_batch
    from shoal.waypoint import telemetry as telemetry_module

    path = tmp_path / "flows.sock"
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    agent.bind(str(path))
    agent.setblocking(False)
    lines: list[str] = []
    emitter = FlowEmitter(path)
    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry, access_log=lines.append, flow_emitter=emitter)
    loop = asyncio.get_running_loop()

    def request(code: int) -> RequestRecord:
        return RequestRecord(start=0.0, end=0.001, status=code, method="GET", path="/x", authority="web.demo:8080",
                             source_ip="10.244.1.7", upstream_host="10.244.2.3:8080")

    try:
        started = loop.time()
        for code in (200, 201):
            telemetry.record(request(code))
        await asyncio.sleep(0)
        telemetry.record(request(404))                    # a later turn, within the delay
        assert lines == [] and samples(registry, "istio_requests_total")[(None, "404")] == 1
        datagram = await asyncio.wait_for(loop.sock_recv(agent, 65536), 5)
        assert loop.time() - started >= telemetry_module.REPORT_DELAY * 0.9
        assert [json.loads(line)["response_code"] for line in lines] == [200, 201, 404]
        assert datagram[:1] == KIND_BATCH
        flows = [flow_pb2.Flow.FromString(record[1:]) for record in decode_batch(datagram[1:])]
        assert [flow.l7.http.code for flow in flows] == [200, 201, 404]
        assert emitter.sent == 3

        full = telemetry_module.REPORT_BATCH
        delay = telemetry_module.REPORT_DELAY
        # A full batch goes without waiting for the timer: with the timer out of reach, only
        # the batch's size can have started it (no wall-clock bound: a loaded machine's turns
        # may take longer than the delay).
        monkeypatch.setattr(telemetry_module, "REPORT_DELAY", 3600.0)
        for _ in range(full):
            telemetry.record(request(202))
        assert len(lines) == 3                            # not inside record, even when the batch is full
        made = [len(lines)]
        while len(lines) < 3 + full and len(made) <= full:
            await asyncio.sleep(0)                        # one loop turn
            made.append(len(lines))
        assert len(lines) == 3 + full
        # A slice per turn, not the whole batch in one: a request arriving meanwhile waits for a slice.
        per_turn = [after - before for before, after in zip(made, made[1:])]
        assert max(per_turn) <= telemetry_module.REPORT_SLICE < full, per_turn
        datagram = await asyncio.wait_for(loop.sock_recv(agent, 65536), 5)
        assert len(decode_batch(datagram[1:])) == full and emitter.sent == 3 + full

        monkeypatch.setattr(telemetry_module, "REPORT_DELAY", delay)
        telemetry.record(request(503))
        telemetry.flush()                                 # the app's stop: at once
        assert json.loads(lines[-1])["response_code"] == 503
        alone = agent.recv(65536)                         # a record alone is sent as itself
        assert alone[:1] == KIND_FLOW and flow_pb2.Flow.FromString(alone[1:]).l7.http.code == 503
        await asyncio.sleep(telemetry_module.REPORT_DELAY * 2)
        assert len(lines) == 4 + full                     # the cancelled timer made nothing twice
    finally:
        emitter.close()
        agent.close()


def test_flows_made_from_a_template_are_the_flows_http_flow_makes():
    """``_flow`` encodes the flow of requests alike once and what differs per request: each
    must decode to the flow ``http_flow`` builds from scratch (time aside), whatever came
    before it, zero latency and code included."""
    import time

    from shoal.api.flow import flow_pb2
    from shoal.flows.emitter import KIND_FLOW
    from shoal.flows.records import http_flow

    telemetry = RequestTelemetry(CollectorRegistry())
    trace = TraceContext.from_header("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    cases = [
        dict(status=200, end=0.0005, trace=trace),
        dict(status=503, end=0.0123, trace=None),                         # same key: the template again
        dict(status=403, end=2.5, trace=trace, flags={"RBAC"}),            # denied: DROPPED
        dict(status=200, end=0.001, trace=trace, path="/other", mtls=False, upstream_host=""),
        dict(status=0, end=1e-10, trace=trace, path="/other", mtls=False, upstream_host=""),  # zeros: unset
        dict(status=200, end=0.001, trace=None, path="/other", mtls=False, upstream_host=""),
    ]
    for case in cases:
        fields = dict(start=0.0, method="POST", path="/x", authority="web.demo:8080", source_ip="10.244.1.7",
                      source_port=0, upstream_host="10.244.2.3:8080", requested_address="10.96.0.10:8080",
                      mtls=True)
        record = RequestRecord(**{**fields, **case})
        before = time.time_ns()
        encoded = telemetry._flow(record)
        after = time.time_ns()
        assert encoded[:1] == KIND_FLOW
        made = flow_pb2.Flow.FromString(encoded[1:])
        assert before <= made.time.ToNanoseconds() <= after and 0 <= made.time.nanos < 10**9   # the wall clock's now
        server = record.upstream_host or record.requested_address
        expected = http_flow(server.rpartition(":")[0], int(server.rpartition(":")[2]), "10.244.1.7", 0,
                             kind="response", method="POST", url=f"http://web.demo:8080{record.path}",
                             code=record.status, latency_ns=int(record.duration_ms * 1e6),
                             verdict="DROPPED" if "RBAC" in record.flags else "FORWARDED", mtls=record.mtls,
                             trace_id=trace.trace_id if record.trace else "", ts_ns=made.time.ToNanoseconds())
        assert made == expected, case


def test_access_log_lines_are_the_compact_json_of_their_fields():
    """``AccessLogLines`` assembles the text itself: it must be exactly what the JSON encoder
    makes of the fields (escapes, nulls, numbers), whatever a client put in them."""
    import time as clock

    from shoal.waypoint.telemetry import AccessLogLines

    trace = TraceContext.from_header("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    lines = AccessLogLines()
    now = clock.monotonic()
    cases = [
        dict(),
        dict(method="POST", path="/a\"b\\c\u00e9\u2028\x01", authority="web.demo:8080", user_agent="curl/8 \"x\"",
             request_id="r-1", source_ip="10.244.1.7", source_port=41000, source_principal="spiffe://td/ns/a/sa/b",
             upstream_host="10.244.2.3:8080", attempts=2, route="demo/web", status=503, flags={"UC", "URX"},
             request_bytes=1024, response_bytes=17, authz_policy="demo/allow", trace=trace),
        dict(trace=TraceContext("", "00f067aa0ba902b7", "", True), status=200),       # a trace without an id: ""
    ]
    for case in cases:
        record = RequestRecord(start=now - 0.0123456, end=now, **case)
        duration = record.duration_ms
        stamps = [clock.strftime("%Y-%m-%dT%H:%M:%SZ", clock.gmtime(clock.time() - duration / 1000))]
        line = lines(record)
        stamps.append(clock.strftime("%Y-%m-%dT%H:%M:%SZ", clock.gmtime(clock.time() - duration / 1000)))
        start_time = json.loads(line)["start_time"]
        assert start_time in stamps                        # a second may turn between the two
        expected = {
            "start_time": start_time,
            "method": record.method, "path": record.path, "protocol": record.protocol,
            "response_code": record.status, "response_flags": record.response_flags,
            "bytes_received": record.request_bytes, "bytes_sent": record.response_bytes,
            "duration_ms": round(duration, 3), "upstream_host": record.upstream_host or None,
            "upstream_attempts": record.attempts, "route_name": record.route or None,
            "authority": record.authority, "user_agent": record.user_agent or None,
            "x_request_id": record.request_id, "downstream_remote_address": f"{record.source_ip}:{record.source_port}",
            "source_principal": record.source_principal or None, "destination_service": record.destination_service,
            "authz_policy": record.authz_policy or None, "trace_id": record.trace.trace_id if record.trace else None,
        }
        assert json.loads(line) == expected, case
        assert line == json.JSONEncoder(separators=(",", ":")).encode(expected), case


def test_authorization_decisions_are_counted_per_verdict_and_policy_and_exported_once_seen():
    """count_authz: the commonest series (allowed, no policy) is kept found, and like any
    series it is exported only once a request was counted in it."""
    telemetry = RequestTelemetry(CollectorRegistry())
    authz = telemetry.metrics.authz
    assert list(authz.children) == []
    for allowed, policy in ((True, None), (False, "ns/deny-all"), (True, None), (True, "ns/allow-get"), (True, None)):
        telemetry.count_authz(allowed, policy)
    assert {key: child.value for key, child in authz.children.items()} == \
        {("allow", "-"): 3, ("deny", "ns/deny-all"): 1, ("allow", "ns/allow-get"): 1}


@pytest.mark.parametrize("cls, given, required", [
    (TraceContext, ("1" * 32, "2" * 16, "3" * 16, True), ("1" * 32, "2" * 16, "", False)),
    (RequestRecord, (1.5, "POST", "/p", "web:80", "HTTP/2", "curl", "rid", "10.0.0.2", 5, "spiffe://s",
                     PeerLabels(workload="src"), PeerLabels(workload="dst"), ServiceLabels("f", "n", "ns"), True,
                     "14", "10.0.0.3:80", "10.96.0.1:80", "route-a", 503, {"UH"}, 11, 12, 3, True,
                     TraceContext("a" * 32, "b" * 16, "", True), "deny-all", 2.5), (0.25,)),
], ids=["TraceContext", "RequestRecord"])
def test_written_out_inits_are_the_dataclass_ones(cls, given, required):
    """Written out (mypyc compiles them; new_record fills RequestRecord positionally): every
    field lands where the generated __init__ puts it, and the defaults are the fields'."""
    assert len(given) == len(init_values(cls(*given)))
    assert init_values(cls(*given)) == init_values(generated_twin(cls)(*given))
    assert init_values(cls(*required)) == init_values(generated_twin(cls)(*required))


def test_request_record_defaults_are_fresh_and_fields_still_compare():
    one, two = RequestRecord(start=0.0, status=200), RequestRecord(0.0)
    assert one.flags == set() and one.flags is not two.flags
    assert one == RequestRecord(0.0, status=200) and one != two
    assert "status=200" in repr(one)

"""W3C trace context and OTLP export of the waypoint's spans."""
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from shoal.waypoint.telemetry import RequestRecord, TraceContext


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

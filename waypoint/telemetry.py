"""Request telemetry: Istio metrics, JSON access log, W3C trace context, L7 flow events.

One ``RequestRecord`` is filled while a request goes through the proxy and handed to
``RequestTelemetry.record`` once the response is done (or failed). Everything here is
optional at run time except the metrics: the access log, the flow emitter and the
OTLP exporter are wired only when configured.

The metrics are counted at once; the access log line, the L7 flow and the span are made
later, for the requests of up to 50 ms together (``REPORT_DELAY``), long after the answer's
bytes left: they cost CPU but no latency, and one timer and one datagram to the node's agent
serve them all (each datagram wakes the agent).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from shoal.api.flow import flow_pb2
from shoal.flows.emitter import encode_flow
from shoal.flows.records import http_flow
from shoal.telemetry_labels import (
    REQUEST_LABELS,
    UNKNOWN_PEER,
    UNKNOWN_SERVICE,
    PeerLabels,
    ServiceLabels,
    principal,
    standard_labels,
)

log = logging.getLogger(__name__)

# Istio's standard label set, computed by shoal.telemetry_labels as the node proxy does.
ISTIO_LABELS = REQUEST_LABELS
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)
SERIES_KEPT = 4096   # label sets found by identity (RequestTelemetry._series); then forgotten and found again
REPORT_DELAY = 0.05  # a request's log line, flow and span wait at most this long for others' (flows: the node proxy's)
REPORT_BATCH = 200   # ...or until this many wait
REPORT_SLICE = 4     # records reported per loop turn: a request arriving meanwhile waits for 4, not for all
FLOW_TEMPLATES_KEPT = 1024   # flows of requests alike (RequestTelemetry._flow); then forgotten and built again
ID_POOL_BYTES = 4096   # random bytes drawn at once for request, trace and span ids (RandomHex)


_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class RandomHex:
    """Lower-case hex digits of the PRNG's bits, for request, trace and span ids: drawn
    ``ID_POOL_BYTES`` at a time (one ``getrandbits``, ``to_bytes`` and ``hex`` per ~100
    requests instead of two of each per request), each id a slice of them: the digits
    ``format(n, "0Nx")`` gives for N digits' worth of the same generator's bits. Ids need
    uniqueness, not secrecy. Made in the process that uses it: digits drawn before a fork
    would be handed out in both processes."""

    __slots__ = ("_digits", "_at")

    def __init__(self) -> None:
        self._digits = ""
        self._at = 0

    def take(self, count: int) -> str:
        """``count`` fresh hex digits (at most ``2 * ID_POOL_BYTES``)."""
        at = self._at
        end = at + count
        if end > len(self._digits):
            self._digits = random.getrandbits(ID_POOL_BYTES * 8).to_bytes(ID_POOL_BYTES, "big").hex()
            at, end = 0, count
        self._at = end
        return self._digits[at:end]


@dataclass(slots=True, init=False)
class TraceContext:
    """W3C trace context for one request: the waypoint's own span in the caller's trace.

    ``__init__`` written out (the dataclass's own): mypyc compiles it, a generated one stays Python."""

    trace_id: str
    span_id: str          # the waypoint's span
    parent_span_id: str   # the caller's span, '' when the waypoint started the trace
    sampled: bool

    def __init__(self, trace_id: str, span_id: str, parent_span_id: str, sampled: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.sampled = sampled

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    @classmethod
    def from_header(cls, value: str | None, ids: RandomHex | None = None) -> "TraceContext":
        """Continue the caller's trace, or start one if the header is absent or malformed
        (new ids from ``ids``, or drawn here)."""
        # Trace ids need uniqueness, not secrecy: the PRNG saves a syscall per request. Hex by
        # bytes.hex: the same digits as format(n, "0Nx"), in half the time.
        match = _TRACEPARENT.match(value.strip().lower()) if value else None
        if match and match.group(1) != "ff" and set(match.group(2)) != {"0"} and set(match.group(3)) != {"0"}:
            span_id = ids.take(16) if ids is not None else random.getrandbits(64).to_bytes(8, "big").hex()
            return cls(match.group(2), span_id, match.group(3), bool(int(match.group(4), 16) & 1))
        # A new trace's id and the span's, drawn at once.
        digits = ids.take(48) if ids is not None else random.getrandbits(192).to_bytes(24, "big").hex()
        return cls(digits[:32], digits[32:], "", True)


@dataclass(slots=True, init=False)
class RequestRecord:
    """Everything telemetry needs about one request, filled in by the proxy as it goes (one
    per request: slots, no instance dict). ``__init__`` is written out, the one the dataclass
    would make: mypyc compiles it, a generated one stays Python."""

    start: float
    method: str = ""
    path: str = ""
    authority: str = ""
    protocol: str = "HTTP/1.1"
    user_agent: str = ""
    request_id: str = ""
    source_ip: str = ""
    source_port: int = 0
    source_principal: str = ""
    source: PeerLabels = UNKNOWN_PEER            # the client's workload (by source IP)
    destination: PeerLabels = UNKNOWN_PEER       # the endpoint that answered
    service: ServiceLabels = UNKNOWN_SERVICE     # the Service called (FQDN, name, namespace)
    grpc: bool = False                           # a gRPC request (HTTP/2, application/grpc*)
    grpc_status: str = ""
    upstream_host: str = ""
    requested_address: str = ""               # ip:port the client dialled (the Service VIP via HBONE)
    route: str = ""
    status: int = 0
    flags: set[str] = field(default_factory=set)
    request_bytes: int = 0
    response_bytes: int = 0
    attempts: int = 0
    mtls: bool = False
    trace: TraceContext | None = None
    authz_policy: str = ""
    end: float = 0.0

    def __init__(self, start: float, method: str = "", path: str = "", authority: str = "", protocol: str = "HTTP/1.1",
                 user_agent: str = "", request_id: str = "", source_ip: str = "", source_port: int = 0,
                 source_principal: str = "", source: PeerLabels = UNKNOWN_PEER, destination: PeerLabels = UNKNOWN_PEER,
                 service: ServiceLabels = UNKNOWN_SERVICE, grpc: bool = False, grpc_status: str = "",
                 upstream_host: str = "", requested_address: str = "", route: str = "", status: int = 0,
                 flags: set[str] | None = None, request_bytes: int = 0, response_bytes: int = 0, attempts: int = 0,
                 mtls: bool = False, trace: TraceContext | None = None, authz_policy: str = "",
                 end: float = 0.0) -> None:
        self.start = start
        self.method = method
        self.path = path
        self.authority = authority
        self.protocol = protocol
        self.user_agent = user_agent
        self.request_id = request_id
        self.source_ip = source_ip
        self.source_port = source_port
        self.source_principal = source_principal
        self.source = source
        self.destination = destination
        self.service = service
        self.grpc = grpc
        self.grpc_status = grpc_status
        self.upstream_host = upstream_host
        self.requested_address = requested_address
        self.route = route
        self.status = status
        self.flags = set() if flags is None else flags
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes
        self.attempts = attempts
        self.mtls = mtls
        self.trace = trace
        self.authz_policy = authz_policy
        self.end = end

    @property
    def response_flags(self) -> str:
        return ",".join(sorted(self.flags)) or "-"

    @property
    def source_namespace(self) -> str:
        return self.source.namespace

    @property
    def destination_service(self) -> str:
        return self.service.fqdn

    @property
    def duration_ms(self) -> float:
        return max(0.0, (self.end or time.monotonic()) - self.start) * 1000.0


class _Buckets:
    """One histogram series as plain numbers: a bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1   # first bound >= value: Prometheus' "le"
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class _RequestSeries:
    __slots__ = ("count", "duration", "request_bytes", "response_bytes")

    def __init__(self) -> None:
        self.count = 0
        self.duration = _Buckets(DURATION_BUCKETS_MS)
        self.request_bytes = _Buckets(SIZE_BUCKETS)
        self.response_bytes = _Buckets(SIZE_BUCKETS)


class IstioRequestMetrics:
    """``istio_requests_total`` and the three ``istio_request*`` histograms, by ``ISTIO_LABELS``.

    Counted once per request, so counted cheaply: plain integers per label set, no lock
    and no label validation (one event-loop thread writes them, and /metrics is served
    by the same loop); turned into Prometheus families only when scraped.
    """

    _HISTOGRAMS = (("istio_request_duration_milliseconds", "Request duration (ms)", "duration"),
                   ("istio_request_bytes", "Request body sizes (bytes)", "request_bytes"),
                   ("istio_response_bytes", "Response body sizes (bytes)", "response_bytes"))

    def __init__(self) -> None:
        self.series: dict[tuple[str, ...], _RequestSeries] = {}

    def series_for(self, labels: tuple[str, ...]) -> _RequestSeries:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _RequestSeries()
        return series

    def record(self, labels: tuple[str, ...], duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        self.observe(self.series_for(labels), duration_ms, request_bytes, response_bytes)

    @staticmethod
    def observe(series: _RequestSeries, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        series.count += 1
        # _Buckets.observe three times, written out: once per request, three calls fewer.
        buckets = series.duration
        buckets.counts[bisect_left(buckets.bounds, duration_ms)] += 1
        buckets.total += duration_ms
        buckets = series.request_bytes
        buckets.counts[bisect_left(buckets.bounds, request_bytes)] += 1
        buckets.total += request_bytes
        buckets = series.response_bytes
        buckets.counts[bisect_left(buckets.bounds, response_bytes)] += 1
        buckets.total += response_bytes

    def collect(self):
        items = list(self.series.items())
        requests = CounterMetricFamily("istio_requests", "Requests handled by the waypoint", labels=ISTIO_LABELS)
        for labels, series in items:
            requests.add_metric(labels, series.count)
        yield requests
        for name, doc, attribute in self._HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=ISTIO_LABELS)
            for labels, series in items:
                buckets = getattr(series, attribute)
                family.add_metric(labels, buckets.cumulative(), buckets.total)
            yield family


class _Count:
    """One label set of a ``PlainCounter``: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class PlainCounter:
    """A Prometheus counter kept as plain numbers, exported when scraped.

    ``prometheus_client.Counter`` takes a lock and validates the labels on every
    ``labels(...).inc()``; here one event-loop thread writes and the same loop serves
    /metrics, so a dict of numbers is enough (the labelled child is looked up once per
    label set, as with ``Counter``).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, *values: str, **named: str) -> _Count:
        key = values or tuple(named[label] for label in self.labelnames)
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, got {key}")
            child = self.children[key] = _Count()
        return child

    def describe(self):
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self.children.items()):
            family.add_metric(key, child.value)
        yield family


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.istio = IstioRequestMetrics()
        registry.register(self.istio)
        self.rejected = PlainCounter("shoal_waypoint_rejected_requests", "Downstream input rejected before routing",
                                     ("reason", "status"), registry)
        self.authz = PlainCounter("shoal_waypoint_authorization_decisions", "L7 authorization decisions",
                                  ("decision", "policy"), registry)
        self.retries = PlainCounter("shoal_waypoint_upstream_retries", "Upstream attempts retried",
                                    ("destination_service", "outcome"), registry)
        self.ejections = PlainCounter("shoal_waypoint_outlier_ejections", "Endpoints ejected by outlier detection",
                                      ("destination_service",), registry)
        self.config_rejected = PlainCounter("shoal_waypoint_config_rejected", "Routes/policies rejected as invalid",
                                            ("kind",), registry)
        self.downstream_connections = PlainCounter("shoal_waypoint_downstream_connections",
                                                   "Downstream connections accepted", ("protocol",), registry)


class RequestTelemetry:
    def __init__(self, registry: CollectorRegistry, access_log: Callable[[str], None] | None = None,
                 flow_emitter: Any = None, span_exporter: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = RequestMetrics(registry)
        self._access_log = access_log
        self._flows = flow_emitter
        self._spans = span_exporter
        self.clock = clock
        # The series of requests alike, found without building their 25 label values: by the
        # identity of the (immutable, shared) label objects of both sides and the Service,
        # which the entry holds so those identities stay theirs; plus the plain values.
        self._series_by_peers: dict[tuple, tuple[PeerLabels, PeerLabels, ServiceLabels, _RequestSeries]] = {}
        self._reporting = access_log is not None or flow_emitter is not None or span_exporter is not None
        self._unreported: list[RequestRecord] = []   # recorded; their log line, flow and span not made yet
        self._flows_made: list[bytes] = []           # encoded flows of reported records, not sent yet
        self._report_timer: asyncio.Handle | None = None
        self._flow_templates: dict[tuple, Any] = {}
        self._access_log_line = AccessLogLines()
        self._allowed_without_policy: _Count | None = None   # count_authz's commonest series

    def label_values(self, r: RequestRecord) -> tuple[str, ...]:
        """``ISTIO_LABELS`` values; the source principal is the HBONE peer's certificate."""
        source = r.source
        if r.source_principal and source.principal != principal(r.source_principal):
            source = dataclasses.replace(source, principal=principal(r.source_principal))
        protocol = "http" if r.protocol.startswith("HTTP/1") else "http2" if r.protocol == "HTTP/2" else r.protocol
        if r.grpc_status:
            protocol = "grpc"
        return standard_labels("waypoint", source, r.destination, r.service, protocol, r.response_flags,
                               r.mtls) + (str(r.status), r.grpc_status)

    def _series(self, r: RequestRecord) -> _RequestSeries:
        source, destination, service = r.source, r.destination, r.service
        key = (id(source), id(destination), id(service), r.source_principal, r.protocol, r.grpc_status, r.status,
               r.mtls, r.response_flags if r.flags else "")
        found = self._series_by_peers.get(key)
        if found is None:
            if len(self._series_by_peers) >= SERIES_KEPT:
                self._series_by_peers.clear()
            found = self._series_by_peers[key] = (source, destination, service,
                                                  self.metrics.istio.series_for(self.label_values(r)))
        return found[3]

    def count_authz(self, allowed: bool, policy: str | None) -> None:
        """One L7 authorization decision."""
        if allowed and policy is None:
            # Most requests: allowed, no policy. Its series, found once (made at its first request, as any).
            count = self._allowed_without_policy
            if count is None:
                count = self._allowed_without_policy = self.metrics.authz.labels("allow", "-")
            count.value += 1
            return
        self.metrics.authz.labels("allow" if allowed else "deny", policy or "-").value += 1

    def labels(self, r: RequestRecord) -> dict[str, str]:
        return dict(zip(ISTIO_LABELS, self.label_values(r)))

    def record(self, r: RequestRecord) -> None:
        """Counts the request now; its log line, flow and span are made with those of the
        requests around it, ``REPORT_DELAY`` later (or once ``REPORT_BATCH`` wait, at the end of
        the loop turn; at once without a running loop). The record must not change after this."""
        end = r.end
        if not end:
            end = r.end = self.clock()
        # r.duration_ms, written out (once per request: a property call fewer).
        IstioRequestMetrics.observe(self._series(r), max(0.0, end - r.start) * 1000.0, r.request_bytes, r.response_bytes)
        if not self._reporting:
            return
        unreported = self._unreported
        unreported.append(r)
        waiting = len(unreported)
        if waiting == 1 or waiting == REPORT_BATCH:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:     # no loop (start-up, shutdown, sans-I/O callers)
                return self.report()
            if self._report_timer is not None:
                self._report_timer.cancel()
            # Never now: ``record`` runs on the answer's path, before its bytes leave at the turn's end.
            self._report_timer = loop.call_later(REPORT_DELAY, self.report) if waiting == 1 else \
                loop.call_soon(self.report)

    def report(self) -> None:
        """Access log lines, flows (in as few datagrams as fit) and spans of the requests
        recorded since the last call. Made together for requests close together: one timer
        and one datagram for them all, and the formatting runs hot while the loop has nothing
        else to do. ``REPORT_SLICE`` records per loop turn, the rest on the next ones: a batch
        made in one go (50 requests at 1,000 req/s, ~0.7 ms) held up any request that arrived
        meanwhile, which was the waypoint's p99 (1.2 ms with telemetry, 0.4-0.7 ms without)."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        unreported = self._unreported
        records = unreported[:REPORT_SLICE]
        del unreported[:REPORT_SLICE]
        self._report(records)
        if unreported:
            try:
                self._report_timer = asyncio.get_running_loop().call_soon(self.report)
                return
            except RuntimeError:     # no loop (start-up, shutdown): all at once
                self._report(unreported)
                unreported.clear()
        self._emit_flows()

    def _report(self, records: list[RequestRecord]) -> None:
        access_log, spans = self._access_log, self._spans
        if access_log is not None:
            line = self._access_log_line
            for r in records:
                access_log(line(r))
        if self._flows is not None:
            flows = self._flows_made
            flows += [self._flow(r) for r in records]
            if len(flows) >= REPORT_BATCH:    # requests that never pause: do not hold their flows
                self._emit_flows()
        if spans is not None:
            for r in records:
                if r.trace is not None and r.trace.sampled:
                    spans.export(r)

    def _emit_flows(self) -> None:
        """The flows made since the last datagram, in as few datagrams as fit."""
        if self._flows_made:
            flows, self._flows_made = self._flows_made, []
            self._flows.emit_records(flows)

    def flush(self) -> None:
        """Everything recorded goes out now (the app calls it when it stops)."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        records, self._unreported = self._unreported, []
        self._report(records)
        self._emit_flows()

    def _flow(self, r: RequestRecord) -> bytes:
        """The request's L7 flow, encoded for the agent (``emitter.encode_flow``'s record): the
        encoded flow of requests alike (same addresses, method, URL, verdict: ``http_flow``
        builds it once, without what differs), then an encoded flow of what differs (time,
        code, latency, trace id, summary). A protobuf parser merges the two as ``MergeFrom``
        would (fields that differ are unset in the first): the flow ``http_flow`` makes, for
        an encoding of the small part only."""
        url = f"http://{r.authority}{r.path}"
        verdict = "DROPPED" if "RBAC" in r.flags else "FORWARDED"
        # A response flow carries the addresses as seen on the reply: server -> client. The
        # server is the endpoint that answered, else the address the client asked for.
        server = r.upstream_host or r.requested_address
        key = (server, r.source_ip, r.source_port, r.method, url, r.protocol, verdict, r.mtls)
        template = self._flow_templates.get(key)
        if template is None:
            if len(self._flow_templates) >= FLOW_TEMPLATES_KEPT:
                self._flow_templates.clear()
            server_ip, _, server_port = server.rpartition(":")
            alike = http_flow(server_ip or "0.0.0.0", int(server_port or 0), r.source_ip or "0.0.0.0", r.source_port,
                              kind="response", method=r.method, url=url, protocol=r.protocol, verdict=verdict,
                              mtls=r.mtls)
            alike.ClearField("time")       # the fields set below: unset here, so theirs stand
            alike.ClearField("Summary")    # (code, latency and trace id are unset: http_flow's defaults)
            template = self._flow_templates[key] = encode_flow(alike)
        # The mypyc build type-checks a copy of the tree without the generated modules' .pyi stubs.
        own = flow_pb2.Flow()
        stamp = own.time      # Timestamp.FromNanoseconds's fields, set without its Python checks
        stamp.seconds, stamp.nanos = divmod(time.time_ns(), 1_000_000_000)
        latency_ns = int(r.duration_ms * 1e6)
        l7 = own.l7
        l7.latency_ns = latency_ns
        l7.http.code = r.status
        if r.trace is not None and r.trace.trace_id:
            own.trace_context.parent.trace_id = r.trace.trace_id
        own.Summary = f"{r.protocol} {r.status} {latency_ns // 1_000_000}ms ({r.method} {url})"   # as http_flow's
        return template + own.SerializeToString()


class BatchedLines:
    """Access-log lines written in batches: one write per ``interval`` seconds (or per
    ``limit`` bytes) instead of one per request. Through ``logging`` each line cost a log
    record, a lock, a write and a flush; Envoy buffers its access log files the same way.
    ``flush`` writes what is waiting (the app calls it when it stops). A failed write is
    logged and its lines dropped: the access log never fails a request."""

    def __init__(self, write: Callable[[str], None], interval: float = 0.1, limit: int = 64 * 1024) -> None:
        self._write = write
        self.interval = interval
        self.limit = limit
        self._lines: list[str] = []
        self._size = 0
        self._timer: Any = None

    def __call__(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self.limit:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return self.flush()        # no loop (start-up, shutdown): at once
            self._timer = loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        dropped = len(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self._write(text)
        except (OSError, ValueError) as err:     # ValueError: the stream was closed
            log.warning("access log: %d lines dropped: %s", dropped, err)


_JSON_STRING = json.encoder.encode_basestring_ascii   # json's own string encoder (C): quotes and escapes


class AccessLogLines:
    """One JSON object per request, with Envoy's access-log field names where they exist.

    The same text ``json.JSONEncoder(separators=(",", ":"))`` makes of the fields (the
    tests compare them), assembled directly: each string through json's own escaping, the
    start time formatted once per second instead of once per request."""

    __slots__ = ("_second", "_stamp")

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def __call__(self, r: RequestRecord) -> str:
        duration_ms = r.duration_ms
        second = int(time.time() - duration_ms / 1000)   # gmtime's rounding (down) for times after 1970
        if second != self._second:
            self._second, self._stamp = second, _JSON_STRING(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
        text = _JSON_STRING
        trace = r.trace
        return (f'{{"start_time":{self._stamp},"method":{text(r.method)},"path":{text(r.path)},'
                f'"protocol":{text(r.protocol)},"response_code":{int(r.status)},'
                f'"response_flags":{text(r.response_flags)},"bytes_received":{int(r.request_bytes)},'
                f'"bytes_sent":{int(r.response_bytes)},"duration_ms":{float(round(duration_ms, 3))!r},'
                f'"upstream_host":{text(r.upstream_host) if r.upstream_host else "null"},'
                f'"upstream_attempts":{int(r.attempts)},"route_name":{text(r.route) if r.route else "null"},'
                f'"authority":{text(r.authority)},"user_agent":{text(r.user_agent) if r.user_agent else "null"},'
                f'"x_request_id":{text(r.request_id)},'
                f'"downstream_remote_address":{text(f"{r.source_ip}:{r.source_port}")},'
                f'"source_principal":{text(r.source_principal) if r.source_principal else "null"},'
                f'"destination_service":{text(r.destination_service)},'
                f'"authz_policy":{text(r.authz_policy) if r.authz_policy else "null"},'
                f'"trace_id":{text(trace.trace_id) if trace else "null"}}}')


class _FixedIds:
    """The SDK's id generator (its ``IdGenerator`` interface, which TracerProvider only calls):
    hands it the ids the waypoint already put on the wire. Not a subclass of the optional
    dependency's class, and not nested, so that mypyc compiles this module."""

    def __init__(self) -> None:
        self.next_span_id = 0
        self.next_trace_id = 0

    def generate_span_id(self) -> int:
        return self.next_span_id

    def generate_trace_id(self) -> int:
        return self.next_trace_id

    def is_trace_id_random(self) -> bool:
        return False    # IdGenerator's default: the ids are the client's, not known to be random


class OtlpSpanExporter:
    """Exports one server span per request with the OpenTelemetry SDK (optional dependency).

    The span keeps the ids the waypoint already propagated in ``traceparent``, so the
    exported trace and the headers seen by the application agree.
    """

    def __init__(self, endpoint: str, service_name: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context
        except ImportError as err:
            raise RuntimeError("OTLP export needs the optional dependency: pip install 'shoal[otel]'") from err

        self._ids = _FixedIds()
        # _FixedIds has IdGenerator's methods without being one (see there).
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                                        id_generator=self._ids)  # type: ignore[arg-type, unused-ignore]  # unused: built without the otel extra
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer("shoal.waypoint")
        self._otel = (NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context)

    def export(self, r: RequestRecord) -> None:
        NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context = self._otel
        trace = r.trace
        assert trace is not None
        self._ids.next_trace_id = int(trace.trace_id, 16)
        self._ids.next_span_id = int(trace.span_id, 16)
        context = None
        if trace.parent_span_id:
            parent = SpanContext(int(trace.trace_id, 16), int(trace.parent_span_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            context = set_span_in_context(NonRecordingSpan(parent))
        end_ns = time.time_ns()
        start_ns = end_ns - int(r.duration_ms * 1e6)
        span = self._tracer.start_span(f"{r.method} {r.destination_service}", context=context,
                                       kind=SpanKind.SERVER, start_time=start_ns)
        span.set_attribute("http.request.method", r.method)
        span.set_attribute("url.path", r.path)
        span.set_attribute("http.response.status_code", r.status)
        span.set_attribute("shoal.response_flags", r.response_flags)
        span.set_attribute("upstream.address", r.upstream_host)
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        self._provider.shutdown()

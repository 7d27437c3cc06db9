"""TCP telemetry: Istio metrics, one JSON access-log line per closed connection, and L4
flow events (open/close) to the agent's flow pipeline (contract C).

The data path only fills a :class:`ConnectionRecord` (counters are plain ints bumped per
read, not per byte); everything here runs once at open and once at close. Closes are
reported in batches, once per event-loop turn: a proxy tearing down 10,000 tunnels spent
a fifth of its time on per-close metrics, flows and log lines while new CONNECTs waited.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shoal.telemetry_labels import TCP_LABELS, ServiceLabels, peer, standard_labels
from shoal.xds.model import Workload

log = logging.getLogger(__name__)
access_log = logging.getLogger("shoal.proxy.access")

ISTIO_LABELS = TCP_LABELS   # computed by shoal.telemetry_labels, the same as the waypoint's

# Istio/Envoy response flags used by the node proxy.
FLAG_NONE = "-"
FLAG_DENIED = "UAEX"          # unauthorized (external/RBAC authorization)
FLAG_UPSTREAM_FAILURE = "UF"  # upstream connection failure
FLAG_NO_ROUTE = "NR"          # no upstream / unknown destination
FLAG_RESET = "UR"             # reset by peer


@dataclass
class ConnectionRecord:
    """One proxied TCP connection, as telemetry sees it."""
    reporter: str                       # "source" (outbound) | "destination" (inbound)
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    src_workload: Workload | None = None
    dst_workload: Workload | None = None
    src_identity: str | None = None
    dst_identity: str | None = None
    service: str = "unknown"           # the Service's FQDN (web.demo.svc.cluster.local)
    mtls: bool = False
    route: str = ""                     # "hbone" | "waypoint" | "passthrough" | "inbound"
    response_flags: str = FLAG_NONE
    error: str = ""
    denied_by: str = ""          # "namespace/name" of the AuthorizationPolicy that refused it
    bytes_in: int = 0                   # client -> server (Istio "received")
    bytes_out: int = 0                  # server -> client (Istio "sent")
    # what istio_tcp_*_bytes already hold of the two (``progress``): the close adds the rest
    bytes_in_counted: int = 0
    bytes_out_counted: int = 0
    started: float = field(default_factory=time.time)
    opened: bool = False
    closed: bool = False
    ended: float = 0.0                  # when it closed (its report may follow within the loop turn)
    labels: tuple[str, ...] = field(default=(), repr=False)   # the metric labels, as last computed

    @property
    def denied(self) -> bool:
        return self.response_flags == FLAG_DENIED

    # -- fed by the HBONE drivers (shoal.hbone.session.TransferRecord)
    def failed(self, reason: str) -> None:
        self.error = self.error or reason

    def reset(self, reason: str) -> None:
        self.failed(reason)
        if self.response_flags == FLAG_NONE:
            self.response_flags = FLAG_RESET


# Setup waits: milliseconds when all is well, seconds under overload (the shedding target is 1 s).
SETUP_WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ProxyMetrics:
    """Every metric the node proxy serves, in the app's own registry (no globals)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened", ISTIO_LABELS, registry=registry)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed", ISTIO_LABELS, registry=registry)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent during the response (server to client)",
                            ISTIO_LABELS, registry=registry)
        self.received = Counter("istio_tcp_received_bytes", "Bytes received during the request (client to server)",
                                ISTIO_LABELS, registry=registry)
        self.rejected = Counter("shoal_proxy_rejected", "Connections, streams or messages refused, by reason",
                                ["listener", "reason"], registry=registry)
        self.active = Gauge("shoal_proxy_active_connections", "Proxied connections open now", ["reporter"],
                            registry=registry)
        self.pods = Gauge("shoal_proxy_enrolled_pods", "Pods whose in-pod listeners are open", registry=registry)
        self.hbone_connections = Gauge("shoal_proxy_hbone_connections", "Pooled outbound HBONE connections",
                                       registry=registry)
        self.drained = Counter("shoal_proxy_drained_connections",
                               "Connections live when a retiring proxy began draining, by outcome "
                               "(completed: ended on their own within the grace; cut: still open at its end)",
                               ["outcome"], registry=registry)
        self.in_setup = Gauge("shoal_proxy_connections_in_setup",
                              "Accepted connections not wired up yet (admission caps them)", registry=registry)
        self.accept_paused = Counter("shoal_proxy_accept_paused",
                                     "Times a listener stopped accepting because too many connections were in "
                                     "setup (the burst waits in the kernel's accept queue)", ["listener"],
                                     registry=registry)
        self.overloaded = Gauge("shoal_proxy_overloaded",
                                "1 while a listener kind sheds on queueing delay (connections waiting past the "
                                "target for an interval, backlog not draining)", ["listener"], registry=registry)
        self.setup_wait = Histogram("shoal_proxy_setup_wait_seconds",
                                    "How long accepted connections (and inbound streams) waited in this proxy, "
                                    "accept queue and setup together, until wired or refused; the wait "
                                    "for a peer (HBONE handshake and answer, upstream connect) left out", ["listener"], buckets=SETUP_WAIT_BUCKETS,
                                    registry=registry)
        self._setup_wait_by_kind: dict[str, Histogram] = {}
        self.certs_rotated = Counter("shoal_proxy_certificates_rotated", "SVIDs renewed at half-life",
                                     registry=registry)
        self.outbound_retries = Counter("shoal_proxy_outbound_retries",
                                        "Outbound tunnels tried a second time, by why the first failed (dial_failed: "
                                        "the HBONE connection; stream_refused: the peer refused the stream "
                                        "unprocessed; stream_lost: the connection went before the answer)",
                                        ["reason"], registry=registry)

    def reject(self, listener: str, reason: str) -> None:
        self.rejected.labels(listener, reason).inc()

    def observe_setup_wait(self, listener: str, seconds: float) -> None:
        child = self._setup_wait_by_kind.get(listener)
        if child is None:
            child = self._setup_wait_by_kind[listener] = self.setup_wait.labels(listener)
        child.observe(seconds)


# Flow records wait at most this long for others to share their datagram, and no more
# than this many wait (about one datagram: an L4 flow is some 250 bytes).
FLOW_DELAY = 0.05
FLOW_BATCH = 200


class ConnectionTelemetry:
    """Turns connection records into metrics, access-log lines and flow events.

    ``closed`` only marks the record; the report (metrics, access-log line) goes out with
    every other close of the same event-loop turn: one counter update per label set, one
    write of log lines. Flows (opens and closes) leave in batches of up to ``FLOW_BATCH``,
    ``FLOW_DELAY`` at the latest. Without a running loop both go out at once."""

    def __init__(self, metrics: ProxyMetrics, emitter=None, node: str = ""):
        self.metrics = metrics
        self.emitter = emitter  # shoal.flows.emitter.FlowEmitter or None
        self.node = node
        self.live: dict[int, ConnectionRecord] = {}
        self.handled = 0   # connections seen (opened, or refused before opening): a worker's share
        self._closing: list[ConnectionRecord] = []
        self._flows: list = []   # flow_pb2.Flow waiting for the next datagram
        self._report_scheduled = False
        self._flows_timer: asyncio.TimerHandle | None = None

    def _labels(self, rec: ConnectionRecord) -> tuple[str, ...]:
        # Computed once per connection (twice when its response flag changed since it opened).
        if not rec.labels or rec.labels[-2] != (rec.response_flags or "-"):
            rec.labels = standard_labels(rec.reporter, peer(rec.src_workload, rec.src_identity),
                                         peer(rec.dst_workload, rec.dst_identity),
                                         ServiceLabels.from_fqdn(rec.service), "tcp", rec.response_flags,
                                         rec.mtls)
        return rec.labels

    def opened(self, rec: ConnectionRecord) -> None:
        if rec.opened:
            return
        rec.opened = True
        self.handled += 1
        self.live[id(rec)] = rec
        self.metrics.opened.labels(*self._labels(rec)).inc()
        self.metrics.active.labels(rec.reporter).inc()
        self._flow(rec, "open")

    def progress(self, rec: ConnectionRecord) -> None:
        """Adds to istio_tcp_*_bytes what the open connection ``rec`` carried since it was
        last counted: a long connection shows its bytes while it lasts, not only at close."""
        sent, received = rec.bytes_out - rec.bytes_out_counted, rec.bytes_in - rec.bytes_in_counted
        if rec.closed or (sent <= 0 and received <= 0):
            return
        labels = self._labels(rec)
        if sent > 0:
            self.metrics.sent.labels(*labels).inc(sent)
        if received > 0:
            self.metrics.received.labels(*labels).inc(received)
        rec.bytes_out_counted, rec.bytes_in_counted = rec.bytes_out, rec.bytes_in

    def closed(self, rec: ConnectionRecord) -> None:
        if rec.closed:
            return
        rec.closed = True
        rec.ended = time.time()
        if rec.opened:
            self.live.pop(id(rec), None)
        else:
            self.handled += 1
        self._closing.append(rec)
        self._schedule_report()

    def _schedule_report(self) -> None:
        if self._report_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:   # no loop (a plain caller): report now
            self.report()
            return
        self._report_scheduled = True
        loop.call_soon(self.report)

    def report(self) -> None:
        """Reports every close (and sends every flow) queued since the last report."""
        self._report_scheduled = False
        closing, self._closing = self._closing, []
        # Counters per label set: a burst's closes mostly share one, so one update each.
        counts: dict[tuple[str, ...], list[int]] = {}   # labels -> [unopened, closed, sent, received]
        active: dict[str, int] = {}
        lines = []
        for rec in closing:
            labels = self._labels(rec)
            tally = counts.get(labels)
            if tally is None:
                tally = counts[labels] = [0, 0, 0, 0]
            if rec.opened:
                active[rec.reporter] = active.get(rec.reporter, 0) + 1
            else:
                # Refused before it opened (denied, no upstream): still one opened+closed pair,
                # so dashboards see the attempt with its response flag.
                tally[0] += 1
            tally[1] += 1
            tally[2] += rec.bytes_out - rec.bytes_out_counted
            tally[3] += rec.bytes_in - rec.bytes_in_counted
            self._flow(rec, "close", send=False)
            lines.append(json.dumps(self.access_entry(rec), separators=(",", ":")))
        metrics = self.metrics
        for labels, (unopened, closed, sent, received) in counts.items():
            if unopened:
                metrics.opened.labels(*labels).inc(unopened)
            metrics.closed.labels(*labels).inc(closed)
            if sent > 0:
                metrics.sent.labels(*labels).inc(sent)
            if received > 0:
                metrics.received.labels(*labels).inc(received)
        for reporter, count in active.items():
            metrics.active.labels(reporter).dec(count)
        if lines:
            access_log.info("\n".join(lines))   # one JSON line per connection, one write
        self._schedule_flows()

    def _schedule_flows(self) -> None:
        """Flows leave ``FLOW_DELAY`` after the first one waiting, or at once when a
        datagram's worth waits (or without a running loop): each datagram wakes the agent,
        which on a busy node costs the proxy its CPU, so a steady trickle of opens and
        closes is sent a few times a second, not once per connection."""
        if len(self._flows) >= FLOW_BATCH:
            self.send_flows()
        elif self._flows and self._flows_timer is None:
            try:
                self._flows_timer = asyncio.get_running_loop().call_later(FLOW_DELAY, self.send_flows)
            except RuntimeError:   # no loop: send now
                self.send_flows()

    def send_flows(self) -> None:
        if self._flows_timer is not None:
            self._flows_timer.cancel()
            self._flows_timer = None
        flows, self._flows = self._flows, []
        if flows and self.emitter is not None:
            self.emitter.emit_many(flows)

    def access_entry(self, rec: ConnectionRecord) -> dict:
        return {
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.started)) + "Z",
            "duration_ms": int(((rec.ended or time.time()) - rec.started) * 1000),
            "reporter": rec.reporter, "route": rec.route,
            "src": f"{rec.src_ip}:{rec.src_port}", "dst": f"{rec.dst_ip}:{rec.dst_port}",
            "src_workload": rec.src_workload.name if rec.src_workload else None,
            "dst_workload": rec.dst_workload.name if rec.dst_workload else None,
            "src_identity": rec.src_identity, "dst_identity": rec.dst_identity,
            "service": rec.service, "mtls": rec.mtls,
            "bytes_received": rec.bytes_in, "bytes_sent": rec.bytes_out,
            "response_flags": rec.response_flags, "error": rec.error or None,
        }

    def _flow(self, rec: ConnectionRecord, event: str, send: bool = True) -> None:
        """Queues the flow for the next datagram (``send``: schedule it; a close's report does)."""
        if self.emitter is None:
            return
        from shoal.flows.records import l4_flow

        denied = rec.response_flags == FLAG_DENIED
        flow = l4_flow(rec.src_ip, rec.src_port, rec.dst_ip, rec.dst_port, event=event,
                       verdict="DROPPED" if denied else "FORWARDED",
                       direction="EGRESS" if rec.reporter == "source" else "INGRESS",
                       mtls=rec.mtls, src_spiffe=rec.src_identity or "", dst_spiffe=rec.dst_identity or "",
                       bytes_sent=rec.bytes_in, bytes_received=rec.bytes_out,
                       drop_reason=133 if denied else 0, error=rec.error,
                       denied_by=rec.denied_by if denied else "", ts_ns=int(rec.ended * 1e9) or None)
        self._flows.append(flow)
        if send:
            self._schedule_flows()

    @property
    def pending_closes(self) -> list[ConnectionRecord]:
        """Closes marked and not reported yet (reported within the loop turn)."""
        return self._closing

    @property
    def pending_flows(self) -> list:
        """Flow events waiting for their datagram (``FLOW_DELAY`` at most)."""
        return self._flows

    def live_connections(self) -> list[dict]:
        return [self.access_entry(rec) for rec in list(self.live.values())]

"""The agent's flow server: ingestion (kernel sink, proxy/waypoint socket) and the
Hubble Observer gRPC API (+ gRPC health) on TCP 4244 and a Unix socket."""
from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shoal.agent.hubble.agentevents import AgentEvents
from shoal.agent.hubble.config import HubbleConfig
from shoal.agent.hubble.enrich import Enricher
from shoal.agent.hubble.metrics import HubbleMetrics
from shoal.api.flow import flow_pb2
from shoal.api.observer import observer_pb2, observer_pb2_grpc, relay_pb2
from shoal.flows.emitter import KIND_BATCH, KIND_FLOW, KIND_LOST, LOST_FORMAT, decode_batch
from shoal.flows.query import HEALTH_SERVICES, MAX_REQUEST_BYTES, FlowQuery, as_flows_request
from shoal.flows.store import FlowStore, RingSource
from shoal.flows.writer import ClientTooSlow, GuardedWriter
from shoal.hubbletls import serve_tcp

log = logging.getLogger(__name__)

# How many proxy/waypoint datagrams to take per wake-up before yielding to the loop.
RECV_BATCH = 256
RECV_BUFFER_BYTES = 4 * 1024 * 1024
HISTORY_SLICE = 256


class ObserverService(observer_pb2_grpc.ObserverServicer):
    """GetFlows / ServerStatus / GetNodes over one node's FlowStore."""

    def __init__(self, store: FlowStore, enricher: Enricher, config: HubbleConfig,
                 metrics: HubbleMetrics, agent_events: "AgentEvents | None" = None) -> None:
        self.store = store
        self.agent_events = agent_events or AgentEvents(config.node_name)
        self.enricher = enricher
        self.config = config
        self.metrics = metrics
        self.started_ns = time.monotonic_ns()
        self._uuid_namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"shoal-flows/{config.node_name}/{time.time_ns()}")
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=61)

    # -- status
    def sample_rate(self) -> None:
        self._rate_samples.append((time.monotonic(), self.store.head))

    def flows_rate(self) -> float:
        if len(self._rate_samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate_samples[0], self._rate_samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    async def ServerStatus(self, request, context):
        return observer_pb2.ServerStatusResponse(
            num_flows=len(self.store), max_flows=self.store.capacity, seen_flows=self.store.head,
            uptime_ns=time.monotonic_ns() - self.started_ns,
            num_connected_nodes={"value": 1}, num_unavailable_nodes={"value": 0},
            version=self.config.version, flows_rate=self.flows_rate())

    async def GetNodes(self, request, context):
        return observer_pb2.GetNodesResponse(nodes=[observer_pb2.Node(
            name=self.config.node_name, version=self.config.version,
            address=self.config.tcp_address or "", state=relay_pb2.NODE_CONNECTED,
            uptime_ns=time.monotonic_ns() - self.started_ns, num_flows=len(self.store),
            max_flows=self.store.capacity, seen_flows=self.store.head)])

    async def GetNamespaces(self, request, context):
        namespaces = set()
        store = self.store
        for seq in range(store.oldest, store.head):
            entry = store.get(seq)
            if entry is not None:
                namespaces.update(self.enricher.namespaces_of(entry[1]))
        namespaces.discard("")
        return observer_pb2.GetNamespacesResponse(namespaces=[
            observer_pb2.Namespace(cluster=self.enricher.cluster_name, namespace=name)
            for name in sorted(namespaces)])

    # -- flows
    def response_for(self, seq: int, entry, query: FlowQuery) -> observer_pb2.GetFlowsResponse | None:
        """The response for stored entry ``seq``, or None when the request filters it out."""
        ts_ns, payload = entry
        if not query.in_time(ts_ns):
            return None
        if isinstance(payload, flow_pb2.LostEvent):
            response = observer_pb2.GetFlowsResponse(lost_events=payload, node_name=self.config.node_name)
            response.time.FromNanoseconds(ts_ns)
            return response
        if isinstance(payload, flow_pb2.Flow):
            flow = payload
        else:
            try:
                flow = self.enricher.kernel_flow(payload)
            except ValueError as error:      # a raw record that does not decode
                self.metrics.malformed_records += 1
                log.debug("undecodable kernel record skipped: %s", error)
                return None
        if not flow.uuid:
            # Stable across reads (Hubble UI keys flows by it), distinct across agent restarts.
            flow.uuid = str(uuid.uuid5(self._uuid_namespace, str(seq)))
        if not query.matcher(flow):
            return None
        response = observer_pb2.GetFlowsResponse(flow=query.shape(flow), node_name=self.config.node_name)
        response.time.CopyFrom(flow.time)
        return response

    def flows_source(self) -> RingSource:
        return RingSource(self.store, self.response_for, self._lost_notice, "flows")

    def _lost_notice(self, lost: int) -> observer_pb2.GetFlowsResponse:
        # Tell the client what it missed (Hubble's HUBBLE_RING_BUFFER) before the cut.
        notice = observer_pb2.GetFlowsResponse(
            lost_events=flow_pb2.LostEvent(source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=lost),
            node_name=self.config.node_name)
        notice.time.FromNanoseconds(time.time_ns())
        return notice

    async def history(self, query: FlowQuery, head: int, source: RingSource | None = None) -> list:
        """Stored entries matching ``query``, oldest first, up to its limit.

        Building a flow costs ~15 us; a full ring is ~60 ms of work, so the scan yields to
        the event loop every HISTORY_SLICE entries to keep the flow server responsive.
        """
        source = source or self.flows_source()
        limit = query.history_limit
        if limit == 0:
            return []
        store, found = source.store, []
        backwards = limit is not None and not query.first
        # Last N: walk back from the newest, then give them in time order.
        sequence = range(head - 1, store.oldest - 1, -1) if backwards else range(store.oldest, head)
        for scanned, seq in enumerate(sequence, 1):
            if scanned % HISTORY_SLICE == 0:
                await asyncio.sleep(0)
            entry = store.get(seq)
            if entry is None:
                if backwards:
                    break            # overwritten while we scanned: everything older is gone too
                continue
            if not backwards and query.past_until(entry[0]):
                break
            if (response := source.respond(seq, entry, query)) is not None:
                found.append(response)
                if limit is not None and len(found) >= limit:
                    break
        if backwards:
            found.reverse()
        return found

    async def GetFlows(self, request, context):
        await self._serve(request, context, self.flows_source())

    async def GetAgentEvents(self, request, context):
        await self._serve(as_flows_request(request), context, self.agent_events.source())

    async def _serve(self, request, context, source: RingSource) -> None:
        try:
            query = FlowQuery.from_request(request)
        except ValueError as error:
            self.metrics.bad_requests += 1
            log.info("%s request rejected: %s", source.what, error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # A follower starts where the ring was when the request was accepted: what arrives
        # after the headers went out is never missed.
        head = source.store.head
        # Headers go out at once: a relay knows this node is there even before any flow.
        await context.send_initial_metadata(())
        try:
            await self._stream(query, context, source, head)
        except asyncio.CancelledError:
            self.metrics.client_disconnects += 1
            raise
        except ClientTooSlow as error:
            self.metrics.slow_clients_cut += 1
            log.warning("%s: %s", source.what, error)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))

    async def _stream(self, query: FlowQuery, context, source: RingSource, head: int) -> None:
        store = source.store
        for response in await self.history(query, head, source):
            await context.write(response)
        if not query.follow:
            return
        writer = GuardedWriter(context, self.config.slow_client_timeout_s)
        cursor = head
        try:
            while True:
                await store.wait_beyond(cursor)
                if cursor < store.oldest:
                    lost = store.oldest - cursor
                    if source.lost_notice is not None:
                        await writer.write(source.lost_notice(lost))
                    raise ClientTooSlow(f"client fell {lost} {source.what} behind the node's ring; stream cut")
                end = store.head
                for seq in range(cursor, end):
                    entry = store.get(seq)
                    if entry is None:
                        raise ClientTooSlow("client fell behind the node's ring; stream cut")
                    if query.past_until(entry[0]):
                        return
                    response = source.respond(seq, entry, query)
                    if response is not None:
                        await writer.write(response)
                cursor = end
        finally:
            writer.close()


class FlowSocketReceiver:
    """Receives proxy/waypoint records (see ``emitter``) on a Unix datagram socket."""

    def __init__(self, path: Path, on_flow: Callable[[flow_pb2.Flow], None],
                 on_lost: Callable[[int], None], metrics: HubbleMetrics) -> None:
        self.path = Path(path)
        self._on_flow = on_flow
        self._on_lost = on_lost
        self._metrics = metrics
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Waypoint pods mount this folder (hostPath) and run as another user: they must reach
        # the socket, never create or replace anything in here (the folder stays root's).
        os.chmod(self.path.parent, 0o755)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER_BYTES)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # waypoints may run as another user
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                record = self._sock.recv(65536)
            except BlockingIOError:
                return
            self.handle(record)

    def handle(self, record: bytes, in_batch: bool = False) -> None:
        kind, body = record[:1], record[1:]
        try:
            if kind == KIND_BATCH and not in_batch:
                for inner in decode_batch(body):
                    self.handle(inner, in_batch=True)
            elif kind == KIND_FLOW:
                flow = flow_pb2.Flow.FromString(body)
                if not flow.HasField("IP") or not flow.IP.source or not flow.IP.destination:
                    raise ValueError("flow without source/destination IP")
                self._on_flow(flow)
            elif kind == KIND_LOST:
                (count,) = LOST_FORMAT.unpack(body)
                self._on_lost(count)
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except (ValueError, struct.error, DecodeError) as error:
            self._reject(error)

    def _reject(self, error: Exception) -> None:
        self._metrics.malformed_records += 1
        if self._metrics.malformed_records <= 10 or self._metrics.malformed_records % 1000 == 0:
            log.warning("malformed flow record #%d dropped: %s", self._metrics.malformed_records, error)

    def stop(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            if self.path.exists():
                self.path.unlink()


class RawRecordLayout:
    """Where the fields the hot path needs sit in the agent's FlowRecord (``agent.structs``)."""

    def __init__(self) -> None:
        from shoal.datapath.structs import FlowRecord

        self.size = ctypes.sizeof(FlowRecord)
        self.ts_offset = FlowRecord.ts_ns.offset
        self.unpack_ts = struct.Struct("<Q").unpack_from
        # protocol, verdict, direction, kind, tcp_flags, drop_reason: the metric key.
        self.key_start = FlowRecord.protocol.offset
        self.key_end = FlowRecord.drop_reason.offset + 1
        self.protocol = 0
        self.verdict = FlowRecord.verdict.offset - self.key_start
        self.kind = FlowRecord.kind.offset - self.key_start
        self.drop_reason = self.key_end - 1 - self.key_start

    def describe(self, key: bytes) -> tuple[str, str, int, int]:
        """Metric key bytes -> (kind, verdict, drop reason, IP protocol number)."""
        from shoal.datapath.structs import Kind, Verdict

        try:
            kind = Kind(key[self.kind]).name.lower()
            verdict = Verdict(key[self.verdict]).name
        except ValueError:
            return "unknown", "VERDICT_UNKNOWN", 0, key[self.protocol]
        return kind, verdict, key[self.drop_reason], key[self.protocol]


class HubbleServer:
    """One node's flow store and Observer API. See the package docstring for wiring."""

    def __init__(self, config: HubbleConfig, state, *, registry=None,
                 kernel_lost: Callable[[], int] | None = None, cluster_name: str = "") -> None:
        self.config = config
        self.store = FlowStore(config.capacity)
        self.enricher = Enricher(state, config.node_name, cluster_name)
        self.metrics = HubbleMetrics()
        self.metrics.store = self.store
        if registry is not None:
            registry.register(self.metrics)
        self.agent_events = AgentEvents(config.node_name)
        self._unsubscribe = state.subscribe(self.agent_events.on_delta) if hasattr(state, "subscribe") else None
        self.observer = ObserverService(self.store, self.enricher, config, self.metrics, self.agent_events)
        self._kernel_lost = kernel_lost
        self._kernel_lost_seen = 0
        self._server: grpc.aio.Server | None = None
        self._receiver: FlowSocketReceiver | None = None
        self._poller: asyncio.Task | None = None
        self.tcp_port: int | None = None
        # Bound once: the sink is called per kernel event.
        self._append = self.store.append
        self._count_kernel = self.metrics.count_kernel
        self._wall_offset = self.enricher.wall_ns(0)
        self._raw = RawRecordLayout()
        self.metrics.raw_layout = self._raw

    # -- ingestion
    def kernel_sink(self, event) -> None:
        """Takes one ``KernelFlowEvent``; stored raw, turned into a Flow when read."""
        ts = event.ts_ns
        self._append(ts if ts >= 10**18 else ts + self._wall_offset, event)
        self._count_kernel(event.kind, event.verdict, event.drop_reason, event.protocol)

    def kernel_records(self, records: list[bytes]) -> None:
        """Takes a batch of raw FlowRecord bytes (``ringbuf.RingReader``); decoded when read."""
        layout = self._raw
        wall_offset = self._wall_offset
        unpack_ts = layout.unpack_ts
        entries = []
        counts = self.metrics.raw_counts
        key_start, key_end = layout.key_start, layout.key_end
        for record in records:
            ts = unpack_ts(record, layout.ts_offset)[0]
            entries.append((ts if ts >= 10**18 else ts + wall_offset, record))
            key = record[key_start:key_end]
            counts[key] = counts.get(key, 0) + 1
        self.store.extend(entries)

    def ingest_flow(self, flow: flow_pb2.Flow) -> None:
        """Takes one proxy/waypoint flow: completes its endpoints and stores it."""
        self.enricher.proxy_flow(flow)
        self.metrics.count_flow(flow)
        self.store.append(flow.time.ToNanoseconds(), flow)

    def record_lost(self, source: flow_pb2.LostEventSource, count: int) -> None:
        self.store.record_lost(time.time_ns(), source, count)

    def poll_kernel_lost(self) -> None:
        if self._kernel_lost is None:
            return
        total = self._kernel_lost()
        if total > self._kernel_lost_seen:
            self.record_lost(flow_pb2.PERF_EVENT_RING_BUFFER, total - self._kernel_lost_seen)
        self._kernel_lost_seen = max(total, self._kernel_lost_seen)

    # -- lifecycle
    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                          ("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        observer_pb2_grpc.add_ObserverServicer_to_server(self.observer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if self.config.unix_socket is not None:
            path = Path(self.config.unix_socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                path.unlink()
            server.add_insecure_port(f"unix:{path}")
        self.tcp_port = serve_tcp(server, self.config.tcp_address, self.config.tls, self.config.insecure_tcp,
                                 "hubble observer")
        await server.start()
        for service in HEALTH_SERVICES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self.agent_events.started()
        if self.config.flows_socket is not None:
            self._receiver = FlowSocketReceiver(
                self.config.flows_socket, self.ingest_flow,
                lambda count: self.record_lost(flow_pb2.OBSERVER_EVENTS_QUEUE, count), self.metrics)
            self._receiver.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll())
        log.info("hubble observer for %s serving (unix %s, tcp %s)", self.config.node_name,
                 self.config.unix_socket, self.config.tcp_address)

    async def _poll(self) -> None:
        while True:
            # The rate is sampled first: a failing loss counter must not freeze flows/s at 0.
            self.observer.sample_rate()
            try:
                self.poll_kernel_lost()
            except (OSError, ValueError) as error:
                log.error("kernel lost-events counter unreadable: %r", error)
            await asyncio.sleep(self.config.lost_poll_interval_s)

    async def stop(self, grace: float = 1.0) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._poller is not None:
            self._poller.cancel()
        if self._receiver is not None:
            self._receiver.stop()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.config.unix_socket is not None and Path(self.config.unix_socket).exists():
            Path(self.config.unix_socket).unlink()

"""Hubble relay: one Observer API merging every node's flows (wire-compatible with Hubble).

Runs inside the controller process. Nodes are whatever ``nodes()`` returns at the time of
each request (a static list, or the local cluster's ``<run_dir>/<node>/hubble.sock``
files), so nodes joining or dying need no restart. A node that cannot be reached, or dies
mid-stream, is reported in ``node_status`` / ``unavailable_nodes``; everyone else keeps
streaming.

Wiring (controller app)::

    relay = Relay.from_layout(layout, tcp_address=f"0.0.0.0:{PORT_HUBBLE_RELAY}", registry=registry)
    await relay.start()      # serves layout.relay_socket and TCP 4245
    ...
    await relay.stop()
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shoal import __version__
from shoal.api.observer import observer_pb2, observer_pb2_grpc, relay_pb2
from shoal.config import PORT_HUBBLE, ClusterLayout
from shoal.flows.query import HEALTH_SERVICES, MAX_REQUEST_BYTES, FlowQuery, as_flows_request
from shoal.flows.writer import ClientTooSlow, GuardedWriter
from shoal.hubbletls import RELAY_CLIENT, RELAY_SERVER, HubbleCertificates, TlsFiles, node_server_name, serve_tcp

log = logging.getLogger(__name__)

VERSION = f"shoal-relay-{__version__}"


@dataclass(frozen=True)
class NodeTarget:
    name: str
    address: str        # gRPC target: "unix:/path/hubble.sock" or "host:4244" (dialled with mTLS)
    server_name: str = ""   # the name the agent's certificate carries, when not its address


class _NodeUnavailable(Exception):
    def __init__(self, node: str, message: str) -> None:
        super().__init__(message)
        self.node = node


def layout_nodes(layout: ClusterLayout, node_address: Callable[[str], str] | None = None
                 ) -> Callable[[], list[NodeTarget]]:
    """The local cluster's nodes (every ``<run_dir>/node-*`` there is): their agents' TCP 4244
    at ``node_address(node)`` over mTLS when given (as hubble-relay dials Cilium agents), else
    their Unix sockets."""

    def discover() -> list[NodeTarget]:
        nodes = []
        if layout.run_dir.is_dir():
            for node_dir in sorted(layout.run_dir.iterdir()):
                if node_dir.is_dir() and node_dir.name.startswith("node-"):
                    node = node_dir.name
                    nodes.append(NodeTarget(node, f"{node_address(node)}:{PORT_HUBBLE}",
                                            node_server_name(node, layout.name)) if node_address
                                 else NodeTarget(node, f"unix:{layout.hubble_socket(node)}"))
        return nodes

    return discover


class _Metrics:
    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge

        self.requests = Counter("shoal_relay_requests", "Relay Observer requests", ["method"], registry=registry)
        self.bad_requests = Counter("shoal_relay_bad_requests", "Relay requests rejected as invalid",
                                    registry=registry)
        self.node_errors = Counter("shoal_relay_node_errors", "Node streams that failed",
                                   ["node"], registry=registry)
        self.slow_clients_cut = Counter("shoal_relay_slow_clients_cut",
                                        "Relay streams cut because the client fell behind", registry=registry)
        self.flows = Counter("shoal_relay_flows_forwarded", "Flows forwarded to clients", registry=registry)
        self.connected = Gauge("shoal_relay_connected_nodes", "Nodes answering at the last status",
                               registry=registry)


class RelayObserver(observer_pb2_grpc.ObserverServicer):
    def __init__(self, nodes: Callable[[], Iterable[NodeTarget]], metrics: _Metrics,
                 node_timeout_s: float, client_queue: int, write_timeout_s: float = 5.0,
                 retry_min_s: float = 0.5, retry_max_s: float = 5.0, rediscover_s: float = 2.0,
                 client_tls: TlsFiles | None = None) -> None:
        self._nodes = nodes
        self._client_tls = client_tls
        self._write_timeout = write_timeout_s
        self._retry_min, self._retry_max = retry_min_s, retry_max_s
        self._rediscover_s = rediscover_s
        self._metrics = metrics
        self._node_timeout = node_timeout_s
        self._client_queue = client_queue
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.started_ns = time.monotonic_ns()

    def stub(self, node: NodeTarget) -> observer_pb2_grpc.ObserverStub:
        channel = self._channels.get(node.address)
        if channel is None:
            if node.address.startswith("unix:"):
                channel = grpc.aio.insecure_channel(node.address)
            elif self._client_tls is None:
                raise _NodeUnavailable(node.name, f"{node.address}: no client certificate to dial it with mTLS")
            else:
                options = [("grpc.ssl_target_name_override", node.server_name)] if node.server_name else []
                channel = grpc.aio.secure_channel(node.address, self._client_tls.channel_credentials(), options)
            self._channels[node.address] = channel
        return observer_pb2_grpc.ObserverStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def _status(self, node: NodeTarget):
        try:
            return await self.stub(node).ServerStatus(observer_pb2.ServerStatusRequest(),
                                                      timeout=self._node_timeout)
        except grpc.aio.AioRpcError as error:
            self._metrics.node_errors.labels(node=node.name).inc()
            return _NodeUnavailable(node.name, error.details() or error.code().name)
        except _NodeUnavailable as unavailable:
            return unavailable

    async def _statuses(self):
        nodes = list(self._nodes())
        results = await asyncio.gather(*(self._status(node) for node in nodes))
        return list(zip(nodes, results))

    # -- unary
    async def ServerStatus(self, request, context):
        self._metrics.requests.labels(method="ServerStatus").inc()
        statuses = await self._statuses()
        response = observer_pb2.ServerStatusResponse(version=VERSION)
        connected = 0
        for node, status in statuses:
            if isinstance(status, _NodeUnavailable):
                response.unavailable_nodes.append(node.name)
                continue
            connected += 1
            response.num_flows += status.num_flows
            response.max_flows += status.max_flows
            response.seen_flows += status.seen_flows
            response.uptime_ns = max(response.uptime_ns, status.uptime_ns)
            response.flows_rate += status.flows_rate
        response.num_connected_nodes.value = connected
        response.num_unavailable_nodes.value = len(statuses) - connected
        self._metrics.connected.set(connected)
        return response

    async def GetNodes(self, request, context):
        self._metrics.requests.labels(method="GetNodes").inc()
        response = observer_pb2.GetNodesResponse()
        for node, status in await self._statuses():
            entry = response.nodes.add(name=node.name, address=node.address)
            if isinstance(status, _NodeUnavailable):
                entry.state = relay_pb2.NODE_UNAVAILABLE
                continue
            entry.state = relay_pb2.NODE_CONNECTED
            entry.version = status.version
            if not node.address.startswith("unix:"):
                entry.tls.enabled, entry.tls.server_name = True, node.server_name
            entry.uptime_ns = status.uptime_ns
            entry.num_flows, entry.max_flows, entry.seen_flows = (
                status.num_flows, status.max_flows, status.seen_flows)
        return response

    async def GetNamespaces(self, request, context):
        self._metrics.requests.labels(method="GetNamespaces").inc()

        async def one(node: NodeTarget):
            try:
                return await self.stub(node).GetNamespaces(observer_pb2.GetNamespacesRequest(),
                                                           timeout=self._node_timeout)
            except grpc.aio.AioRpcError as error:
                self._metrics.node_errors.labels(node=node.name).inc()
                log.info("GetNamespaces: node %s: %s", node.name, error.details())
                return None
            except _NodeUnavailable as unavailable:
                log.info("GetNamespaces: %s", unavailable)
                return None

        seen = set()
        for answer in await asyncio.gather(*(one(node) for node in self._nodes())):
            if answer is not None:
                seen.update((ns.cluster, ns.namespace) for ns in answer.namespaces)
        return observer_pb2.GetNamespacesResponse(namespaces=[
            observer_pb2.Namespace(cluster=cluster, namespace=name) for cluster, name in sorted(seen)])

    # -- agent events
    async def GetAgentEvents(self, request, context):
        """Every node's agent events, merged by time; ``number`` is the total, as for flows."""
        self._metrics.requests.labels(method="GetAgentEvents").inc()
        try:
            query = FlowQuery.from_request(as_flows_request(request))
        except ValueError as error:
            self._metrics.bad_requests.inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # History is bounded by each node's ring; a follower's queue is bounded by client_queue
        # (a client that does not read slows only its own pumps, then is cut by the writer).
        queue: asyncio.Queue = asyncio.Queue(self._client_queue if query.follow else 0)

        async def pump(node: NodeTarget) -> None:
            try:
                call = self.stub(node).GetAgentEvents(request)
                async for response in call:
                    response.node_name = response.node_name or node.name
                    await queue.put(response)
            except (grpc.aio.AioRpcError, _NodeUnavailable) as error:
                self._metrics.node_errors.labels(node=node.name).inc()
                log.info("GetAgentEvents: node %s: %s", node.name, error)

        pumps = [asyncio.create_task(pump(node)) for node in self._nodes()]
        writer = GuardedWriter(context, self._write_timeout)
        try:
            if not query.follow:
                await asyncio.gather(*pumps)
                merged = sorted((queue.get_nowait() for _ in range(queue.qsize())),
                                key=lambda r: r.time.ToNanoseconds())
                if query.number:
                    merged = merged[:query.number] if query.first else merged[-query.number:]
                for response in merged:
                    await writer.write(response)
                return
            while True:
                await writer.write(await queue.get())
        except ClientTooSlow as error:
            self._metrics.slow_clients_cut.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        finally:
            writer.close()
            for task in pumps:
                task.cancel()

    # -- flows
    async def GetFlows(self, request, context):
        self._metrics.requests.labels(method="GetFlows").inc()
        try:
            query = FlowQuery.from_request(request)
        except ValueError as error:
            self._metrics.bad_requests.inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        nodes = list(self._nodes())
        if not query.follow:
            await self._snapshot(request, query, nodes, context)
            return
        if query.history_limit:
            # As Hubble: --last N -f is the N newest flows of the whole cluster, then the
            # stream. Each node answers up to N; the merge keeps the newest N in time order.
            history = observer_pb2.GetFlowsRequest()
            history.CopyFrom(request)
            history.follow = False
            history.until.FromNanoseconds(time.time_ns())
            await self._snapshot(history, query, nodes, context)
            request = observer_pb2.GetFlowsRequest()
            request.CopyFrom(history)
            request.ClearField("number")
            request.ClearField("until")
            request.follow = True
            request.since.FromNanoseconds(history.until.ToNanoseconds() + 1)
        await self._follow(request, nodes, context)

    async def _node_flows(self, node: NodeTarget, request, sink: Callable,
                          on_connected: Callable[[], None] | None = None) -> None:
        """Streams one node's responses into ``sink``; raises _NodeUnavailable on failure.

        ``on_connected`` runs once the node has accepted the stream (its initial metadata
        arrived), before any flow: a quiet node is still a connected one.
        """
        call = self.stub(node).GetFlows(request)
        # A field mask without node_name asked for flows without it: keep them that way.
        mask = request.experimental.field_mask.paths if request.HasField("experimental") else ()
        name_flows = not mask or "node_name" in mask
        try:
            await call.initial_metadata()
            if on_connected is not None and not call.done():
                on_connected()
            async for response in call:
                response.node_name = node.name
                if name_flows and response.HasField("flow") and not response.flow.node_name:
                    response.flow.node_name = node.name
                sink(response)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise
            self._metrics.node_errors.labels(node=node.name).inc()
            raise _NodeUnavailable(node.name, error.details() or error.code().name) from None
        finally:
            call.cancel()

    @staticmethod
    def _node_status(state: int, names: list[str], message: str = "") -> observer_pb2.GetFlowsResponse:
        response = observer_pb2.GetFlowsResponse(
            node_status=relay_pb2.NodeStatusEvent(state_change=state, node_names=names, message=message))
        response.time.FromNanoseconds(time.time_ns())
        return response

    async def _snapshot(self, request, query: FlowQuery, nodes: list[NodeTarget], context) -> None:
        collected: list[observer_pb2.GetFlowsResponse] = []
        results = await asyncio.gather(
            *(self._node_flows(node, request, collected.append) for node in nodes), return_exceptions=True)
        connected, unavailable = [], []
        for node, result in zip(nodes, results):
            if isinstance(result, grpc.aio.AioRpcError):
                await context.abort(result.code(), result.details())
            if isinstance(result, _NodeUnavailable):
                unavailable.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                connected.append(node.name)
        if connected:
            await context.write(self._node_status(relay_pb2.NODE_CONNECTED, connected))
        for failure in unavailable:
            await context.write(self._node_status(relay_pb2.NODE_UNAVAILABLE, [failure.node], str(failure)))
        # ``number`` is the total, as in Hubble: each node already cut its answer to N; the
        # merge keeps the N oldest (``first``) or newest across nodes, in time order.
        collected.sort(key=lambda r: r.time.ToNanoseconds())
        if query.number:
            flows = [r for r in collected if r.HasField("flow")]
            kept = flows[:query.number] if query.first else flows[-query.number:]
            keep = {id(r) for r in kept}
            collected = [r for r in collected if not r.HasField("flow") or id(r) in keep]
        for response in collected:
            await context.write(response)
        self._metrics.flows.inc(len(collected))

    async def _follow(self, request, nodes: list[NodeTarget], context) -> None:
        queue: asyncio.Queue = asyncio.Queue(self._client_queue)
        overflow = asyncio.Event()
        tasks: dict[str, asyncio.Task] = {}

        def sink(response) -> None:
            if overflow.is_set():
                return
            try:
                queue.put_nowait(response)
            except asyncio.QueueFull:
                # The client is not keeping up: stop pulling from the nodes at once.
                overflow.set()
                for task in tasks.values():
                    task.cancel()

        async def follow_node(node: NodeTarget) -> None:
            """One node's stream; on failure report it, then retry until it is back."""
            node_request, down, delay = request, False, self._retry_min
            last_ns = 0

            def forward(response) -> None:
                nonlocal last_ns
                if response.HasField("flow"):
                    last_ns = max(last_ns, response.time.ToNanoseconds())
                sink(response)

            def connected() -> None:
                nonlocal down, delay
                down, delay = False, self._retry_min
                sink(self._node_status(relay_pb2.NODE_CONNECTED, [node.name]))

            while True:
                try:
                    await self._node_flows(node, node_request, forward, connected)
                    return                       # the node ended the stream: ``until`` reached
                except _NodeUnavailable as failure:
                    if not down:
                        down = True
                        sink(self._node_status(relay_pb2.NODE_UNAVAILABLE, [node.name], str(failure)))
                except grpc.aio.AioRpcError as error:
                    sink(self._node_status(relay_pb2.NODE_ERROR, [node.name], error.details() or ""))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                # Resume where this node left off: no history again, no duplicates.
                node_request = observer_pb2.GetFlowsRequest()
                node_request.CopyFrom(request)
                node_request.ClearField("number")
                node_request.first = False
                if last_ns:
                    node_request.since.FromNanoseconds(last_ns + 1)

        def start(found: Iterable[NodeTarget]) -> None:
            for node in found:
                if node.name not in tasks:
                    tasks[node.name] = asyncio.create_task(follow_node(node))

        async def discover() -> None:
            # Nodes that join while the client follows are picked up too.
            while True:
                await asyncio.sleep(self._rediscover_s)
                start(self._nodes())

        start(nodes)
        discovery = asyncio.create_task(discover())
        overflow_wait = asyncio.create_task(overflow.wait())
        writer = GuardedWriter(context, self._write_timeout)
        try:
            while True:
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, overflow_wait}, return_when=asyncio.FIRST_COMPLETED)
                if overflow_wait in done:
                    getter.cancel()
                    raise ClientTooSlow(f"client fell {self._client_queue} responses behind; stream cut")
                await writer.write(getter.result())
                # Drain what is already there without creating tasks: the common case under load.
                while not queue.empty() and not overflow.is_set():
                    await writer.write(queue.get_nowait())
                if request.HasField("until") and tasks and all(t.done() for t in tasks.values()) \
                        and queue.empty():
                    return
        except ClientTooSlow as error:
            self._metrics.slow_clients_cut.inc()
            log.warning("relay GetFlows: %s", error)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        finally:
            writer.close()
            discovery.cancel()
            overflow_wait.cancel()
            for task in tasks.values():
                task.cancel()


class Relay:
    """The Hubble relay server (Observer + health) on a Unix socket and/or TCP."""

    def __init__(self, nodes: Callable[[], Iterable[NodeTarget]] | Iterable[NodeTarget], *,
                 unix_socket: Path | None = None, tcp_address: str | None = None, registry=None,
                 node_timeout_s: float = 2.0, client_queue: int = 10_000, retry_min_s: float = 0.5,
                 rediscover_s: float = 2.0, tls: TlsFiles | None = None, client_tls: TlsFiles | None = None,
                 insecure_tcp: bool = False) -> None:
        """``tls``: the relay's server certificate (4245 requires a client certificate from
        the Hubble CA); ``client_tls``: its client certificate for dialling agents over TCP."""
        if not callable(nodes):
            fixed = list(nodes)
            nodes = lambda: fixed  # noqa: E731
        if registry is None:
            from prometheus_client import CollectorRegistry
            registry = CollectorRegistry()
        self.unix_socket = Path(unix_socket) if unix_socket else None
        self.tcp_address = tcp_address
        self.registry = registry
        self.tls, self.insecure_tcp = tls, insecure_tcp
        self.observer = RelayObserver(nodes, _Metrics(registry), node_timeout_s, client_queue,
                                      retry_min_s=retry_min_s, rediscover_s=rediscover_s, client_tls=client_tls)
        self.tcp_port: int | None = None
        self._server: grpc.aio.Server | None = None

    @classmethod
    def from_layout(cls, layout: ClusterLayout, node_address: Callable[[str], str] | None = None,
                    **kwargs) -> "Relay":
        """The local cluster's relay: with the Hubble CA's certificates (``shoal up`` issues
        them) it serves 4245 over mTLS and, given the nodes' addresses, dials the agents'
        4244 with mTLS (else their Unix sockets)."""
        kwargs.setdefault("unix_socket", layout.relay_socket)
        certificates = HubbleCertificates(layout.hubble_tls_dir)
        server, client = certificates.files(RELAY_SERVER), certificates.files(RELAY_CLIENT)
        if server.exists() and client.exists():
            kwargs.setdefault("tls", server)
            kwargs.setdefault("client_tls", client)
        over_tcp = kwargs.get("client_tls") is not None and node_address is not None
        return cls(layout_nodes(layout, node_address if over_tcp else None), **kwargs)

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        observer_pb2_grpc.add_ObserverServicer_to_server(self.observer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if self.unix_socket is not None:
            self.unix_socket.parent.mkdir(parents=True, exist_ok=True)
            if self.unix_socket.exists() or self.unix_socket.is_symlink():
                self.unix_socket.unlink()
            server.add_insecure_port(f"unix:{self.unix_socket}")
        self.tcp_port = serve_tcp(server, self.tcp_address, self.tls, self.insecure_tcp, "hubble relay")
        await server.start()
        for service in HEALTH_SERVICES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info("hubble relay serving (unix %s, tcp %s)", self.unix_socket, self.tcp_address)

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.observer.close()
        if self.unix_socket is not None and self.unix_socket.exists():
            self.unix_socket.unlink()

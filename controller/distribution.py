"""Config distribution: the gRPC ``ConfigDiscovery`` stream, one task pair per node.

The model changes; ``Distributor.notify`` adds the changed keys to every connection's
pending set and wakes it. Each connection's writer diffs only those keys against what its
node holds (``DeltaSender``) and writes one pre-encoded push: resources are serialized
once per version in the model, so a push is byte concatenation, not protobuf building.
Each connection's reader records ACKs/NACKs. A slow or broken node only slows its own
stream; pending keys coalesce while it is busy.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from shoal.api import config_pb2 as pb
from shoal.controller.metrics import ControllerMetrics
from shoal.controller.model import Change, MeshModel
from shoal.controller.rpcguard import MAX_REQUEST_BYTES, TooLarge, decoder
from shoal.ratelog import LogLimiter, held_note
from shoal.xds.delta import DeltaSender, ProtocolError

log = logging.getLogger(__name__)

SERVICE_NAME = "shoal.config.v1.ConfigDiscovery"
# A push unanswered this long means the component stopped ACKing: its config is stale.
STALE_AFTER_SECONDS = 10.0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_push(system_version: str, nonce: str, resources: list[bytes],
                removed: tuple[str, ...]) -> bytes:
    """A serialized ``DeltaResponse`` from already-serialized ``Resource`` messages."""
    parts = [_field(1, system_version.encode()), _field(2, nonce.encode())]
    parts.extend(_field(3, r) for r in resources)
    parts.extend(_field(4, k.encode()) for k in removed)
    return b"".join(parts)


@dataclass(eq=False)
class Connection:
    node: str
    component: str
    peer: str
    sender: DeltaSender
    connected_at: float = field(default_factory=time.time)
    pending: set[str] | None = None         # None: everything (first sync)
    pending_since: float | None = None      # monotonic time of the oldest unsent change
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent_at: dict[str, float] = field(default_factory=dict)   # nonce -> change time
    unanswered_since: float | None = None   # monotonic: when the oldest unanswered push left
    pushes: int = 0

    def status(self, now: float) -> dict:
        """What ``shoal status`` shows; ``health`` is "healthy", "syncing" (a push is out),
        "stale" (no answer for STALE_AFTER_SECONDS) or "rejected" (its last answer was a NACK)."""
        nack = self.sender.last_nack
        waiting = 0.0 if self.unanswered_since is None else now - self.unanswered_since
        if waiting > STALE_AFTER_SECONDS:
            health = "stale"
        elif nack is not None:
            health = "rejected"
        else:
            health = "syncing" if self.sender.in_flight else "healthy"
        return {
            "node": self.node, "component": self.component, "peer": self.peer,
            "build_version": self.sender.build_version or "unknown", "connected": True,
            "connected_since": self.connected_at, "version": self.sender.acked_version,
            "in_flight": len(self.sender.in_flight), "unanswered_for": round(waiting, 1),
            "health": health, "resources": len(self.sender.known), "pushes": self.pushes,
            "last_nack": None if nack is None else {
                "version": nack.system_version, "message": nack.message,
                "rejected": list(nack.rejected)},
        }


class Distributor:
    def __init__(self, model: MeshModel, metrics: ControllerMetrics) -> None:
        self.model = model
        self.metrics = metrics
        self._refusals_logged = LogLimiter()   # bad hellos: every one counted, a line a second
        self.connections: set[Connection] = set()
        # (node, component) -> its last status, for components that went away and have not
        # come back: shown as disconnected rather than silently missing.
        self.departed: dict[tuple[str, str], dict] = {}

    # -- model side -------------------------------------------------------------------------

    def notify(self, change: Change) -> None:
        """Queues a model change for every connected node."""
        if not change.keys:
            return
        now = time.monotonic()
        for conn in self.connections:
            if conn.pending is not None:
                conn.pending.update(change.keys)
            if conn.pending_since is None:
                conn.pending_since = now
            conn.wake.set()
        self.metrics.generation.set(change.generation)

    def agent_hosts(self) -> dict[str, str]:
        """node -> the IP its agent connects from (in Kubernetes the agents use the host
        network, so it is the node's address: where the node's Hubble API listens)."""
        hosts = {}
        for conn in self.connections:
            if conn.component != "agent":
                continue
            family, _, rest = conn.peer.partition(":")
            host = rest.rsplit(":", 1)[0]
            if family in ("ipv4", "ipv6") and host:
                hosts[conn.node] = host if family == "ipv4" else host.strip("[]")
        return hosts

    def status(self) -> list[dict]:
        now = time.monotonic()
        connected = [c.status(now) for c in self.connections]
        here = {(s["node"], s["component"]) for s in connected}
        gone = [s for key, s in self.departed.items() if key not in here]
        return sorted(connected + gone, key=lambda s: (s["node"], s["component"]))

    # -- gRPC ---------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """Callers are authenticated by NodeAuthInterceptor before a message is read."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "StreamConfig": grpc.stream_stream_rpc_method_handler(
                self.stream, request_deserializer=decoder(
                    pb.DeltaRequest, "StreamConfig", MAX_REQUEST_BYTES, self.metrics),
                response_serializer=lambda push: push),   # pushes are pre-encoded bytes
        })

    async def stream(self, requests: AsyncIterator[pb.DeltaRequest],
                     context: grpc.aio.ServicerContext, node: str) -> AsyncIterator[bytes]:
        iterator = requests.__aiter__()
        try:
            hello = await asyncio.wait_for(iterator.__anext__(), timeout=30)
            if isinstance(hello, TooLarge):
                raise ProtocolError(str(hello))
            sender = DeltaSender.from_hello(hello)
            if sender.node != node:
                raise ProtocolError(f"authenticated as node {node!r} but hello names "
                                    f"{sender.node!r}")
        except (ProtocolError, ValueError) as err:
            self.metrics.bad_requests.labels("StreamConfig").inc()
            held = self._refusals_logged.allow("hello")
            if held is not None:
                log.warning("config stream from %s (%s) refused: %s%s", context.peer(), node, err, held_note(held))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        conn = Connection(node=node, component=sender.component, peer=context.peer(),
                          sender=sender, pending_since=time.monotonic())
        conn.wake.set()
        self.connections.add(conn)
        self.departed.pop((node, conn.component), None)
        self.metrics.connected.labels(conn.component).inc()
        log.info("node %s (%s) connected from %s, resuming %d resources", node,
                 conn.component, conn.peer, len(sender.known))
        reader = asyncio.ensure_future(self._read(conn, iterator, context))
        waiter: asyncio.Future | None = None
        try:
            while not reader.done():
                waiter = asyncio.ensure_future(conn.wake.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader.done():
                    break
                conn.wake.clear()
                push = self._plan(conn)
                if push is not None:
                    yield push
            error = None if reader.cancelled() else reader.exception()
            if isinstance(error, ProtocolError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            elif error is not None:   # the node went away mid-read: nothing to answer
                log.info("node %s (%s) stream ended: %r", node, conn.component, error)
        finally:
            reader.cancel()
            if waiter is not None:
                waiter.cancel()
            self.connections.discard(conn)
            self._remember_departed(conn)
            self.metrics.connected.labels(conn.component).dec()
            log.info("node %s (%s) disconnected", node, conn.component)

    def _remember_departed(self, conn: Connection) -> None:
        """Keeps a node's agent or proxy listed as disconnected until it returns. Not
        waypoints: they come and go with their Gateway, and a deleted one is not missing."""
        if conn.component == "waypoint" or any(
                c.node == conn.node and c.component == conn.component for c in self.connections):
            return   # (or it reconnected before the old stream finished)
        last = conn.status(time.monotonic())
        last.update(connected=False, health="disconnected", disconnected_at=time.time(),
                    in_flight=0, unanswered_for=0.0)
        self.departed[(conn.node, conn.component)] = last

    def _plan(self, conn: Connection) -> bytes | None:
        keys, conn.pending = conn.pending, set()
        changed_at, conn.pending_since = conn.pending_since, None
        first = not conn.pushes
        version = str(self.model.generation)
        push = conn.sender.plan(self.model.view(conn.node, conn.component), version, keys,
                                force=first)
        if push is None:
            return None
        nonce, removed = push.nonce, push.removed
        resources = [self.model.resources[key].encoded for key in push.upserts]
        conn.sent_at[nonce] = changed_at if changed_at is not None else time.monotonic()
        if conn.unanswered_since is None:
            conn.unanswered_since = time.monotonic()
        conn.pushes += 1
        self.metrics.pushes.labels(conn.component).inc()
        self.metrics.push_resources.labels(conn.component).inc(len(resources) + len(removed))
        return encode_push(version, nonce, resources, removed)

    async def _read(self, conn: Connection, iterator, context) -> None:
        async for request in iterator:
            try:
                if isinstance(request, TooLarge):
                    raise ProtocolError(str(request))
                nack = conn.sender.on_reply(request)
            except ProtocolError as err:
                self.metrics.bad_requests.labels("StreamConfig").inc()
                log.warning("node %s: %s", conn.node, err)
                raise
            changed_at = conn.sent_at.pop(request.response_nonce, None)
            # The next unanswered push left at the latest now (an upper bound on its age).
            conn.unanswered_since = time.monotonic() if conn.sender.in_flight else None
            if nack is not None:
                self.metrics.rejects.labels(conn.component).inc()
                log.warning("node %s (%s) NACKed version %s: %s (rejected: %s)", conn.node,
                            conn.component, nack.system_version, nack.message,
                            ", ".join(nack.rejected))
            elif changed_at is not None:
                self.metrics.convergence.observe(time.monotonic() - changed_at)

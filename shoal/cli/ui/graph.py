"""The service map behind ``shoal ui``: Hubble flows folded into nodes and edges (pure, no I/O).

Nodes are workloads (a pod's owning Deployment, or the pod itself) and Services; an
endpoint the mesh knows nothing about is its IP ("world"). One connection is seen several
times (the kernel's connect, the client node's proxy, the server node's proxy, open and
close), so an edge counts *distinct* client sockets as connections, and HTTP requests from
the waypoint's L7 flows.

An edge's state is what an operator asks first:

- ``verdict``: ``denied`` when the newest flow on the edge was dropped (a DENY shows at
  once, and clears when traffic is forwarded again), ``forwarded`` otherwise;
- ``mtls``: every flow in the window was encrypted (``all``), some (``partial``), none;
- ``error_rate``: HTTP 5xx responses and ERROR verdicts over requests/connections.

Everything is computed over a sliding ``window_s``; edges idle for ``expire_s`` go away.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

from shoal.api.flow import flow_pb2

# The node proxy writes the peers' SPIFFE IDs into Summary (Hubble has no field for them).
_SPIFFE_PAIR = re.compile(r"mTLS (\S+) -> (\S+)")
_SERVICE_ACCOUNT_LABEL = "k8s:io.cilium.k8s.policy.serviceaccount="
DENIED_VERDICTS = frozenset({flow_pb2.DROPPED})


@dataclass(frozen=True)
class NodeKey:
    kind: str           # "workload", "service" or "world"
    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.namespace}/{self.name}"


@dataclass
class _Sample:
    ts_ns: int
    connection: tuple | None      # distinct client socket, when the flow is L4
    request: bool                 # an HTTP request (L7, not a reply)
    response: bool
    error: bool
    encrypted: bool
    dropped: bool


@dataclass
class EdgeStats:
    source: NodeKey
    destination: NodeKey
    samples: collections.deque = field(default_factory=collections.deque)
    last_ns: int = 0
    last_dropped: bool = False
    last_drop_reason: str = ""
    identities: dict[str, int] = field(default_factory=dict)
    ports: set[int] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)


def endpoint_node(endpoint: flow_pb2.Endpoint, ip: str, service: flow_pb2.Service | None) -> NodeKey:
    """The map node an endpoint belongs to: its workload, else its Service, else its IP."""
    if endpoint.pod_name:
        name = endpoint.workloads[0].name if endpoint.workloads else endpoint.pod_name
        return NodeKey("workload", endpoint.namespace, name)
    if service is not None and service.name:
        return NodeKey("service", service.namespace, service.name)
    return NodeKey("world", "", ip or "unknown")


def _identity(flow: flow_pb2.Flow) -> str | None:
    """The peers' identities: SPIFFE IDs when the proxy proved them, else the endpoints'
    service accounts; None when one side is not known yet (the in-pod connect to a VIP)."""
    found = _SPIFFE_PAIR.search(flow.Summary)
    if found:
        return f"{found.group(1)} -> {found.group(2)}"
    if not (flow.source.pod_name and flow.destination.pod_name):
        return None
    return f"{_side_identity(flow.source)} -> {_side_identity(flow.destination)}"


def _side_identity(endpoint: flow_pb2.Endpoint) -> str:
    for label in endpoint.labels:
        if label.startswith(_SERVICE_ACCOUNT_LABEL):
            return f"{endpoint.namespace}/sa/{label[len(_SERVICE_ACCOUNT_LABEL):]} (ID {endpoint.identity})"
    return f"ID {endpoint.identity}" if endpoint.identity else "no identity"


def _port(flow: flow_pb2.Flow) -> int:
    l4 = flow.l4
    which = l4.WhichOneof("protocol")
    return getattr(l4, which).destination_port if which in ("TCP", "UDP", "SCTP") else 0


def flow_edges(flow: flow_pb2.Flow) -> list[tuple[NodeKey, NodeKey]]:
    """The edges one flow counts on: client -> Service (what it asked for) when it names a
    Service, plus Service -> workload when the backend is known; else client -> backend."""
    reply = flow.is_reply.value
    src_ep, dst_ep = (flow.destination, flow.source) if reply else (flow.source, flow.destination)
    src_ip, dst_ip = (flow.IP.destination, flow.IP.source) if reply else (flow.IP.source, flow.IP.destination)
    service = flow.destination_service if flow.HasField("destination_service") else None
    source = endpoint_node(src_ep, src_ip, None)
    backend = endpoint_node(dst_ep, dst_ip, None)
    if service is not None and service.name:
        front = NodeKey("service", service.namespace, service.name)
        edges = [(source, front)]
        if backend.kind == "workload":
            edges.append((front, backend))
        return edges
    return [(source, backend)]


class ServiceMap:
    """Folds flows into edges; ``snapshot`` gives the JSON the page draws."""

    def __init__(self, window_s: float = 10.0, expire_s: float = 120.0, max_edges: int = 20_000) -> None:
        self.window_ns = int(window_s * 1e9)
        self.expire_ns = int(expire_s * 1e9)
        self.max_edges = max_edges
        self.edges: dict[tuple[NodeKey, NodeKey], EdgeStats] = {}
        self.nodes: dict[NodeKey, dict] = {}
        self.newest_ns = 0

    def add(self, flow: flow_pb2.Flow) -> None:
        ts = flow.time.ToNanoseconds()
        self.newest_ns = max(self.newest_ns, ts)
        dropped = flow.verdict in DENIED_VERDICTS
        http = flow.l7.http if flow.l7.WhichOneof("record") == "http" else None
        reply = flow.is_reply.value
        connection = None
        # The kernel's connect() record has no source port yet: it is not a connection key.
        if flow.Type == flow_pb2.L3_L4 and not reply and (port := _source_port(flow)):
            connection = (flow.IP.source, port)
        sample = _Sample(
            ts_ns=ts, connection=connection,
            request=http is not None and not reply,
            response=http is not None and reply,
            error=flow.verdict == flow_pb2.ERROR or (http is not None and reply and http.code >= 500),
            encrypted=flow.IP.encrypted, dropped=dropped)
        for source, destination in flow_edges(flow):
            self._note_node(source, flow)
            self._note_node(destination, flow)
            edge = self.edges.get((source, destination))
            if edge is None:
                if len(self.edges) >= self.max_edges:
                    self._expire(force=True)
                edge = self.edges[(source, destination)] = EdgeStats(source, destination)
            edge.samples.append(sample)
            if ts >= edge.last_ns:
                edge.last_ns = ts
                edge.last_dropped = dropped
                if dropped:
                    edge.last_drop_reason = flow_pb2.DropReason.Name(flow.drop_reason_desc) \
                        if flow.drop_reason_desc in flow_pb2.DropReason.values() else str(flow.drop_reason)
            if port := _port(flow):
                if len(edge.ports) < 16:
                    edge.ports.add(port)
            identity = _identity(flow)
            if identity and (identity in edge.identities or len(edge.identities) < 8):
                edge.identities[identity] = edge.identities.get(identity, 0) + 1
            for policy in _deciding_policies(flow):
                if len(edge.policies) < 8:
                    edge.policies.add(policy)

    def _note_node(self, key: NodeKey, flow: flow_pb2.Flow) -> None:
        info = self.nodes.get(key)
        if info is None:
            info = self.nodes[key] = {"pods": set(), "identities": set(), "last_ns": 0}
        info["last_ns"] = max(info["last_ns"], flow.time.ToNanoseconds())
        for endpoint in (flow.source, flow.destination):
            if key.kind == "workload" and endpoint.pod_name and endpoint.namespace == key.namespace and (
                    (endpoint.workloads and endpoint.workloads[0].name == key.name)
                    or endpoint.pod_name == key.name):
                if len(info["pods"]) < 64:
                    info["pods"].add(endpoint.pod_name)
                if endpoint.identity and len(info["identities"]) < 8:
                    info["identities"].add(endpoint.identity)

    def _expire(self, force: bool = False) -> None:
        horizon = self.newest_ns - self.expire_ns
        for key, edge in list(self.edges.items()):
            if edge.last_ns < horizon:
                del self.edges[key]
        if force and len(self.edges) >= self.max_edges:
            oldest = min(self.edges.values(), key=lambda e: e.last_ns)
            del self.edges[(oldest.source, oldest.destination)]
        live = {k for edge in self.edges.values() for k in (edge.source, edge.destination)}
        for key in list(self.nodes):
            if key not in live:
                del self.nodes[key]

    def snapshot(self, now_ns: int, namespace: str | None = None) -> dict:
        """Nodes and edges (for one namespace: edges touching it) as plain JSON data."""
        self.newest_ns = max(self.newest_ns, now_ns)
        self._expire()
        window_start = now_ns - self.window_ns
        window_s = self.window_ns / 1e9
        edges, used = [], set()
        for edge in self.edges.values():
            if namespace and namespace not in (edge.source.namespace, edge.destination.namespace):
                continue
            samples = edge.samples
            while samples and samples[0].ts_ns < window_start:
                samples.popleft()
            connections = {s.connection for s in samples if s.connection is not None}
            # A connection is mTLS when any observation of it was encrypted (the in-pod
            # connect() never is; the proxy's records of the same socket are).
            encrypted_connections = {s.connection for s in samples if s.connection is not None and s.encrypted}
            requests = sum(s.request for s in samples)
            responses = sum(s.response for s in samples)
            errors = sum(s.error for s in samples)
            encrypted = sum(s.encrypted for s in samples)
            drops = sum(s.dropped for s in samples)
            total = len(samples)
            attempts = responses or len(connections)
            edges.append({
                "id": f"{edge.source.id}->{edge.destination.id}",
                "source": edge.source.id, "target": edge.destination.id,
                "verdict": "denied" if edge.last_dropped else "forwarded",
                "drop_reason": edge.last_drop_reason if edge.last_dropped else "",
                "mtls": _mtls(len(encrypted_connections), len(connections)) if connections
                else _mtls(encrypted, total),
                "connections_per_s": round(len(connections) / window_s, 2),
                "requests_per_s": round(requests / window_s, 2),
                "drops_per_s": round(drops / window_s, 2),
                "error_rate": round(errors / attempts, 3) if attempts else 0.0,
                "active": total > 0,
                "last_seen_ns": edge.last_ns,
                "identities": sorted(edge.identities),
                "ports": sorted(edge.ports),
                "policies": sorted(edge.policies),
            })
            used.update((edge.source, edge.destination))
        nodes = []
        for key in sorted(used, key=lambda k: k.id):
            info = self.nodes.get(key, {"pods": set(), "identities": set()})
            nodes.append({"id": key.id, "kind": key.kind, "namespace": key.namespace, "name": key.name,
                          "pods": sorted(info["pods"]), "identities": sorted(info["identities"])})
        edges.sort(key=lambda e: e["id"])
        return {"nodes": nodes, "edges": edges, "window_s": window_s, "now_ns": now_ns}


def _mtls(encrypted: int, total: int) -> str:
    if not total or not encrypted:
        return "none"
    return "all" if encrypted == total else "partial"


def _source_port(flow: flow_pb2.Flow) -> int:
    l4 = flow.l4
    which = l4.WhichOneof("protocol")
    return getattr(l4, which).source_port if which in ("TCP", "UDP", "SCTP") else 0


def _deciding_policies(flow: flow_pb2.Flow) -> list[str]:
    """"namespace/name" of the policies that denied the flow (Hubble's *_denied_by)."""
    return [f"{policy.namespace}/{policy.name}"
            for policy in (*flow.egress_denied_by, *flow.ingress_denied_by)]

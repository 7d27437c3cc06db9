"""Synchronous calls to the relay (or any Hubble Observer) for the CLI."""
from __future__ import annotations

from collections.abc import Iterator

import grpc

from shoal.api.observer import observer_pb2, observer_pb2_grpc
from shoal.config import ClusterLayout


class ObserverUnreachable(Exception):
    pass


def server_address(layout: ClusterLayout, server: str | None) -> str:
    """``--server``: "host:port", "unix:/path" or a socket path; default: the cluster's relay socket."""
    if not server:
        return f"unix:{layout.relay_socket}"
    if server.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return server
    if server.startswith("/"):
        return f"unix:{server}"
    return server


class ObserverClient:
    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = observer_pb2_grpc.ObserverStub(self._channel)

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise self._explain(error) from None

    def _explain(self, error: grpc.RpcError) -> Exception:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ObserverUnreachable(
                f"cannot reach the flow relay at {self.address} ({error.details()}); is the cluster up (shoal up)?")
        return error

    def server_status(self) -> observer_pb2.ServerStatusResponse:
        return self._unary(self._stub.ServerStatus, observer_pb2.ServerStatusRequest())

    def nodes(self) -> observer_pb2.GetNodesResponse:
        return self._unary(self._stub.GetNodes, observer_pb2.GetNodesRequest())

    def namespaces(self) -> observer_pb2.GetNamespacesResponse:
        return self._unary(self._stub.GetNamespaces, observer_pb2.GetNamespacesRequest())

    def flows(self, request: observer_pb2.GetFlowsRequest) -> Iterator[observer_pb2.GetFlowsResponse]:
        call = self._stub.GetFlows(request)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._explain(error) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()


def status_summary(layout: ClusterLayout | None = None, server: str | None = None) -> dict:
    """What ``shoal status`` shows about flows: current/max, flows/s (over the last minute),
    connected nodes, and per node its flow server's state and version.

    Raises ObserverUnreachable when the relay does not answer.
    """
    client = ObserverClient(server_address(layout or ClusterLayout.from_env(), server), timeout_s=3.0)
    try:
        status = client.server_status()
        nodes = client.nodes().nodes
    finally:
        client.close()
    from shoal.api.observer import relay_pb2

    return {
        "per_node": {node.name: {"state": relay_pb2.NodeState.Name(node.state), "version": node.version,
                                 "flows": node.num_flows, "seen": node.seen_flows}
                     for node in nodes},
        "flows": {"current": status.num_flows, "max": status.max_flows, "seen": status.seen_flows,
                  "rate": round(status.flows_rate, 2)},
        "nodes": {"connected": status.num_connected_nodes.value,
                  "unavailable": list(status.unavailable_nodes)},
        "version": status.version,
    }

"""Synchronous calls to the relay (or any Hubble Observer) for the CLI."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import grpc

from shoal.api.observer import observer_pb2, observer_pb2_grpc
from shoal.config import ClusterLayout
from shoal.hubbletls import CLI_CLIENT, RELAY_SERVER_NAME, HubbleCertificates, TlsFiles


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


@dataclass(frozen=True)
class Connection:
    """Where the relay is and how to reach it: its Unix socket (local, plaintext), or TCP
    with TLS and a client certificate from the Hubble CA (the cluster's CLI certificate by
    default, or Hubble's flags), or plaintext TCP only when asked for (``--insecure``)."""

    address: str
    tls: TlsFiles | None = None
    server_name: str = ""

    def channel(self, aio: bool = False):
        grpc_module = grpc.aio if aio else grpc
        if self.tls is None:
            return grpc_module.insecure_channel(self.address)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc_module.secure_channel(self.address, self.tls.channel_credentials(), options)


def tls_options(func):
    """Hubble's TLS flags, on every command that talks to the relay."""
    for decls, doc in ((("--tls-ca-cert-files", "tls_ca"), "CA certificate of the relay (PEM)"),
                       (("--tls-client-cert-file", "tls_cert"), "client certificate (PEM)"),
                       (("--tls-client-key-file", "tls_key"), "client key (PEM)"),
                       (("--tls-server-name", "tls_server_name"), "name the relay's certificate carries")):
        func = click.option(*decls, help=doc)(func)
    return click.option("--insecure", is_flag=True,
                        help="Plaintext TCP to a relay started without TLS (local use only).")(func)


def connection(layout: ClusterLayout, server: str | None, tls_ca: str | None = None, tls_cert: str | None = None,
               tls_key: str | None = None, tls_server_name: str | None = None, insecure: bool = False) -> Connection:
    address = server_address(layout, server)
    if address.startswith("unix:") or insecure:
        return Connection(address)
    if tls_ca or tls_cert or tls_key:
        if not (tls_ca and tls_cert and tls_key):
            raise click.UsageError("--tls-ca-cert-files, --tls-client-cert-file and --tls-client-key-file go together")
        files = TlsFiles(Path(tls_ca), Path(tls_cert), Path(tls_key))
    else:
        files = HubbleCertificates(layout.hubble_tls_dir).files(CLI_CLIENT)
        if not files.exists():
            raise click.UsageError(f"{address}: the relay requires mTLS and there is no client certificate in "
                                   f"{layout.hubble_tls_dir}; pass --tls-* flags (or --insecure)")
    return Connection(address, files, tls_server_name or RELAY_SERVER_NAME)


class ObserverClient:
    def __init__(self, address: "str | Connection", timeout_s: float = 10.0) -> None:
        target = address if isinstance(address, Connection) else Connection(address)
        self.address = target.address
        self.timeout_s = timeout_s
        self._channel = target.channel()
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

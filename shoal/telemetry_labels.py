"""Istio's standard metric labels, computed in one place for the node proxy and the waypoint.

Both proxies report the same connection or request with the same labels, as Istio's
"Standard Metrics" page defines them, so one dashboard query reads either reporter:

- ``*_principal``: the SPIFFE ID with its scheme (``spiffe://cluster.local/ns/demo/sa/web``);
- ``destination_service``: the Service's FQDN (``web.demo.svc.cluster.local``), with
  ``destination_service_name``/``_namespace`` beside it;
- ``*_workload``: the owning workload's name (a Deployment's name for its pods; a bare Pod's
  own name), as the controller derives it from ownerReferences;
- ``*_canonical_service``/``_revision``: the ``service.istio.io/canonical-*`` labels, else
  ``app.kubernetes.io/name``/``version`` (then ``app``/``version``), else the workload name
  and ``latest``; ``*_app``/``*_version`` from the ``app``/``version`` labels.

Unknown values are ``unknown``, as in Istio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from shoal.xds.model import Service, Workload

UNKNOWN = "unknown"
CLUSTER_DOMAIN = "svc.cluster.local"
CLUSTER_ID = "Kubernetes"       # Istio's default cluster ID (one cluster)

# Labels of Istio's TCP metrics (istio_tcp_*), in this order.
TCP_LABELS = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_canonical_service", "destination_canonical_revision",
    "destination_service", "destination_service_name", "destination_service_namespace", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)
# Labels of Istio's request metrics (istio_requests_total and friends).
REQUEST_LABELS = TCP_LABELS + ("response_code", "grpc_response_status")

_CANONICAL_NAME = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


@dataclass(frozen=True)
class PeerLabels:
    """One side (source or destination) of a connection or request."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN


UNKNOWN_PEER = PeerLabels()


def principal(identity: str | None) -> str:
    """A SPIFFE ID as Istio writes it: with ``spiffe://``."""
    if not identity:
        return UNKNOWN
    return identity if identity.startswith("spiffe://") else f"spiffe://{identity}"


def _first(labels: Mapping[str, str], keys: tuple[str, ...]) -> str:
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return ""


def workload_name(workload: Workload) -> str:
    return workload.workload_name or workload.name


def canonical_service(workload: Workload) -> str:
    return _first(workload.labels, _CANONICAL_NAME) or workload_name(workload)


def canonical_revision(labels: Mapping[str, str]) -> str:
    return _first(labels, _CANONICAL_REVISION) or "latest"


def peer(workload: Workload | None, identity: str | None = None) -> PeerLabels:
    """The labels of one side; ``identity`` (the peer's certificate) wins over the workload's."""
    if workload is None:
        return PeerLabels(principal=principal(identity)) if identity else UNKNOWN_PEER
    labels = workload.labels
    return PeerLabels(
        workload=workload_name(workload), namespace=workload.namespace,
        principal=principal(identity or workload.spiffe_id),
        app=labels.get("app") or labels.get("app.kubernetes.io/name") or UNKNOWN,
        version=labels.get("version") or labels.get("app.kubernetes.io/version") or UNKNOWN,
        canonical_service=canonical_service(workload), canonical_revision=canonical_revision(labels),
        cluster=CLUSTER_ID)


def service_fqdn(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.{CLUSTER_DOMAIN}"


@dataclass(frozen=True)
class ServiceLabels:
    fqdn: str = UNKNOWN
    name: str = UNKNOWN
    namespace: str = UNKNOWN

    @classmethod
    def of(cls, name: str, namespace: str) -> "ServiceLabels":
        return cls(service_fqdn(name, namespace), name, namespace)

    @classmethod
    def from_fqdn(cls, fqdn: str) -> "ServiceLabels":
        name, _, rest = fqdn.partition(".")
        namespace, _, domain = rest.partition(".")
        if not name or not namespace or domain != CLUSTER_DOMAIN:
            return UNKNOWN_SERVICE if fqdn in ("", UNKNOWN) else cls(fqdn, UNKNOWN, UNKNOWN)
        return cls(fqdn, name, namespace)


def service_of_endpoint(services: Iterable[Service], workload: Workload | None, port: int) -> "ServiceLabels":
    """The Service a connection to ``workload``'s ``port`` was for, as the destination side
    sees it (the first Service with that workload behind that target port)."""
    if workload is None:
        return UNKNOWN_SERVICE
    for service in services:
        if workload.uid in service.endpoints and any((p.target_port or p.port) == port for p in service.ports):
            return ServiceLabels.of(service.name, service.namespace)
    return UNKNOWN_SERVICE


UNKNOWN_SERVICE = ServiceLabels()


def standard_labels(reporter: str, source: PeerLabels, destination: PeerLabels, service: ServiceLabels,
                    request_protocol: str, response_flags: str, mtls: bool) -> tuple[str, ...]:
    """Values in ``TCP_LABELS`` order; request metrics append response_code, grpc_response_status."""
    return (
        reporter,
        source.workload, source.namespace, source.principal, source.app, source.version,
        source.canonical_service, source.canonical_revision, source.cluster,
        destination.workload, destination.namespace, destination.principal, destination.app,
        destination.version, destination.canonical_service, destination.canonical_revision,
        service.fqdn, service.name, service.namespace, destination.cluster,
        request_protocol, response_flags or "-", "mutual_tls" if mtls else "none",
    )

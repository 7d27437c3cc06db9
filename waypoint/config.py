"""The waypoint's configuration: one frozen dataclass, built once from flags and environment."""
from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from shoal.config import (
    DEFAULT_TRUST_DOMAIN,
    PORT_HBONE,
    PORT_PROXY_METRICS,
    PORT_PROXY_READY,
    ClusterLayout,
    cluster_name,
    spiffe_id,
)
from shoal.hbone import handshakes
from shoal.hbone.handshakes import HandshakeLimits

from .http import Limits


def _address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]   # "[::]:15008", "[fd00::1]:8080"
    return host or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """True for an address literal only this host can reach (127.0.0.0/8, ::1); a name or a
    wildcard (0.0.0.0, ::) is not."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WaypointConfig:
    name: str                                   # the Gateway's name
    namespace: str
    node: str = ""                              # where it runs (flows go to that node's agent)
    service_account: str = ""                   # default: the Gateway's name
    pod_ip: str = ""                            # own address: source of upstream HBONE
    layout: ClusterLayout = field(default_factory=ClusterLayout)
    controller: str = ""                        # config stream + CA; "" = none (static mode)
    token_file: str = ""
    ca_bundle: str = ""                         # verify the controller's TLS with it; "" = plaintext
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    hbone_address: tuple[str, int] = ("::", PORT_HBONE)   # both families (IPv4 too)
    # Plain HTTP, no identity: development and benchmarks only, never in the mesh. Loopback
    # unless plaintext_beyond_loopback (a benchmark outside the mesh) says otherwise.
    plaintext_address: tuple[str, int] | None = None
    metrics_port: int = PORT_PROXY_METRICS
    ready_port: int = PORT_PROXY_READY
    routes_file: str = ""                       # static HTTPRoutes/TrafficPolicies (YAML), besides the stream
    static_services: tuple[tuple[str, str, tuple[tuple[str, int], ...]], ...] = ()  # (ns, name, endpoints)
    access_log: str = "-"                       # "-" stdout, "" off, else a file path
    otlp_endpoint: str = ""                     # e.g. http://collector:4318/v1/traces; "" = no export
    emit_flows: bool = True
    fast_path: bool = True                      # plain HTTP/1.1 requests from callbacks (waypoint/fastpath.py)
    connect_timeout: float = 5.0
    drain_seconds: float = 2.5                  # on SIGTERM: in-flight connections finish (kubelet's grace is 3 s)
    limits: Limits = Limits()
    # The HBONE listener's door (shoal.hbone.gatekeeper), the same flags as the node proxy's.
    handshake_limits: HandshakeLimits = HandshakeLimits()
    cert_ttl_seconds: int = 0
    log_level: str = "INFO"
    flows_socket: str = ""                      # default: the node's flows socket in the cluster layout

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.namespace, self.service_account or self.name, self.trust_domain)

    @property
    def flows_path(self) -> str:
        if self.flows_socket:   # a local-cluster pod sees the node's socket where its hostPath volume puts it
            return self.flows_socket
        return str(self.layout.flows_socket(self.node)) if self.node else ""

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "WaypointConfig":
        env = os.environ if env is None else env
        p = argparse.ArgumentParser(prog="python -m shoal.waypoint", description="Shoal waypoint (L7 proxy)")
        p.add_argument("--name", default=env.get("SHOAL_WAYPOINT_NAME"), help="Gateway name (env SHOAL_WAYPOINT_NAME)")
        p.add_argument("--namespace", default=env.get("SHOAL_WAYPOINT_NAMESPACE"), help="Gateway namespace")
        p.add_argument("--service-account", default=env.get("SHOAL_WAYPOINT_SERVICE_ACCOUNT", ""),
                       help="default: the Gateway's name")
        p.add_argument("--node", default=env.get("SHOAL_NODE") or env.get("NODE_NAME", ""))
        p.add_argument("--pod-ip", default=env.get("SHOAL_POD_IP") or env.get("POD_IP", ""))
        p.add_argument("--cluster", default=cluster_name(env))
        p.add_argument("--controller", default=env.get("SHOAL_CONTROLLER", ""))
        p.add_argument("--token-file", default=env.get("SHOAL_TOKEN_FILE", ""))
        p.add_argument("--ca-bundle", default=env.get("SHOAL_CA_BUNDLE", ""),
                       help="root certificate(s) of the controller's TLS (env SHOAL_CA_BUNDLE)")
        p.add_argument("--trust-domain", default=env.get("SHOAL_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN))
        p.add_argument("--hbone", default=f"[::]:{PORT_HBONE}",
                       help="HBONE listen address ([::]: both IPv6 and IPv4, the default)")
        p.add_argument("--plaintext", default="", metavar="HOST:PORT",
                       help="also serve plain HTTP here, without mTLS or identities (development, benchmarks); "
                            "a loopback address unless --plaintext-beyond-loopback")
        p.add_argument("--plaintext-beyond-loopback", action="store_true",
                       help="let --plaintext listen where other pods can reach it: plain HTTP that bypasses the "
                            "mesh's mTLS and identities, for a benchmark outside any mesh only")
        p.add_argument("--metrics-port", type=int, default=PORT_PROXY_METRICS)
        p.add_argument("--ready-port", type=int, default=PORT_PROXY_READY)
        p.add_argument("--routes-file", default="", help="YAML with HTTPRoute/TrafficPolicy objects")
        p.add_argument("--static-service", action="append", default=[],
                       help="NS/NAME=IP:PORT[,IP:PORT...]: endpoints without a control plane (plain TCP); "
                            "the first also serves Hosts that name no known service")
        p.add_argument("--access-log", default=env.get("SHOAL_ACCESS_LOG", "-"))
        p.add_argument("--otlp-endpoint", default=env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""))
        p.add_argument("--no-flows", action="store_true", help="do not send L7 flow events to the node agent")
        p.add_argument("--no-fast-path", action="store_true",
                       help="serve every request through the pipeline (the fast path's reference, for A/B runs)")
        # An instance's: Limits is compiled (mypyc), whose class attributes are not the defaults.
        limit_defaults = Limits()
        p.add_argument("--header-timeout", type=float, default=limit_defaults.header_timeout)
        p.add_argument("--max-header-bytes", type=int, default=limit_defaults.max_header_bytes)
        p.add_argument("--max-headers", type=int, default=limit_defaults.max_headers)
        p.add_argument("--drain-seconds", type=float, default=2.5,
                       help="on SIGTERM, how long connections in flight may take to finish")
        p.add_argument("--cert-ttl", type=int, default=int(env.get("SHOAL_CERT_TTL", 0)))
        p.add_argument("--log-level", default=env.get("SHOAL_LOG_LEVEL", "INFO"))
        handshakes.add_flags(p)
        args = p.parse_args(argv)
        handshake_limits = handshakes.limits_from_args(p, args)
        if not args.name or not args.namespace:
            p.error("--name and --namespace (or SHOAL_WAYPOINT_NAME/_NAMESPACE) are required")
        if args.header_timeout <= 0 or args.max_header_bytes < 1024 or args.max_headers < 1:
            p.error("limits must be positive (max-header-bytes at least 1024)")
        try:
            hbone = _address(args.hbone, "--hbone")
            plaintext = _address(args.plaintext, "--plaintext") if args.plaintext else None
            if plaintext is not None and not is_loopback(plaintext[0]) and not args.plaintext_beyond_loopback:
                raise ValueError(f"--plaintext {args.plaintext} is reachable beyond this host: plain HTTP there "
                                 "bypasses the mesh's mTLS; listen on 127.0.0.1 or [::1], or add "
                                 "--plaintext-beyond-loopback for a benchmark outside the mesh")
            static = tuple(_static_service(s) for s in args.static_service)
        except ValueError as err:
            p.error(str(err))
        limits = Limits(max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
                        header_timeout=args.header_timeout)
        return cls(name=args.name, namespace=args.namespace, node=args.node, service_account=args.service_account,
                   pod_ip=args.pod_ip, layout=ClusterLayout(name=args.cluster), controller=args.controller,
                   token_file=args.token_file, ca_bundle=args.ca_bundle, trust_domain=args.trust_domain, hbone_address=hbone,
                   plaintext_address=plaintext, metrics_port=args.metrics_port, ready_port=args.ready_port,
                   routes_file=args.routes_file, static_services=static, access_log=args.access_log,
                   otlp_endpoint=args.otlp_endpoint, emit_flows=not args.no_flows, limits=limits,
                   handshake_limits=handshake_limits,
                   fast_path=not args.no_fast_path,
                   cert_ttl_seconds=args.cert_ttl, drain_seconds=max(0.0, args.drain_seconds),
                   log_level=args.log_level.upper(), flows_socket=env.get("SHOAL_FLOWS_SOCKET", ""))


def _static_service(text: str) -> tuple[str, str, tuple[tuple[str, int], ...]]:
    name, sep, endpoints = text.partition("=")
    namespace, slash, service = name.partition("/")
    if not sep or not slash or not namespace or not service or not endpoints:
        raise ValueError(f"--static-service: expected NS/NAME=IP:PORT[,IP:PORT], got {text!r}")
    return namespace, service, tuple(_address(e, "--static-service") for e in endpoints.split(","))

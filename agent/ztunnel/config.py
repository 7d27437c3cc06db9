"""The node proxy's configuration: one frozen dataclass, built from flags and env once."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from shoal.config import (
    DEFAULT_TRUST_DOMAIN,
    PORT_PROXY_ADMIN,
    PORT_PROXY_METRICS,
    PORT_PROXY_READY,
    ClusterLayout,
    cluster_name,
)
from shoal.hbone import handshakes
from shoal.hbone.handshakes import HandshakeLimits


@dataclass(frozen=True)
class ProxyConfig:
    node: str
    layout: ClusterLayout = field(default_factory=ClusterLayout)
    controller: str = ""                 # host:port of the config stream + CA; "" = none
    token_file: str = ""
    ca_bundle: str = ""                  # verify the controller's TLS with it; "" = plaintext
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    admin_address: str = "127.0.0.1"     # admin is loopback only
    admin_port: int = PORT_PROXY_ADMIN
    http_address: str = "0.0.0.0"        # metrics and readiness (the node's netns)
    metrics_port: int = PORT_PROXY_METRICS
    ready_port: int = PORT_PROXY_READY
    connect_timeout: float = 5.0         # upstream TCP connect; a 200 from a peer that answers nothing
    answer_limit: float = 60.0           # a 200 from a busy peer that keeps answering others
    pool_idle_timeout: float = 60.0      # HBONE connections with no stream are closed after this
    drain_grace: float = 30.0            # after a handover, live connections get this long
    handover_wait: float = 10.0          # how long a retiring proxy waits for its successor
    cert_ttl_seconds: int = 0            # asked of the CA; 0 = the CA's default
    rotation_check_interval: float = 5.0
    # Overload (issue 18): past these a NEW connection is refused (RST, metric
    # reason="overloaded"); established ones keep being served. max_connections 0 =
    # derived from the open-file limit (two sockets per proxied connection, at worst).
    max_connections_in_setup: int = 8192
    # Inbound HBONE streams (CONNECTs) in setup: past it a NEW stream is reset with
    # REFUSED_STREAM (reason="stream_overloaded"). As many as one peer's setups can be.
    max_streams_in_setup: int = 8192
    max_connections: int = 0
    # Shedding on queueing delay (agent/ztunnel/shedding.py): once connections have waited
    # longer than the target for an interval and their backlog is not draining, those
    # that waited past the target are refused (RST, reason="queue_delay"). 0: off.
    overload_target: float = 1.0
    overload_interval: float = 10.0
    upstream_dials_per_identity: int = 256   # concurrent app connects per HBONE peer identity
    # 15008's door (shoal.hbone.gatekeeper): TLS handshakes in progress per source and per
    # worker, failures before the penalty box, its waits, and the handshake timeout (also
    # that of our own outbound HBONE dials). The waypoint has the same flags.
    handshake_limits: HandshakeLimits = HandshakeLimits()
    # Worker processes (issue 13): a supervisor (config stream, certificates, ZDS, admin,
    # metrics, handover) and N workers sharing the in-pod listeners, also for N = 1 (the
    # README says why). single_process: no supervisor, one process does everything.
    workers: int = 1
    single_process: bool = False
    # Set only in a worker the supervisor started: its index and the inherited fds of its
    # pod-handover channel (one end of a SEQPACKET socketpair) and of its feed of config
    # and certificates (one end of a STREAM socketpair, feed.py). -1 = not a worker.
    worker_index: int = -1
    worker_channel_fd: int = -1
    worker_feed_fd: int = -1
    # Same-node kernel bypass (bypass.py): on unless turned off (--no-same-node-bypass,
    # SHOAL_PROXY_SAME_NODE_BYPASS=0); the security argument is in the README.
    same_node_bypass: bool = True
    # ... and the apps' own sockets of a joined pair send straight into the proxy's socket
    # toward the other app (bpf/sk_msg_join.c): off unless turned on (--same-node-app-join,
    # SHOAL_PROXY_SAME_NODE_APP_JOIN=1); why it is off is in the README.
    same_node_app_join: bool = False
    log_level: str = "INFO"

    @property
    def is_worker(self) -> bool:
        return self.worker_index >= 0

    @property
    def zds_path(self) -> str:
        return str(self.layout.zds_socket(self.node))

    @property
    def flows_path(self) -> str:
        return str(self.layout.flows_socket(self.node))

    @property
    def node_dir(self) -> str:
        return str(self.layout.node_dir(self.node))

    def worker_admin_path(self, pid: int) -> str:
        """Where worker ``pid`` serves its pages (admin, metrics, readiness, status) to the
        supervisor: a Unix socket in the node's private directory, not a port."""
        return str(self.layout.node_dir(self.node) / f"proxy-worker-{pid}.sock")

    @property
    def workers_status_path(self) -> str:
        """The supervisor's per-worker report (pid, connections, health), read by ``shoal status``."""
        return str(self.layout.node_dir(self.node) / "proxy-workers.json")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "ProxyConfig":
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(prog="python -m shoal.agent.ztunnel", description="Shoal node proxy")
        parser.add_argument("--node", default=env.get("SHOAL_NODE"), help="node name (env SHOAL_NODE)")
        parser.add_argument("--cluster", default=cluster_name(env))
        parser.add_argument("--controller", default=env.get("SHOAL_CONTROLLER", ""))
        parser.add_argument("--token-file", default=env.get("SHOAL_TOKEN_FILE", ""))
        parser.add_argument("--ca-bundle", default=env.get("SHOAL_CA_BUNDLE", ""),
                            help="root certificate(s) of the controller's TLS (env SHOAL_CA_BUNDLE)")
        parser.add_argument("--trust-domain", default=env.get("SHOAL_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN))
        parser.add_argument("--admin-port", type=int, default=PORT_PROXY_ADMIN)
        parser.add_argument("--metrics-port", type=int, default=PORT_PROXY_METRICS)
        parser.add_argument("--ready-port", type=int, default=PORT_PROXY_READY)
        parser.add_argument("--drain-grace", type=float, default=float(env.get("SHOAL_PROXY_DRAIN_GRACE", 30)))
        parser.add_argument("--max-connections", type=int, default=int(env.get("SHOAL_PROXY_MAX_CONNECTIONS", 0)),
                            help="live connections before new ones are refused (0: from the open-file limit)")
        parser.add_argument("--overload-target", type=float,
                            default=float(env.get("SHOAL_PROXY_OVERLOAD_TARGET", 1.0)),
                            help="seconds a connection may wait for its setup before an overloaded proxy "
                                 "refuses it (0: no shedding on delay)")
        parser.add_argument("--overload-interval", type=float,
                            default=float(env.get("SHOAL_PROXY_OVERLOAD_INTERVAL", 10.0)),
                            help="seconds a standing delay must last before shedding starts")
        parser.add_argument("--cert-ttl", type=int, default=int(env.get("SHOAL_CERT_TTL", 0)),
                            help="SVID lifetime to ask the CA for, seconds (0: CA default)")
        parser.add_argument("--workers", type=int, default=int(env.get("SHOAL_PROXY_WORKERS", 0)),
                            help="worker processes (env SHOAL_PROXY_WORKERS; 0: one per core this "
                                 "process may run on); each worker is started by a supervisor")
        parser.add_argument("--single-process", action="store_true",
                            default=env.get("SHOAL_PROXY_SINGLE_PROCESS", "0") not in ("0", "false", "no", "off", ""),
                            help="one process without a supervisor or workers (env SHOAL_PROXY_SINGLE_PROCESS): "
                                 "the smallest node total, but a crash loses every connection and the "
                                 "config stream; --workers is then ignored")
        parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "INDEX:ZDS_FD:FEED_FD", by the supervisor
        parser.add_argument("--same-node-bypass", action=argparse.BooleanOptionalAction,
                            default=env.get("SHOAL_PROXY_SAME_NODE_BYPASS", "1") not in ("0", "false", "no", "off"),
                            help="join same-node pod connections in the kernel instead of an HBONE tunnel "
                                 "(env SHOAL_PROXY_SAME_NODE_BYPASS; default on)")
        parser.add_argument("--same-node-app-join", action=argparse.BooleanOptionalAction,
                            default=env.get("SHOAL_PROXY_SAME_NODE_APP_JOIN", "0") not in ("0", "false", "no", "off", ""),
                            help="with the bypass, let the apps' own sockets of a joined pair send straight into "
                                 "the proxy's socket toward the other app (env SHOAL_PROXY_SAME_NODE_APP_JOIN; "
                                 "default off)")
        parser.add_argument("--log-level", default=env.get("SHOAL_LOG_LEVEL", "INFO"))
        handshakes.add_flags(parser)
        args = parser.parse_args(argv)
        handshake_limits = handshakes.limits_from_args(parser, args)
        if args.workers < 0:
            parser.error("--workers must be 0 (one per core) or more")
        workers = args.workers or default_workers()
        worker_index, worker_fd, feed_fd = -1, -1, -1
        if args.worker:
            try:
                worker_index, worker_fd, feed_fd = (int(part) for part in args.worker.split(":"))
            except ValueError:
                parser.error(f"--worker must be INDEX:ZDS_FD:FEED_FD, got {args.worker!r}")
        if not args.node:
            parser.error("--node (or SHOAL_NODE) is required")
        if args.drain_grace < 0 or args.cert_ttl < 0 or args.max_connections < 0:
            parser.error("timeouts and TTL must be positive")
        if args.overload_target < 0 or args.overload_interval <= 0:
            parser.error("--overload-target must be 0 (off) or more, --overload-interval positive")
        if env.get("SHOAL_MODE") == "kubernetes":
            from shoal.kubernetes import layout_from_env
            layout = layout_from_env(env)      # the same host paths as the agent (DaemonSet env)
        else:
            layout = ClusterLayout(name=args.cluster)
        token_file = args.token_file or (
            "" if env.get("SHOAL_MODE") == "kubernetes" else str(layout.node_credential_path(args.node)))
        return cls(node=args.node, layout=layout, controller=args.controller,
                   token_file=token_file, ca_bundle=args.ca_bundle, trust_domain=args.trust_domain, admin_port=args.admin_port,
                   metrics_port=args.metrics_port, ready_port=args.ready_port,
                   drain_grace=args.drain_grace,
                   max_connections=args.max_connections, overload_target=args.overload_target,
                   overload_interval=args.overload_interval,
                   workers=1 if args.single_process else workers, single_process=args.single_process,
                   worker_index=worker_index, worker_channel_fd=worker_fd, worker_feed_fd=feed_fd,
                   cert_ttl_seconds=args.cert_ttl, same_node_bypass=args.same_node_bypass,
                   same_node_app_join=args.same_node_app_join,
                   handshake_limits=handshake_limits, log_level=args.log_level.upper())


def default_workers() -> int:
    """One worker per core this process may run on (its CPU affinity, so a pod's cpuset or
    a taskset is honoured, not the machine's core count)."""
    return max(1, len(os.sched_getaffinity(0)))

"""The agent's configuration: one frozen dataclass, read from flags and environment here."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from shoal.agent.loader import FeatureFlags
from shoal.config import (
    LOCAL_CONTROLLER_ADDRESS,
    PORT_AGENT_METRICS,
    PORT_HBONE,
    PORT_INBOUND_PLAINTEXT,
    PORT_OUTBOUND,
    ClusterLayout,
    cluster_name,
)


@dataclass(frozen=True)
class AgentConfig:
    node: str
    layout: ClusterLayout
    controller: str
    token_file: Path
    ca_bundle: Path | None = None        # verify the controller's TLS with it; None: plaintext
    metrics_address: str = "0.0.0.0"
    metrics_port: int = PORT_AGENT_METRICS
    flow_events: bool = True
    hubble: bool = True
    resync_interval: float = 1.0     # enrolment retry pass (pods whose netns is not there yet)
    audit_interval: float = 3.0      # capture audit pass: drift is found within this (plus one pass)
    log_level: str = "INFO"
    bpf_source_dir: Path | None = None   # development: load programs from another tree

    @property
    def pin_dir(self) -> Path:
        return self.layout.bpf_pin_dir(self.node)

    @property
    def node_cgroup(self) -> Path:
        return self.layout.node_cgroup(self.node)

    @property
    def zds_socket(self) -> Path:
        return self.layout.zds_socket(self.node)

    @property
    def enrolment_state(self) -> Path:
        from shoal.agent.uninstall import enrolment_state_path
        return enrolment_state_path(self.layout, self.node)

    @property
    def features(self) -> FeatureFlags:
        return FeatureFlags(PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_HBONE,
                            flow_events=self.flow_events)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "AgentConfig":
        """Built once, here, from flags and the environment (flags win)."""
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(prog="python -m shoal.agent", description="Shoal node agent (eBPF data path)")
        parser.add_argument("--node", default=env.get("SHOAL_NODE"), required="SHOAL_NODE" not in env)
        parser.add_argument("--cluster", default=cluster_name(env))
        parser.add_argument("--controller", default=env.get("SHOAL_CONTROLLER"))
        parser.add_argument("--token-file", default=env.get("SHOAL_TOKEN_FILE"))
        parser.add_argument("--ca-bundle", default=env.get("SHOAL_CA_BUNDLE"),
                            help="root certificate(s) of the controller's TLS (env SHOAL_CA_BUNDLE)")
        parser.add_argument("--metrics-address", default=env.get("SHOAL_AGENT_METRICS_ADDRESS", "0.0.0.0"))
        parser.add_argument("--metrics-port", type=int, default=int(env.get("SHOAL_AGENT_METRICS_PORT", PORT_AGENT_METRICS)))
        parser.add_argument("--no-flow-events", action="store_true")
        parser.add_argument("--no-hubble", action="store_true")
        parser.add_argument("--log-level", default=env.get("SHOAL_LOG_LEVEL", "INFO"))
        parser.add_argument("--audit-interval", type=float, default=env.get("SHOAL_AUDIT_INTERVAL", "3.0"),
                            help="seconds between capture audit passes (0.2-5; env SHOAL_AUDIT_INTERVAL)")
        parser.add_argument("--bpf-source-dir", default=env.get("SHOAL_BPF_SOURCE_DIR"),
                            help="load the C programs from this directory instead of the installed ones")
        args = parser.parse_args(argv)
        if env.get("SHOAL_MODE") == "kubernetes":
            from shoal.kubernetes import layout_from_env
            layout = layout_from_env(env)      # host paths of a real node (DaemonSet env)
        else:
            layout = ClusterLayout(name=args.cluster)
        if not 0.2 <= args.audit_interval <= 5.0:
            parser.error(f"--audit-interval must be 0.2-5 seconds, got {args.audit_interval}")
        if not 0 < args.metrics_port < 65536:
            parser.error(f"--metrics-port must be 1..65535, got {args.metrics_port}")
        if env.get("SHOAL_MODE") != "kubernetes":   # a real node's name is whatever the cloud gave it
            try:
                layout.node_index(args.node)
            except (IndexError, ValueError):
                parser.error(f"--node must look like node-<n> in a local cluster, got {args.node!r}")
        return cls(
            node=args.node, layout=layout,
            controller=args.controller or LOCAL_CONTROLLER_ADDRESS,
            token_file=Path(args.token_file) if args.token_file else layout.node_credential_path(args.node),
            ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
            metrics_address=args.metrics_address, metrics_port=args.metrics_port,
            flow_events=not args.no_flow_events, hubble=not args.no_hubble, log_level=args.log_level,
            audit_interval=args.audit_interval,
            bpf_source_dir=Path(args.bpf_source_dir) if args.bpf_source_dir else None,
        )

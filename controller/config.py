"""The controller's configuration: one frozen dataclass, read from flags and environment here."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from shoal.config import DEFAULT_TRUST_DOMAIN, PORT_CONTROLLER_GRPC, ClusterLayout


@dataclass(frozen=True)
class ControllerConfig:
    layout: ClusterLayout
    source: str = "local"                      # local | kubernetes
    grpc_address: str = f"0.0.0.0:{PORT_CONTROLLER_GRPC}"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    run_kubelet: bool = True                   # local mode: run pods for the store's Pods
    log_level: str = "INFO"

    @property
    def state_dir(self) -> Path:
        return self.layout.run_dir


def parse_config(argv: list[str] | None = None) -> ControllerConfig:
    parser = argparse.ArgumentParser(prog="python -m shoal.controller", description="Shoal controller")
    parser.add_argument("--cluster", default=os.environ.get("SHOAL_CLUSTER", "shoal"))
    parser.add_argument("--source", choices=("local", "kubernetes"), default=os.environ.get("SHOAL_SOURCE", "local"))
    parser.add_argument("--grpc-address", default=os.environ.get("SHOAL_GRPC_ADDRESS",
                                                                 f"0.0.0.0:{PORT_CONTROLLER_GRPC}"))
    parser.add_argument("--trust-domain", default=os.environ.get("SHOAL_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN))
    parser.add_argument("--no-kubelet", action="store_true", help="do not run the local cluster's pods")
    parser.add_argument("--log-level", default=os.environ.get("SHOAL_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    return ControllerConfig(layout=ClusterLayout(name=args.cluster), source=args.source,
                            grpc_address=args.grpc_address, trust_domain=args.trust_domain,
                            run_kubelet=args.source == "local" and not args.no_kubelet, log_level=args.log_level)

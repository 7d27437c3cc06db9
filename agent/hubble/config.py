"""The flow server's one frozen config, built in one place from the cluster layout."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shoal import __version__
from shoal.config import PORT_HUBBLE, ClusterLayout
from shoal.hubbletls import HubbleCertificates, TlsFiles

DEFAULT_CAPACITY = 4095


@dataclass(frozen=True)
class HubbleConfig:
    node_name: str
    # Unix datagram socket where the node proxy and waypoints send their flows.
    flows_socket: Path | None = None
    # Observer API on a Unix socket (local use) and on TCP (the relay's and the hubble CLI's).
    unix_socket: Path | None = None
    tcp_address: str | None = f"0.0.0.0:{PORT_HUBBLE}"
    # TCP is served only with TLS and a client certificate from the Hubble CA; without
    # certificates it is not served at all, unless plaintext is asked for (local use only).
    tls: TlsFiles | None = None
    insecure_tcp: bool = False
    capacity: int = DEFAULT_CAPACITY
    # Followers read the ring by position: one that falls a whole ring behind is cut, and
    # so is one stuck in a write (client not reading) for longer than this.
    slow_client_timeout_s: float = 5.0
    # How often the kernel's lost-record counter is turned into lost_events records.
    lost_poll_interval_s: float = 1.0
    version: str = f"shoal-{__version__}"

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"flow store capacity must be >= 1, got {self.capacity}")
        if self.slow_client_timeout_s <= 0:
            raise ValueError(f"slow client timeout must be > 0, got {self.slow_client_timeout_s}")

    @classmethod
    def for_node(cls, layout: ClusterLayout, node: str, **overrides) -> "HubbleConfig":
        """``SHOAL_HUBBLE_TLS_DIR`` (a mounted Secret on Kubernetes) or the local cluster's dir."""
        tls_dir = Path(os.environ.get("SHOAL_HUBBLE_TLS_DIR") or layout.hubble_tls_dir)
        tls = HubbleCertificates(tls_dir).node(node)
        overrides.setdefault("tls", tls if tls.exists() else None)
        overrides.setdefault("insecure_tcp", os.environ.get("SHOAL_HUBBLE_INSECURE_TCP") == "1")
        return cls(
            node_name=node,
            flows_socket=layout.flows_socket(node),
            unix_socket=layout.hubble_socket(node),
            **overrides,
        )

"""The flow server's one frozen config, built in one place from the cluster layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shoal import __version__
from shoal.config import PORT_HUBBLE, ClusterLayout

DEFAULT_CAPACITY = 4095


@dataclass(frozen=True)
class HubbleConfig:
    node_name: str
    # Unix datagram socket where the node proxy and waypoints send their flows.
    flows_socket: Path | None = None
    # Observer API on a Unix socket (the relay's way in) and on TCP (the hubble CLI's).
    unix_socket: Path | None = None
    tcp_address: str | None = f"0.0.0.0:{PORT_HUBBLE}"
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
        return cls(
            node_name=node,
            flows_socket=layout.flows_socket(node),
            unix_socket=layout.hubble_socket(node),
            **overrides,
        )

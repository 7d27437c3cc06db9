"""What every handler of the node proxy reads: the context built once by the app wiring,
and the pods it serves. Handlers (inbound, outbound) and the pod registry (proxy) import
this module; it imports none of them.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from shoal.agent.ztunnel.admission import Admission, DialLimits
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.agent.ztunnel.telemetry import ConnectionTelemetry, ProxyMetrics
from shoal.hbone.gatekeeper import Gatekeeper
from shoal.hbone.identity import Identities
from shoal.hbone.pool import HbonePool
from shoal.hbone.session import TCP_READ_BUFFER, ReadBuffer
from shoal.ratelog import LogLimiter
from shoal.xds.model import Workload, canonical_ip
from shoal.xds.state import ConfigState
from shoal.zds import PodInfo


class DestinationLookup(Protocol):
    """Accepted socket -> the (ip, port) the app dialled; LookupError when it was not captured.
    The agent's pinned map answers it (``shoal.datapath.origdst.OriginalDestinations``)."""

    def lookup(self, sock: socket.socket) -> tuple[str, int]: ...


class Listening(Protocol):
    """One in-pod listener (``proxy.Acceptor``)."""
    serving: bool

    def close(self) -> None: ...


@dataclass
class ProxyContext:
    """What the data path needs, built once by the app wiring and passed down."""
    config: ProxyConfig
    state: ConfigState
    identities: Identities
    metrics: ProxyMetrics
    telemetry: ConnectionTelemetry
    pool: HbonePool
    origdst: DestinationLookup | None
    home: NetnsHandle
    admission: Admission
    dial_limits: DialLimits
    inbound_sessions: set = field(default_factory=set)
    # What every tunnel's plain TCP socket reads into, one read at a time (one per worker).
    tcp_reads: ReadBuffer = field(default_factory=lambda: ReadBuffer(TCP_READ_BUFFER))
    # Log lines about HBONE peers that break the protocol or its limits: a line a second
    # per reason for the whole worker (the metrics count every one).
    hbone_log_limiter: LogLimiter = field(default_factory=LogLimiter)
    # 15008's door (shoal.hbone.gatekeeper, shared with the waypoint): sources cut off for
    # abuse refused at accept for a while; TLS handshakes in progress per source and
    # overall, and failing sources. Built from the config's limits.
    gatekeeper: Gatekeeper = field(init=False)
    # The pods this proxy serves, by uid (the pod registry's own dict): a destination
    # found here is on this node, which the same-node bypass needs to know.
    served_pods: dict[str, "ServedPod"] = field(default_factory=dict)
    bypass: Any = None   # bypass.SameNodeBypass, or None when turned off
    # The gatekeeper's boxings also written below userspace: (source, seconds) ->
    # its SYNs to 15008 dropped at tc (shoal.datapath.penaltybox); None without the map.
    kernel_box: Callable[[str, float], object] | None = None
    # Set once the config stream delivered its first snapshot: before that an unknown
    # destination might be a meshed pod, and guessing "plaintext" would leak.
    config_synced: asyncio.Event = field(default_factory=asyncio.Event)


    def __post_init__(self) -> None:
        self.gatekeeper = Gatekeeper(self.config.handshake_limits, lambda reason: self.metrics.reject("hbone", reason),
                                     self.hbone_log_limiter, on_boxed=self.kernel_box)


@dataclass
class ServedPod:
    """A pod this proxy serves: its ZDS record, namespace, identity and in-pod listeners."""
    info: PodInfo
    netns: NetnsHandle
    spiffe_id: str
    servers: list[Listening] = field(default_factory=list)
    sessions: set = field(default_factory=set)   # inbound HBONE sessions into this pod

    def workload_stub(self) -> Workload:
        """Our view of the pod before the config stream names it."""
        return Workload(uid=self.info.uid, name=self.info.name, namespace=self.info.namespace,
                        service_account=self.info.service_account, node="", ip=self.info.ip, identity=0,
                        spiffe_id=self.spiffe_id, meshed=True, ips=self.info.ips)

    def owns(self, address: str) -> bool:
        """Whether ``address`` is one of the pod's IPs (an IPv4-mapped form counts as IPv4)."""
        return canonical_ip(address) in self.info.ips

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    def describe(self) -> dict:
        return {"uid": self.info.uid, "namespace": self.info.namespace, "name": self.info.name,
                "ip": self.info.ip, "ips": list(self.info.ips), "identity": self.spiffe_id, "netns_inode": self.netns.inode,
                "listening": bool(self.servers) and all(s.serving for s in self.servers)}

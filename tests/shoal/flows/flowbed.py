"""Shared builders for the hubble tests: a small ConfigState and kernel events."""
from __future__ import annotations

import time
from dataclasses import dataclass

from shoal.xds import model as m
from shoal.xds.state import ConfigState

try:
    from shoal.flows.kernel import KernelFlowEvent
except ImportError:  # the agent's decoder lands separately; same fields (contract C)
    @dataclass
    class KernelFlowEvent:  # type: ignore[no-redef]
        ts_ns: int
        src_ip: str
        dst_ip: str
        src_port: int
        dst_port: int
        protocol: int
        src_identity: int
        dst_identity: int
        verdict: str
        drop_reason: int
        direction: str
        tcp_flags: int
        kind: str


def workload(name, ns, ip, identity, app, node="node-1", sa=None, owner=None):
    """``owner``: (kind, name) as the controller derives it; default a Deployment named ``app``."""
    sa = sa or app
    kind, owner_name = owner or ("Deployment", app)
    return m.Workload(
        uid=f"{ns}/{name}", name=name, namespace=ns, service_account=sa, node=node, ip=ip,
        identity=identity, spiffe_id=f"spiffe://cluster.local/ns/{ns}/sa/{sa}", meshed=True,
        labels=m.Labels({"app": app}), canonical_service=app, workload_name=owner_name, workload_kind=kind)


def demo_state() -> ConfigState:
    state = ConfigState()
    state.apply(m.ConfigDelta(version="1", upserted=(
        workload("client-0", "demo", "10.244.1.2", 1001, "client"),
        workload("web-0", "demo", "10.244.1.3", 1002, "web"),
        workload("web-1", "demo", "10.244.2.3", 1002, "web", node="node-2"),
        workload("client-0", "legacy", "10.244.2.9", 1003, "client", node="node-2"),
        m.Service(name="web", namespace="demo", vip="10.96.0.10",
                  ports=(m.ServicePort("http", 80, 8080),), endpoints=("demo/web-0", "demo/web-1")),
    )))
    return state


def kernel_event(src="10.244.1.2", dst="10.244.1.3", sport=40000, dport=8080, verdict="FORWARDED",
                 reason=0, direction="EGRESS", flags=0x02, kind="tc", ts_ns=None, protocol=6):
    return KernelFlowEvent(
        ts_ns=ts_ns if ts_ns is not None else time.monotonic_ns(), src_ip=src, dst_ip=dst,
        src_port=sport, dst_port=dport, protocol=protocol, src_identity=0, dst_identity=0,
        verdict=verdict, drop_reason=reason, direction=direction, tcp_flags=flags, kind=kind)

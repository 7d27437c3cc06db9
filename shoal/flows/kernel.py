"""Kernel flow events: ring-buffer records decoded into KernelFlowEvent (contract C).

``shoal.agent.ringbuf.RingReader`` reads the pinned ring buffer in raw batches; ``decode``
turns one record into a ``KernelFlowEvent`` when someone needs it (the flow store decodes
only what a client reads). Records the kernel could not write (ring full) are counted in
the ``counters`` map by the programs and surface as lost events.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from shoal.datapath.structs import Direction, FlowRecord, Kind, Verdict

log = logging.getLogger(__name__)

_PROTOCOLS = {6: "TCP", 17: "UDP", 1: "ICMP"}


@dataclass(frozen=True)
class KernelFlowEvent:
    ts_ns: int
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    protocol: str
    src_identity: int
    dst_identity: int
    verdict: str          # FORWARDED | DROPPED | REDIRECTED
    drop_reason: int      # Hubble/Cilium drop-reason code, 0 when not dropped
    direction: str        # INGRESS | EGRESS
    tcp_flags: int
    kind: str             # connect | sock | tc
    rule_id: int = 0      # crc32 of the DENY policy's "<namespace>/<name>" that matched


class MalformedRecord(ValueError):
    pass


def decode(raw: bytes) -> KernelFlowEvent:
    if len(raw) < ctypes.sizeof(FlowRecord):
        raise MalformedRecord(f"flow record of {len(raw)} bytes, expected {ctypes.sizeof(FlowRecord)}")
    record = FlowRecord.from_buffer_copy(raw[: ctypes.sizeof(FlowRecord)])
    try:
        verdict = Verdict(record.verdict).name
        direction = Direction(record.direction).name
        kind = Kind(record.kind).name.lower()
    except ValueError as err:
        raise MalformedRecord(str(err)) from err
    return KernelFlowEvent(
        ts_ns=record.ts_ns, src_ip=record.src_ip.text() or "0.0.0.0", dst_ip=record.dst_ip.text() or "0.0.0.0",
        src_port=record.src_port, dst_port=record.dst_port,
        protocol=_PROTOCOLS.get(record.protocol, str(record.protocol)),
        src_identity=record.src_identity, dst_identity=record.dst_identity,
        verdict=verdict, drop_reason=record.drop_reason, direction=direction,
        tcp_flags=record.tcp_flags, kind=kind, rule_id=record.rule_id,
    )

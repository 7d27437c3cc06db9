"""Kernel flow events: ring-buffer records decoded into KernelFlowEvent (contract C).

The reader polls the pinned ring buffer on its own thread (libbcc's ring-buffer
consumer) and hands each decoded event to `sink(event)`. Records the kernel could
not write (ring full) are counted in the `counters` map by the programs; records
that fail to decode here are counted by the reader. Both surface as lost events.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from shoal.agent.structs import Direction, FlowRecord, Kind, Verdict, be32_to_ip

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
        ts_ns=record.ts_ns, src_ip=be32_to_ip(record.src_ip), dst_ip=be32_to_ip(record.dst_ip),
        src_port=record.src_port, dst_port=record.dst_port,
        protocol=_PROTOCOLS.get(record.protocol, str(record.protocol)),
        src_identity=record.src_identity, dst_identity=record.dst_identity,
        verdict=verdict, drop_reason=record.drop_reason, direction=direction,
        tcp_flags=record.tcp_flags, kind=kind, rule_id=record.rule_id,
    )





class RingBufferReader:
    """Consumes the pinned `flow_events` ring buffer on a thread; calls sink(event) per record."""

    def __init__(self, map_fd: int, sink: Callable[[KernelFlowEvent], None], poll_ms: int = 100):
        from bcc import libbcc  # libbcc's consumer handles the mmap protocol for us
        self._lib = libbcc.lib
        self._sink = sink
        self._poll_ms = poll_ms
        self.malformed = 0
        self.delivered = 0
        self._callback = libbcc._RINGBUF_CB_TYPE(self._on_record)  # keep a reference: ctypes does not
        self._ring = self._lib.bpf_new_ringbuf(map_fd, self._callback, None)
        if not self._ring:
            raise OSError(f"cannot open the flow ring buffer (fd {map_fd})")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-flow-events", daemon=True)

    def _on_record(self, _ctx, data, size) -> int:
        try:
            event = decode(ctypes.string_at(data, size))
        except MalformedRecord as err:
            self.malformed += 1
            log.warning("dropping malformed flow record: %s", err)
            return 0
        self.delivered += 1
        try:
            self._sink(event)
        except Exception:  # a broken sink must not kill the reader; log it loudly
            log.exception("flow event sink failed")
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._lib.bpf_poll_ringbuf(self._ring, self._poll_ms)

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Consume whatever is pending now, on the caller's thread (tests, shutdown)."""
        self._lib.bpf_consume_ringbuf(self._ring)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._lib.bpf_free_ringbuf(self._ring)
        self._ring = None

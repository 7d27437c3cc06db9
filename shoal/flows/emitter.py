"""Node proxy / waypoint -> agent: L4 and L7 flow records over a Unix datagram socket.

One datagram per record: a one-byte kind, then the payload.

- ``F`` + a serialized ``flow.Flow``;
- ``L`` + little-endian u64: how many records this sender dropped since its last ``L``
  (the agent turns it into a ``lost_events`` record, source OBSERVER_EVENTS_QUEUE);
- ``B`` + records, each a little-endian u32 length then an ``F`` record: a batch. A node
  proxy closing 10,000 connections sends one datagram per event-loop turn, not one per
  flow (a send per flow was 8 % of its CPU while it tore them down).

Datagrams keep record boundaries without framing, and a full receive queue gives EAGAIN
on a non-blocking send: the sender drops and counts instead of waiting. A proxy must never
stall its data path because nobody is watching its flows.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from pathlib import Path

from shoal.api.flow import flow_pb2

log = logging.getLogger(__name__)

KIND_FLOW = b"F"
KIND_LOST = b"L"
KIND_BATCH = b"B"
LOST_FORMAT = struct.Struct("<Q")
BATCH_LENGTH = struct.Struct("<I")
# Far below the Unix datagram limit (the socket send buffer); bigger flows are bugs.
MAX_RECORD_BYTES = 64 * 1024
# A batch fits the agent's 64 KiB receive; more records go in the next datagram.
MAX_BATCH_BYTES = 60 * 1024

# Errors that mean "the agent is not there or not keeping up": drop, count, go on.
_AGENT_AWAY = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOBUFS, errno.ENOTCONN}


def encode_flow(flow: flow_pb2.Flow) -> bytes:
    return KIND_FLOW + flow.SerializeToString()


def encode_lost(count: int) -> bytes:
    return KIND_LOST + LOST_FORMAT.pack(count)


def encode_batches(records: list[bytes], limit: int = MAX_BATCH_BYTES) -> list[tuple[bytes, int]]:
    """``F`` records packed into as few ``B`` datagrams of at most ``limit`` bytes as fit
    (a record alone is sent as itself); each with the count of records it carries."""
    batches: list[tuple[bytes, int]] = []
    parts: list[bytes] = []
    size = 1
    for record in records:
        if parts and size + BATCH_LENGTH.size + len(record) > limit:
            batches.append(_batch(parts))
            parts, size = [], 1
        parts.append(record)
        size += BATCH_LENGTH.size + len(record)
    if parts:
        batches.append(_batch(parts))
    return batches


def _batch(records: list[bytes]) -> tuple[bytes, int]:
    if len(records) == 1:
        return records[0], 1
    return KIND_BATCH + b"".join(BATCH_LENGTH.pack(len(r)) + r for r in records), len(records)


def decode_batch(body: bytes) -> list[bytes]:
    """The records of a ``B`` datagram's body; ValueError when it is cut or lies about a
    length (a malformed batch is dropped whole)."""
    records, offset = [], 0
    while offset < len(body):
        if offset + BATCH_LENGTH.size > len(body):
            raise ValueError("batch cut inside a record length")
        (length,) = BATCH_LENGTH.unpack_from(body, offset)
        offset += BATCH_LENGTH.size
        if length == 0 or offset + length > len(body):
            raise ValueError(f"batch record of {length} bytes at offset {offset} runs past the datagram")
        records.append(body[offset:offset + length])
        offset += length
    return records


class FlowEmitter:
    """Non-blocking sender of flows to the node's agent.

    ``emit(flow)`` returns at once: True when the record was handed to the kernel, False
    when it was dropped (agent away, queue full, record too big). Drops are counted in
    ``dropped`` and reported to the agent with the next record that gets through, so the
    loss shows up in ``lost_events`` even though the agent never saw the records.
    """

    def __init__(self, path: str | os.PathLike[str], registry=None, component: str = "proxy") -> None:
        self.path = str(Path(path))
        self.sent = 0
        self.dropped = 0
        self._unreported = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._metrics = _EmitterMetrics(registry, component) if registry is not None else None

    def emit(self, flow: flow_pb2.Flow) -> bool:
        return self.emit_many([flow]) == 1

    def emit_many(self, flows: list[flow_pb2.Flow]) -> int:
        """Sends ``flows`` in as few datagrams as fit (``B`` batches); how many got through."""
        return self.emit_records([encode_flow(flow) for flow in flows])

    def emit_records(self, encoded: list[bytes]) -> int:
        """``emit_many`` for flows a sender encoded itself (``encode_flow``'s records)."""
        records = []
        for record in encoded:
            if len(record) > MAX_RECORD_BYTES:
                log.warning("flow record of %d bytes dropped (limit %d)", len(record), MAX_RECORD_BYTES)
                self._drop("too_big")
            else:
                records.append(record)
        sent = 0
        for datagram, count in encode_batches(records):
            if self._send(datagram, count):
                sent += count
        if sent:
            self.sent += sent
            if self._metrics:
                self._metrics.sent.inc(sent)
            if self._unreported and self._send(encode_lost(self._unreported), 0):
                self._unreported = 0
        return sent

    def _send(self, datagram: bytes, records: int) -> bool:
        try:
            self._sock.sendto(datagram, self.path)
            return True
        except OSError as error:
            if error.errno not in _AGENT_AWAY:
                log.warning("flow emitter: unexpected send error: %s", error)
            self._drop(errno.errorcode.get(error.errno or 0, "error").lower(), records)
            return False

    def _drop(self, reason: str, records: int = 1) -> None:
        if not records:
            return   # a lost-count report that did not get through: sent again with the next
        self.dropped += records
        self._unreported += records
        if self._metrics:
            self._metrics.dropped.labels(reason=reason).inc(records)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "FlowEmitter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _EmitterMetrics:
    def __init__(self, registry, component: str) -> None:
        from prometheus_client import Counter

        self.sent = Counter(
            "shoal_flow_records_sent", "Flow records handed to the node agent",
            ["component"], registry=registry,
        ).labels(component=component)
        dropped = Counter(
            "shoal_flow_records_dropped", "Flow records dropped before reaching the agent",
            ["component", "reason"], registry=registry,
        )
        self.dropped = _Bound(dropped, component=component)


class _Bound:
    """A labelled counter with some labels fixed."""

    def __init__(self, counter, **fixed: str) -> None:
        self._counter = counter
        self._fixed = fixed

    def labels(self, **labels: str):
        return self._counter.labels(**self._fixed, **labels)

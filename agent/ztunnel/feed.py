"""The supervisor's feed to its workers: config and certificates over one inherited socket.

A supervised node proxy has one config stream and one certificate client per node, in the
supervisor (ztunnel's split: only the config stream writes the state; the identity
manager owns certificates). Each worker gets what it needs to serve over its own end of
a SOCK_STREAM socketpair the supervisor created and passed at exec: no path on any
filesystem, so no other process can open it, and private keys travel nowhere else.

Every frame is ``version (1 byte) | kind (1 byte) | payload length (4 bytes, big endian) |
payload``; a frame of another version, an unknown kind or a payload over
``MAX_PAYLOAD`` is a ``FeedError`` (the stream cannot be trusted past it). Payloads:

- ``CONFIG_SNAPSHOT`` / ``CONFIG_DELTA``: a ``DeltaResponse`` of the config stream's own
  protobuf (``shoal/api/config.proto``: version, resources, removed keys), decoded and
  validated by ``shoal.xds.convert`` exactly as a push from the controller. A snapshot
  is the whole state: what the worker holds beyond it is removed. It comes first, once
  the supervisor's own state is synced, and again to a restarted worker.
- ``SVID``: JSON, one identity's certificate chain, private key, trust roots and
  validity, for an identity a pod of this node runs as (the supervisor asks the CA for
  nothing else and sends nothing else). Sent again on every rotation.
- ``SVID_PENDING``: JSON, an identity the node hosts whose certificate is not there yet
  (the CA is being retried): the worker goes on enrolling its pod, as the single process
  does.
- ``SVID_DROPPED``: JSON, the last pod of that identity left the node: forget the key.

Pure: bytes in, messages out (``FeedDecoder``), messages in, bytes out (``encode``);
the asyncio ends are ``supervisor.WorkerFeed`` and ``app.FeedReader``.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Union

from google.protobuf.message import DecodeError

from shoal.api import config_pb2 as pb
from shoal.xds import convert
from shoal.xds import model as m

FEED_VERSION = 1
HEADER = struct.Struct("!BBI")
# A full config for 20k pods is several MB (the config stream allows 256 MiB from the
# controller; a worker's copy is the same content, and 64 MiB is far beyond any real one).
MAX_PAYLOAD = 64 * 1024 * 1024


class FeedError(ValueError):
    """A frame the worker cannot trust: wrong version, unknown kind, too large, undecodable."""


class Kind(enum.IntEnum):
    CONFIG_SNAPSHOT = 1
    CONFIG_DELTA = 2
    SVID = 3
    SVID_PENDING = 4
    SVID_DROPPED = 5


@dataclass(frozen=True)
class ConfigUpdate:
    """A config change; ``snapshot``: the whole state (what is not in it goes)."""
    delta: m.ConfigDelta
    snapshot: bool = False


@dataclass(frozen=True)
class SvidGrant:
    """One identity's certificate and key, checked by the supervisor when the CA signed it."""
    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes
    not_before: float
    not_after: float

    def __repr__(self) -> str:   # never a key in a log line
        return f"SvidGrant({self.spiffe_id!r}, not_after={self.not_after})"


@dataclass(frozen=True)
class SvidPending:
    spiffe_id: str


@dataclass(frozen=True)
class SvidDropped:
    spiffe_id: str


FeedMessage = Union[ConfigUpdate, SvidGrant, SvidPending, SvidDropped]


def frame(kind: Kind, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise FeedError(f"{kind.name} of {len(payload)} bytes is over the {MAX_PAYLOAD} limit")
    return HEADER.pack(FEED_VERSION, kind, len(payload)) + payload


def encode(message: FeedMessage) -> bytes:
    if isinstance(message, ConfigUpdate):
        delta = message.delta
        push = pb.DeltaResponse(system_version=delta.version, removed=list(delta.removed),
                                resources=[convert.to_proto(r) for r in delta.upserted])
        kind = Kind.CONFIG_SNAPSHOT if message.snapshot else Kind.CONFIG_DELTA
        return frame(kind, push.SerializeToString())
    if isinstance(message, SvidGrant):
        return frame(Kind.SVID, json.dumps({
            "spiffe_id": message.spiffe_id, "chain_pem": message.chain_pem.decode(),
            "key_pem": message.key_pem.decode(), "roots_pem": message.roots_pem.decode(),
            "not_before": message.not_before, "not_after": message.not_after}).encode())
    kind = Kind.SVID_PENDING if isinstance(message, SvidPending) else Kind.SVID_DROPPED
    return frame(kind, json.dumps({"spiffe_id": message.spiffe_id}).encode())


def _json_fields(payload: bytes, kind: Kind, strings: tuple[str, ...], numbers: tuple[str, ...] = ()) -> dict:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FeedError(f"{kind.name}: not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise FeedError(f"{kind.name}: not a JSON object")
    for name in strings:
        if not isinstance(body.get(name), str) or not body[name]:
            raise FeedError(f"{kind.name}: {name} missing or not a string")
    for name in numbers:
        if not isinstance(body.get(name), (int, float)) or isinstance(body[name], bool):
            raise FeedError(f"{kind.name}: {name} missing or not a number")
    if not body["spiffe_id"].startswith("spiffe://"):
        raise FeedError(f"{kind.name}: {body['spiffe_id']!r} is not a SPIFFE ID")
    return body


def decode(kind: Kind, payload: bytes) -> FeedMessage:
    """One frame's payload -> its message; FeedError when it is not what its kind says."""
    if kind in (Kind.CONFIG_SNAPSHOT, Kind.CONFIG_DELTA):
        push = pb.DeltaResponse()
        try:
            push.ParseFromString(payload)
            upserted = tuple(convert.from_proto(resource) for resource in push.resources)
            for key in push.removed:
                m.split_key(key)
        except (DecodeError, ValueError) as exc:
            raise FeedError(f"{kind.name}: {exc}") from None
        delta = m.ConfigDelta(version=push.system_version, upserted=upserted, removed=tuple(push.removed))
        return ConfigUpdate(delta, snapshot=kind is Kind.CONFIG_SNAPSHOT)
    if kind is Kind.SVID:
        body = _json_fields(payload, kind, ("spiffe_id", "chain_pem", "key_pem", "roots_pem"),
                            ("not_before", "not_after"))
        return SvidGrant(body["spiffe_id"], body["chain_pem"].encode(), body["key_pem"].encode(),
                         body["roots_pem"].encode(), float(body["not_before"]), float(body["not_after"]))
    body = _json_fields(payload, kind, ("spiffe_id",))
    return SvidPending(body["spiffe_id"]) if kind is Kind.SVID_PENDING else SvidDropped(body["spiffe_id"])


class FeedDecoder:
    """Bytes as they arrive -> whole messages, in order. After a FeedError the decoder
    refuses everything (the worker stops reading; its supervisor starts a fresh one)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self._buffer = bytearray()
        self._max_payload = max_payload
        self.broken: FeedError | None = None

    def feed(self, data: bytes) -> list[FeedMessage]:
        if self.broken is not None:
            raise self.broken
        self._buffer += data
        messages: list[FeedMessage] = []
        try:
            while len(self._buffer) >= HEADER.size:
                version, kind, length = HEADER.unpack_from(self._buffer)
                if version != FEED_VERSION:
                    raise FeedError(f"feed version {version}, this worker speaks {FEED_VERSION}")
                if kind not in Kind._value2member_map_:
                    raise FeedError(f"unknown frame kind {kind}")
                if length > self._max_payload:
                    raise FeedError(f"{Kind(kind).name} of {length} bytes is over the {self._max_payload} limit")
                end = HEADER.size + length
                if len(self._buffer) < end:
                    break
                payload = bytes(self._buffer[HEADER.size:end])
                del self._buffer[:end]
                messages.append(decode(Kind(kind), payload))
        except FeedError as exc:
            self.broken = exc
            self._buffer.clear()
            raise
        return messages

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

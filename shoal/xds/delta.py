"""I/O-free bookkeeping for both ends of the delta config stream.

No sockets, no clocks: the gRPC drivers (``shoal.xds.client``, ``shoal.controller.xds``)
feed messages in and send what comes out.

* ``DeltaSender`` (controller, one per stream): which resource versions the client holds,
  which pushes are in flight (nonces), the last ACKed system version and the last NACK.
* ``DeltaReceiver`` (node, one per client, survives reconnects): the versions applied so
  far (what a reconnect resumes from), decoding a push into a ``ConfigDelta`` plus the
  ACK/NACK reply. A rejected resource is not applied and its last good version stays.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

from shoal import __version__
from shoal.api import config_pb2 as pb
from shoal.xds import convert
from shoal.xds import model as m

INVALID_ARGUMENT = 3   # grpc.StatusCode.INVALID_ARGUMENT


class ProtocolError(ValueError):
    """The peer broke the stream protocol (unknown nonce, missing hello...)."""


@dataclass(frozen=True)
class Push:
    """One push decided by the sender: keys to upsert (the driver encodes them) and remove."""

    nonce: str
    system_version: str
    upserts: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class Nack:
    nonce: str
    system_version: str
    message: str
    rejected: tuple[str, ...]


@dataclass
class DeltaSender:
    """Controller side of one stream.

    ``known`` is what the client holds, optimistically updated when a push is sent (as
    xDS does): a NACKed resource is not resent until its version changes, so a bad
    resource cannot put the stream in a loop; the NACK is kept for reporting.
    """

    node: str
    component: str
    build_version: str = ""       # the client's software version ("": an older client)
    known: dict[str, str] = field(default_factory=dict)
    in_flight: dict[str, str] = field(default_factory=dict)   # nonce -> system version
    _pushed: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)  # nonce -> keys
    _unresolved: set[str] = field(default_factory=set, repr=False)   # NACKed, not yet replaced
    acked_version: str = ""       # the newest system version the client is in sync with
    latest_version: str = ""      # the system version of the last plan()
    last_nack: Nack | None = None
    _nonces: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    @classmethod
    def from_hello(cls, request: pb.DeltaRequest) -> "DeltaSender":
        """Builds the sender from the client's first message (node, component, resume state)."""
        if not request.node:
            raise ProtocolError("first message must name the node")
        if request.component not in ("agent", "proxy", "waypoint"):
            raise ProtocolError(f"unknown component {request.component!r}")
        if request.response_nonce:
            raise ProtocolError("first message must not answer a push")
        known = {}
        for key, version in request.initial_resource_versions.items():
            m.split_key(key)   # ValueError on a malformed key
            known[key] = version
        return cls(node=request.node, component=request.component,
                   build_version=request.build_version[:64], known=known)

    def plan(self, desired: Mapping[str, str], system_version: str,
             keys: Iterable[str] | None = None, force: bool = False) -> Push | None:
        """Diffs ``desired`` (key -> version, already filtered for this node) against what the
        client holds; ``keys`` limits the diff to changed keys (None: everything).

        Returns None when there is nothing to send, unless ``force`` (the first answer on a
        stream is always sent, even empty: it tells the node it is in sync).
        """
        self.latest_version = system_version
        candidates: Iterable[str] = set(desired) | set(self.known) if keys is None else keys
        upserts, removed = [], []
        for key in candidates:
            want = desired.get(key)
            have = self.known.get(key)
            if want == have:
                continue
            if want is None:
                removed.append(key)
                del self.known[key]
            else:
                upserts.append(key)
                self.known[key] = want
        if not upserts and not removed and not force:
            if not self.in_flight:
                # Nothing in this version concerns the client: it is in sync with it.
                self.acked_version = system_version
            return None
        nonce = str(next(self._nonces))
        self.in_flight[nonce] = system_version
        self._pushed[nonce] = frozenset(upserts) | frozenset(removed)
        return Push(nonce=nonce, system_version=system_version,
                    upserts=tuple(sorted(upserts)), removed=tuple(sorted(removed)))

    def on_reply(self, request: pb.DeltaRequest) -> Nack | None:
        """Records an ACK or NACK; returns the Nack if it was one. ProtocolError on an
        unknown nonce."""
        nonce = request.response_nonce
        if nonce not in self.in_flight:
            raise ProtocolError(f"reply to unknown nonce {nonce!r}")
        version = self.in_flight.pop(nonce)
        pushed = self._pushed.pop(nonce, frozenset())
        if request.HasField("error_detail"):
            self.last_nack = Nack(nonce=nonce, system_version=version,
                                  message=request.error_detail.message,
                                  rejected=tuple(request.rejected))
            self._unresolved = set(request.rejected)
            return self.last_nack
        # Once nothing is in flight the client holds everything up to the last plan.
        self.acked_version = version if self.in_flight else self.latest_version
        # A NACK is history once every resource it rejected was replaced and accepted.
        if self.last_nack is not None:
            self._unresolved -= pushed
            if not self._unresolved:
                self.last_nack = None
        return None

    @property
    def synced(self) -> bool:
        """Every push so far has been answered."""
        return not self.in_flight


Validator = Callable[[m.Resource], None]


@dataclass
class DeltaReceiver:
    """Node side: applied versions (kept across reconnects) and push decoding."""

    node: str
    component: str
    validator: Validator | None = None
    versions: dict[str, str] = field(default_factory=dict)
    system_version: str = ""
    build_version: str = __version__

    def hello(self) -> pb.DeltaRequest:
        """The first message of every (re)connection: resume from what is applied, and say
        which software applies it (the controller reports it in ``shoal status``)."""
        return pb.DeltaRequest(node=self.node, component=self.component,
                               initial_resource_versions=self.versions,
                               build_version=self.build_version)

    def on_push(self, push: pb.DeltaResponse) -> tuple[m.ConfigDelta, pb.DeltaRequest]:
        """Decodes a push. Returns the delta to apply (good resources only) and the reply."""
        upserted: list[m.Resource] = []
        removed: list[str] = []
        errors: list[str] = []
        rejected: list[str] = []
        for resource in push.resources:
            key = f"{resource.type}/{resource.name}"
            try:
                decoded = convert.from_proto(resource)
                if self.validator is not None:
                    self.validator(decoded)
            except ValueError as err:
                errors.append(str(err))
                rejected.append(key)
                continue
            upserted.append(decoded)
            self.versions[key] = resource.version
        for key in push.removed:
            try:
                m.split_key(key)
            except ValueError as err:
                errors.append(str(err))
                rejected.append(key)
                continue
            self.versions.pop(key, None)
            removed.append(key)
        self.system_version = push.system_version
        reply = pb.DeltaRequest(response_nonce=push.nonce)
        if errors:
            reply.error_detail.code = INVALID_ARGUMENT
            reply.error_detail.message = "; ".join(errors)
            reply.rejected.extend(rejected)
        delta = m.ConfigDelta(version=push.system_version, upserted=tuple(upserted),
                              removed=tuple(removed))
        return delta, reply

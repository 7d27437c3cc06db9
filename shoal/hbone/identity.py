"""Workload identities as the data path holds them: SVIDs, their TLS contexts, SPIFFE checks.

Each SVID carries ready-made TLS contexts (TLS 1.3 only, ALPN h2, client certificates
required), so a handshake costs no setup; rotation replaces the SVID, and live
connections keep the context they were made with, so nothing is dropped.

Where SVIDs come from is not this module's business, so it needs neither ``cryptography``
nor ``grpc``: ``shoal.hbone.issuer.IdentityManager`` makes keys and CSRs and asks the
controller's CA (a single-process node proxy, a supervisor, a waypoint), and
``HeldIdentities`` keeps the SVIDs a node proxy's supervisor hands to its workers.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Protocol, cast

from shoal.config import DEFAULT_TRUST_DOMAIN, spiffe_id

log = logging.getLogger(__name__)

# csr_pem -> (cert_chain_pem, roots_pem)
Signer = Callable[[bytes], Awaitable[tuple[bytes, bytes]]]

ALPN = "h2"


class IdentityError(Exception):
    """A peer presented the wrong identity, or an SVID could not be obtained."""


class SvidPending(IdentityError):
    """No SVID yet: the CA is being retried (the caller decides whether to wait on)."""


class SignerUnavailable(IdentityError):
    """The CA could not be reached (controller down, restarting, overloaded): worth
    retrying, unlike a refusal. Signers raise it; the manager retries with backoff."""


RETRY_FIRST = 0.2    # seconds before the first retry of an unreachable CA, doubling...
RETRY_MAX = 5.0      # ...up to this
WAIT_DEFAULT = 8.0   # how long a caller waits for an SVID being retried (< the ZDS ack timeout)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The SPIFFE ID of a verified peer (its only spiffe:// URI SAN), else None.

    From the certificate as the TLS library verified it (``getpeercert()``, which is empty
    unless the chain was verified against our roots), so the data path parses no X.509
    itself and a worker needs no ``cryptography``."""
    if ssl_object is None:
        return None
    sans = cast("tuple[tuple[str, str], ...]", (ssl_object.getpeercert() or {}).get("subjectAltName", ()))
    ids = [value for kind, value in sans if kind == "URI" and value.startswith("spiffe://")]
    return ids[0] if len(ids) == 1 else None


def check_session(ssl_object, expected: str | None) -> str:
    """After a handshake: ALPN must be h2, the peer must carry one SPIFFE ID (= expected)."""
    if ssl_object is None:
        raise IdentityError("not a TLS connection")
    if ssl_object.selected_alpn_protocol() != ALPN:
        raise IdentityError(f"ALPN {ssl_object.selected_alpn_protocol()!r}, want {ALPN!r}")
    if ssl_object.version() != "TLSv1.3":
        raise IdentityError(f"{ssl_object.version()} negotiated, want TLSv1.3")
    peer = peer_identity(ssl_object)
    if peer is None:
        raise IdentityError("peer certificate carries no single SPIFFE ID")
    if expected is not None and peer != expected:
        raise IdentityError(f"peer is {peer}, expected {expected}")
    return peer


class DirectSSLObject(ssl.SSLObject):
    """The TLS object of a memory-BIO connection (uvloop's TLS transport) whose ``read``,
    ``write`` and ``pending`` are the C methods themselves. ``ssl.SSLObject``'s are Python
    wrappers that only forward their arguments, and uvloop calls them on every wakeup of a
    connection (``pending`` twice and ``read`` per TLS read, ``write`` per flush): four
    interpreter frames per request and end, cache-cold after each sleep. Same arguments,
    same results, same exceptions; everything else (handshake, peer certificate, ALPN) is
    ``ssl.SSLObject``'s. Set as a context's ``sslobject_class``."""

    @classmethod
    def _create(cls, *args, **kwargs):   # ssl's private constructor, called as ssl calls it
        obj = super()._create(*args, **kwargs)
        native = obj._sslobj
        obj.read, obj.write, obj.pending = native.read, native.write, native.pending
        return obj


def _context(purpose: ssl.Purpose, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # no SNI, no DNS names: the SPIFFE URI SAN is checked instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=roots_pem.decode())
    # load_cert_chain wants a path: an anonymous memory file of this process, reachable
    # only as /proc/<our pid>/fd/N (so by nobody who could not read our memory anyway),
    # closed at once. The key never touches a filesystem others can list or open.
    fd = os.memfd_create("svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


@dataclass
class Svid:
    spiffe_id: str
    chain_pem: bytes
    roots_pem: bytes
    not_before: float
    not_after: float
    server_context: ssl.SSLContext = field(repr=False)
    client_context: ssl.SSLContext = field(repr=False)
    key_pem: bytes = field(repr=False, default=b"")   # kept for the workers it is handed to

    @classmethod
    def from_parts(cls, spiffe: str, chain_pem: bytes, key_pem: bytes, roots_pem: bytes,
                   not_before: float, not_after: float) -> "Svid":
        """An SVID whose certificate was already checked (by ``issuer.svid_from_signed``,
        in this process or in the supervisor that handed it over)."""
        return cls(spiffe, chain_pem, roots_pem, not_before, not_after,
                   _context(ssl.Purpose.CLIENT_AUTH, chain_pem, key_pem, roots_pem),
                   _context(ssl.Purpose.SERVER_AUTH, chain_pem, key_pem, roots_pem), key_pem)

    def refresh_at(self) -> float:
        return self.not_before + (self.not_after - self.not_before) / 2

    def describe(self) -> dict:
        iso = lambda ts: datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()
        return {"identity": self.spiffe_id, "not_before": iso(self.not_before),
                "not_after": iso(self.not_after), "rotates_at": iso(self.refresh_at())}




class Identities(Protocol):
    """What the data path asks of whoever holds its SVIDs (``IdentityManager`` or
    ``HeldIdentities``)."""
    rotations: int

    def spiffe_id(self, namespace: str, service_account: str) -> str: ...

    async def acquire(self, namespace: str, service_account: str) -> str: ...

    def release(self, namespace: str, service_account: str) -> None: ...

    def current(self, spiffe: str) -> Svid | None: ...

    async def get(self, spiffe: str) -> Svid: ...

    def describe(self) -> list[dict]: ...

    def table_sizes(self) -> dict[str, int]: ...   # entries of its tables, for /debug/memory


class HeldIdentities:
    """A worker's SVIDs: exactly those its supervisor handed over, for the identities the
    node hosts. It makes no key and asks no CA: what it was not given it does not have.

    ``announced``: an identity the supervisor said the node hosts (its SVID, or pending
    while the CA is retried). A pod's enrolment waits (``wait`` at most) for its identity
    to be announced, which the supervisor does before it hands the pod over; the two come
    over different sockets, so the announcement may be read a moment after the pod."""

    def __init__(self, trust_domain: str = DEFAULT_TRUST_DOMAIN, wait: float = WAIT_DEFAULT):
        self.trust_domain = trust_domain
        self.wait = wait
        self._svids: dict[str, Svid] = {}
        self._announced: set[str] = set()
        self._waiters: dict[str, asyncio.Event] = {}
        self.rotations = 0

    def spiffe_id(self, namespace: str, service_account: str) -> str:
        return spiffe_id(namespace, service_account, self.trust_domain)

    # -- what the supervisor says
    def grant(self, svid: Svid) -> None:
        if svid.spiffe_id in self._svids:
            self.rotations += 1
        self._svids[svid.spiffe_id] = svid
        self._announce(svid.spiffe_id)
        log.info("svid %s valid until %s (from the supervisor)", svid.spiffe_id, svid.describe()["not_after"])

    def pending(self, spiffe: str) -> None:
        self._announce(spiffe)

    def drop(self, spiffe: str) -> None:
        """The node hosts the identity no more: its key goes, and so does any wait for it."""
        self._svids.pop(spiffe, None)
        self._announced.discard(spiffe)

    def _announce(self, spiffe: str) -> None:
        self._announced.add(spiffe)
        waiter = self._waiters.pop(spiffe, None)
        if waiter is not None:
            waiter.set()

    async def _wait_for(self, spiffe: str, announced_only: bool) -> None:
        deadline = asyncio.get_running_loop().time() + self.wait
        while spiffe not in (self._announced if announced_only else self._svids):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise SvidPending(f"svid {spiffe}: not handed over by the supervisor within {self.wait:.0f}s")
            waiter = self._waiters.setdefault(spiffe, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), left)
            except asyncio.TimeoutError:
                continue

    # -- what the data path asks
    async def acquire(self, namespace: str, service_account: str) -> str:
        """The identity of a pod being enrolled, once the supervisor announced it (an
        identity it never announces is one the node does not host: IdentityError)."""
        key = self.spiffe_id(namespace, service_account)
        try:
            await self._wait_for(key, announced_only=True)
        except SvidPending:
            raise IdentityError(f"svid {key}: the supervisor holds no such identity for this node") from None
        return key

    def release(self, namespace: str, service_account: str) -> None:
        """Nothing to do: the supervisor drops an SVID when the node's last pod of it left."""

    def current(self, spiffe: str) -> Svid | None:
        return self._svids.get(spiffe)

    async def get(self, spiffe: str) -> Svid:
        """The SVID, waiting for it (``wait`` at most) while the supervisor's CA request is
        retried; IdentityError for an identity the node does not host."""
        if spiffe not in self._svids and spiffe not in self._announced:
            raise IdentityError(f"svid {spiffe}: not an identity of this node")
        await self._wait_for(spiffe, announced_only=False)
        return self._svids[spiffe]

    def describe(self) -> list[dict]:
        return [svid.describe() for svid in self._svids.values()]

    def table_sizes(self) -> dict[str, int]:
        """SVIDs held, identities announced and waited for, TLS sessions cached."""
        return {"svids": len(self._svids), "svids_announced": len(self._announced),
                "svid_waiters": len(self._waiters), "tls_sessions_cached": tls_sessions_cached(self._svids.values())}


def tls_sessions_cached(svids: Iterable[Svid]) -> int:
    """The TLS sessions the SVIDs' contexts cache (OpenSSL's server-side cache holds up to
    20,480 per context by default): for ``/debug/memory``."""
    return sum(context.session_stats()["number"] for svid in svids
               for context in (svid.server_context, svid.client_context))

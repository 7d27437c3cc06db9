"""Workload identities: one X.509 SVID per service account served on this node.

The key is generated here and never leaves the process; the certificate comes from the
controller's CA through a CSR (``ConfigClient.sign_certificate``, contract A). Each SVID
carries ready-made TLS contexts (TLS 1.3 only, ALPN h2, client certificates required),
so a handshake costs no setup. Rotation replaces the SVID at half-life; live
connections keep the context they were made with, so nothing is dropped.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def make_csr(spiffe: str) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a CSR naming ``spiffe`` as its URI SAN -> (key_pem, csr_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")]


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The SPIFFE ID of a verified peer (its only spiffe:// URI SAN), else None."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    ids = spiffe_ids_of(x509.load_der_x509_certificate(der))
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


def _context(purpose: ssl.Purpose, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # no SNI, no DNS names: the SPIFFE URI SAN is checked instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=roots_pem.decode())
    # load_cert_chain wants files: a private, immediately removed temp file.
    with tempfile.NamedTemporaryFile("wb", dir=_secret_dir(), suffix=".pem") as tmp:
        tmp.write(chain_pem + b"\n" + key_pem)
        tmp.flush()
        ctx.load_cert_chain(tmp.name)
    return ctx


def _secret_dir() -> str:
    for candidate in ("/dev/shm", "/run", tempfile.gettempdir()):
        if os.access(candidate, os.W_OK):
            return candidate
    return tempfile.gettempdir()


@dataclass
class Svid:
    spiffe_id: str
    chain_pem: bytes
    roots_pem: bytes
    not_before: float
    not_after: float
    server_context: ssl.SSLContext = field(repr=False)
    client_context: ssl.SSLContext = field(repr=False)

    @classmethod
    def from_pem(cls, spiffe: str, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> "Svid":
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        if spiffe_ids_of(leaf) != [spiffe]:
            raise IdentityError(f"CA issued {spiffe_ids_of(leaf)}, asked for {spiffe}")
        return cls(spiffe, chain_pem, roots_pem,
                   leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp(),
                   _context(ssl.Purpose.CLIENT_AUTH, chain_pem, key_pem, roots_pem),
                   _context(ssl.Purpose.SERVER_AUTH, chain_pem, key_pem, roots_pem))

    def refresh_at(self) -> float:
        return self.not_before + (self.not_after - self.not_before) / 2

    def describe(self) -> dict:
        iso = lambda ts: datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()
        return {"identity": self.spiffe_id, "not_before": iso(self.not_before),
                "not_after": iso(self.not_after), "rotates_at": iso(self.refresh_at())}


class IdentityManager:
    """Fetches, caches and rotates SVIDs, keyed by (namespace, service account)."""

    def __init__(self, signer: Signer, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 clock: Callable[[], float] = time.time, on_error: Callable[[str], None] | None = None,
                 wait: float = WAIT_DEFAULT):
        self._signer = signer
        self.wait = wait
        self.trust_domain = trust_domain
        self._clock = clock
        self._svids: dict[str, Svid] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._users: dict[str, int] = {}
        self._on_error = on_error or (lambda reason: None)
        self.rotations = 0

    def spiffe_id(self, namespace: str, service_account: str) -> str:
        return spiffe_id(namespace, service_account, self.trust_domain)

    async def acquire(self, namespace: str, service_account: str) -> str:
        """Count one user of a service account's identity and get its SVID; returns the
        SPIFFE ID. A CA that cannot be reached is not fatal: after ``wait`` seconds the
        caller goes on (its pod is served; 15008 refuses until the SVID is there) while
        the fetch keeps retrying in the background. A refusal raises IdentityError."""
        key = self.spiffe_id(namespace, service_account)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            await self.get(key)
        except SvidPending as exc:
            log.warning("%s; going on, the fetch keeps retrying", exc)
        except IdentityError:
            self.release(namespace, service_account)
            raise
        return key

    def release(self, namespace: str, service_account: str) -> None:
        """Drop one user; forget the SVID when no pod on the node uses it any more."""
        key = self.spiffe_id(namespace, service_account)
        left = self._users.get(key, 0) - 1
        if left <= 0:
            self._users.pop(key, None)
            self._svids.pop(key, None)
            pending = self._inflight.pop(key, None)
            if pending is not None:
                pending.cancel()  # nobody needs it any more: stop retrying
        else:
            self._users[key] = left

    def current(self, spiffe: str) -> Svid | None:
        return self._svids.get(spiffe)

    async def get(self, spiffe: str) -> Svid:
        """The current SVID, fetched if needed; SvidPending after ``wait`` seconds of an
        unreachable CA (the fetch goes on), IdentityError when the CA refuses."""
        svid = self._svids.get(spiffe)
        if svid is not None and self._clock() < svid.not_after:
            return svid
        return await self._fetch(spiffe)

    async def _fetch(self, spiffe: str) -> Svid:
        # Concurrent callers for the same identity share one CSR (and its retries).
        pending = self._inflight.get(spiffe)
        if pending is None:
            pending = asyncio.ensure_future(self._sign(spiffe))
            self._inflight[spiffe] = pending
            pending.add_done_callback(lambda done: self._fetched(spiffe, done))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self.wait)
        except asyncio.TimeoutError:
            raise SvidPending(f"svid {spiffe}: CA unreachable for {self.wait:.0f}s") from None
        except asyncio.CancelledError:
            # The fetch was dropped (its last pod left), not this caller: a clear error,
            # so a connection waiting for it is refused and closed, not left cancelled.
            caller = asyncio.current_task()
            if pending.cancelled() and (caller is None or not caller.cancelling()):
                raise IdentityError(f"svid {spiffe}: no longer served on this node") from None
            raise

    def _fetched(self, spiffe: str, done: asyncio.Future) -> None:
        if self._inflight.get(spiffe) is done:
            del self._inflight[spiffe]
        if not done.cancelled():
            done.exception()  # retrieved here, whoever (if anyone) still waits for it

    async def _sign(self, spiffe: str) -> Svid:
        delay = RETRY_FIRST
        while True:
            key_pem, csr_pem = make_csr(spiffe)
            try:
                chain_pem, roots_pem = await self._signer(csr_pem)
                svid = Svid.from_pem(spiffe, chain_pem, key_pem, roots_pem)
                break
            except SignerUnavailable as exc:
                self._on_error(f"svid {spiffe}: {exc}")
                log.warning("svid %s: %s; retrying in %.1fs", spiffe, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            except (IdentityError, ValueError, OSError, ssl.SSLError) as exc:
                self._on_error(f"svid {spiffe}: {exc}")
                raise IdentityError(f"cannot obtain an SVID for {spiffe}: {exc}") from exc
        self._svids[spiffe] = svid
        log.info("svid %s valid until %s", spiffe, svid.describe()["not_after"])
        return svid

    async def rotate_due(self) -> int:
        """Re-sign every SVID past its half-life; returns how many were rotated."""
        now, rotated = self._clock(), 0
        for spiffe, svid in list(self._svids.items()):
            if now >= svid.refresh_at():
                try:
                    await self._fetch(spiffe)
                    rotated += 1
                except IdentityError as exc:
                    log.warning("rotation failed, keeping the current SVID: %s", exc)
        self.rotations += rotated
        return rotated

    async def run_rotation(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.rotate_due()

    def describe(self) -> list[dict]:
        return [svid.describe() for svid in self._svids.values()]

    def table_sizes(self) -> dict[str, int]:
        """SVIDs held and fetching, and the TLS sessions their contexts cache (OpenSSL's
        server-side cache holds up to 20,480 per context by default)."""
        return {"svids": len(self._svids), "svids_fetching": len(self._inflight),
                "tls_sessions_cached": sum(context.session_stats()["number"] for svid in self._svids.values()
                                           for context in (svid.server_context, svid.client_context))}

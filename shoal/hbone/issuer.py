"""Where SVIDs come from: a local P-256 key, a CSR, the controller's CA; rotation at half-life.

``IdentityManager`` fetches, caches and rotates the SVIDs of the service accounts a node
serves. The key is generated here; the certificate comes from the controller's CA
through a CSR (``ConfigClient.sign_certificate``, contract A). In a supervised node proxy
the supervisor runs it and hands each SVID to its workers (``agent/ztunnel/feed.py``),
so the workers never import ``cryptography`` (or ``grpc``).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal.config import DEFAULT_TRUST_DOMAIN, spiffe_id
from shoal.hbone.identity import (
    RETRY_FIRST,
    RETRY_MAX,
    WAIT_DEFAULT,
    IdentityError,
    Signer,
    SignerUnavailable,
    Svid,
    SvidPending,
    tls_sessions_cached,
)

log = logging.getLogger(__name__)


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


def svid_from_signed(spiffe: str, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> Svid:
    """The SVID for what the CA signed, once its leaf names exactly ``spiffe``."""
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    if spiffe_ids_of(leaf) != [spiffe]:
        raise IdentityError(f"CA issued {spiffe_ids_of(leaf)}, asked for {spiffe}")
    return Svid.from_parts(spiffe, chain_pem, key_pem, roots_pem,
                           leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp())


class IdentityManager:
    """Fetches, caches and rotates SVIDs, keyed by (namespace, service account)."""

    def __init__(self, signer: Signer, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 clock: Callable[[], float] = time.time, on_error: Callable[[str], None] | None = None,
                 wait: float = WAIT_DEFAULT, on_issued: Callable[[Svid], None] | None = None,
                 on_dropped: Callable[[str], None] | None = None):
        """``on_issued(svid)`` after every SVID signed (first or rotated), ``on_dropped(spiffe)``
        when the last user of an identity released it: how a supervisor keeps its workers'
        copies exactly the node's identities."""
        self._signer = signer
        self._on_issued = on_issued or (lambda svid: None)
        self._on_dropped = on_dropped or (lambda spiffe: None)
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
            self._on_dropped(key)
        else:
            self._users[key] = left

    def in_use(self) -> list[str]:
        """The identities someone acquired and has not released (a node's hosted ones),
        whether their SVID is there yet or still being fetched."""
        return sorted(self._users)

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
                svid = svid_from_signed(spiffe, chain_pem, key_pem, roots_pem)
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
        self._on_issued(svid)
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
        """SVIDs held and being fetched, their users, the TLS sessions their contexts cache."""
        return {"svids": len(self._svids), "svids_fetching": len(self._inflight), "svid_users": len(self._users),
                "tls_sessions_cached": tls_sessions_cached(self._svids.values())}

"""The workload CA: issues X.509 SVIDs (SPIFFE ID as the only URI SAN).

Key material lives in the CA directory, in Istio's "cacerts" layout so the same files can
come from a Kubernetes Secret mounted there:

* ``ca-cert.pem`` / ``ca-key.pem``: the signing certificate and key (a root or an
  intermediate). Generated on first start (a self-signed EC P-256 root, 10 years) when absent.
* ``cert-chain.pem``: the signing certificate's chain up to the root, when it is an
  intermediate (sent after the leaf).
* ``root-cert.pem``: the root(s) workloads trust.
* ``extra-roots.pem`` (optional): more roots to trust, for a root rotation.

Root rotation (no connection loses trust):
1. Put the NEW root into ``extra-roots.pem``; restart the controller. The trust bundle now
   holds both roots; node proxies pick it up with their next certificate (at half-life).
2. After one certificate lifetime, replace ``ca-cert.pem``/``ca-key.pem``/``root-cert.pem``
   with the new root (or an intermediate under it) and put the OLD root in
   ``extra-roots.pem``; restart. New certificates chain to the new root, old ones still verify.
3. After another certificate lifetime every old certificate has expired: delete
   ``extra-roots.pem`` and restart.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=7)
CLOCK_SKEW = dt.timedelta(minutes=5)
ROOT_LIFETIME = dt.timedelta(days=3650)
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
RSA_MIN_BITS, RSA_MAX_BITS = 2048, 4096
_SPIFFE = re.compile(r"^spiffe://([a-z0-9._-]+)/ns/([a-z0-9-]+)/sa/([a-z0-9.-]+)$")


class CsrError(ValueError):
    """The certificate request is refused; the message says why."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data) if data.strip() else []


def _to_pem(certs: list[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_root(trust_domain: str, lifetime: dt.timedelta = ROOT_LIFETIME
                  ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"shoal root CA {trust_domain}")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _check_chain(cert: x509.Certificate, chain: list[x509.Certificate],
                 roots: list[x509.Certificate]) -> None:
    """ca-cert.pem must lead through cert-chain.pem to one of the roots (a signer that does
    not would issue certificates no node trusts)."""
    path = [cert, *chain]
    for child, parent in zip(path, path[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(f"cert-chain.pem does not chain: {child.subject.rfc4514_string()!r} "
                             f"is not issued by {parent.subject.rfc4514_string()!r}") from None
    top = path[-1]
    for root in roots:
        if top == root:
            return
        try:
            top.verify_directly_issued_by(root)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise ValueError("ca-cert.pem does not chain to root-cert.pem (a CA of another mesh?)")


def _check_trust_domain(roots: list[x509.Certificate], trust_domain: str) -> None:
    """A root that names a SPIFFE trust domain (as ours do) must name this one."""
    for root in roots[:1]:
        try:
            uris = root.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            return
        domains = [u.removeprefix("spiffe://").rstrip("/") for u in uris if u.startswith("spiffe://")]
        if domains and trust_domain not in domains:
            raise ValueError(f"the root is for trust domain {domains[0]!r}, not {trust_domain!r}")


@dataclass(frozen=True)
class SignedCertificate:
    chain_pem: str
    roots_pem: str
    not_after: dt.datetime
    serial: int


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key, chain: list[x509.Certificate],
                 roots: list[x509.Certificate], trust_domain: str,
                 default_ttl: dt.timedelta = DEFAULT_TTL, max_ttl: dt.timedelta = MAX_TTL) -> None:
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise ValueError("the CA key must be EC or RSA")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise ValueError("ca-cert.pem has no basicConstraints: not a CA certificate") from None
        if not constraints.ca:
            raise ValueError("the CA certificate is not a CA (basicConstraints CA:FALSE)")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise ValueError("ca-key.pem is not the key of ca-cert.pem")
        if cert.not_valid_after_utc <= _now():
            raise ValueError(f"ca-cert.pem expired on {cert.not_valid_after_utc.isoformat()}")
        _check_chain(cert, chain, roots)
        _check_trust_domain(roots, trust_domain)
        self.cert, self._key, self.chain, self.roots = cert, key, chain, roots
        self.trust_domain = trust_domain
        self.default_ttl, self.max_ttl = default_ttl, max_ttl

    @classmethod
    def load_or_create(cls, ca_dir: Path | str, trust_domain: str,
                       default_ttl: dt.timedelta = DEFAULT_TTL,
                       max_ttl: dt.timedelta = MAX_TTL) -> "CertificateAuthority":
        ca_dir = Path(ca_dir)
        cert_path, key_path = ca_dir / "ca-cert.pem", ca_dir / "ca-key.pem"
        root_path = ca_dir / "root-cert.pem"
        if not cert_path.exists():
            ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            cert, key = generate_root(trust_domain)
            _write_private(key_path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            cert_path.write_bytes(cert_pem)
            root_path.write_bytes(cert_pem)
            log.info("generated a new root CA in %s", ca_dir)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        chain_path = ca_dir / "cert-chain.pem"
        chain = _pem_certs(chain_path.read_bytes()) if chain_path.exists() else []
        chain = [c for c in chain if c != cert]
        roots = _pem_certs(root_path.read_bytes()) if root_path.exists() else [cert]
        extra = ca_dir / "extra-roots.pem"
        if extra.exists():
            roots += [c for c in _pem_certs(extra.read_bytes()) if c not in roots]
        return cls(cert, key, chain, roots, trust_domain, default_ttl, max_ttl)

    @property
    def roots_pem(self) -> str:
        return _to_pem(self.roots)

    def validate_csr(self, csr_pem: str | bytes, spiffe_id: str) -> x509.CertificateSigningRequest:
        """Checks a CSR for ``spiffe_id``; raises CsrError naming the problem."""
        match = _SPIFFE.match(spiffe_id)
        if not match:
            raise CsrError(f"{spiffe_id!r} is not a workload SPIFFE ID "
                           "(spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")
        if match.group(1) != self.trust_domain:
            raise CsrError(f"{spiffe_id!r} is outside trust domain {self.trust_domain!r}")
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as err:
            raise CsrError(f"not a PEM certificate request: {err}") from None
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify")
        try:
            public = csr.public_key()
        except (ValueError, TypeError) as err:
            raise CsrError(f"unreadable public key: {err}") from None
        if isinstance(public, ec.EllipticCurvePublicKey):
            if not isinstance(public.curve, ALLOWED_CURVES):
                raise CsrError(f"EC curve {public.curve.name} not allowed (P-256 or P-384)")
        elif isinstance(public, rsa.RSAPublicKey):
            if not RSA_MIN_BITS <= public.key_size <= RSA_MAX_BITS:
                raise CsrError(f"RSA key of {public.key_size} bits not allowed "
                               f"({RSA_MIN_BITS}-{RSA_MAX_BITS})")
        else:
            raise CsrError(f"key type {type(public).__name__} not allowed (EC or RSA)")
        try:
            constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
            if constraints.ca:
                raise CsrError("the CSR asks for a CA certificate")
        except x509.ExtensionNotFound:
            pass
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CsrError("the CSR has no subjectAltName") from None
        names = list(san)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(names) != 1 or uris != [spiffe_id]:
            raise CsrError(f"the CSR's SAN must be exactly URI:{spiffe_id}, got "
                           f"{', '.join(str(getattr(n, 'value', n)) for n in names)}")
        return csr

    def sign(self, csr_pem: str | bytes, spiffe_id: str,
             ttl: dt.timedelta | None = None) -> SignedCertificate:
        csr = self.validate_csr(csr_pem, spiffe_id)
        ttl = min(ttl or self.default_ttl, self.max_ttl)
        now = _now()
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        issuer_ski = x509.SubjectKeyIdentifier.from_public_key(self.cert.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([]))   # identity is the SAN (critical), as SPIFFE says
                .issuer_name(self.cert.subject).public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=True, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    issuer_ski), critical=False)
                .sign(self._key, hashes.SHA256()))
        chain = [cert] + ([self.cert] if self.cert not in self.roots else []) + \
            [c for c in self.chain if c not in self.roots]
        return SignedCertificate(chain_pem=_to_pem(chain), roots_pem=self.roots_pem,
                                 not_after=not_after, serial=cert.serial_number)


def issue_serving_certificate(ca: "CertificateAuthority", names: list[str],
                              ttl: dt.timedelta = dt.timedelta(days=365)) -> tuple[bytes, bytes]:
    """A TLS server certificate for the controller itself (config stream + CA), signed by the
    workload CA so nodes verify it with the trust bundle. ``names`` are DNS names or IPs.
    Returns (cert chain PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal-controller")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + ttl, ca.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca._key, hashes.SHA256()))
    chain = [cert] + ([ca.cert] if ca.cert not in ca.roots else []) + \
        [c for c in ca.chain if c not in ca.roots]
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return _to_pem(chain).encode(), key_pem


def parse_spiffe_from_csr(csr_pem: str | bytes) -> str:
    """The first URI SAN of a CSR ("" when none): the identity asked for by default."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else ""

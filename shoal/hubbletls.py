"""TLS for the flow APIs (Hubble 4244 on each agent, the relay's 4245), as Cilium does it.

A *Hubble CA*, separate from the mesh's workload CA: every meshed pod holds a workload
certificate, so trusting the workload CA here would let any pod read every flow. The
Hubble CA signs only

- each agent's server certificate (``<node>.<cluster>.hubble-grpc.cilium.io``, Cilium's name),
- the relay's server certificate (``*.hubble-relay.cilium.io``, localhost, its IPs),
- the relay's client certificate (it dials the agents with mTLS, as hubble-relay),
- the CLI's client certificate (``shoal observe``/``shoal ui``, or Hubble's own CLI
  with ``--tls --tls-client-cert-file ...``).

Both servers require a client certificate from this CA. The local cluster issues the set
at ``shoal up`` (``HubbleCertificates.ensure``); on Kubernetes the same files come from a
Secret mounted at ``SHOAL_HUBBLE_TLS_DIR``. Files: ``ca.pem`` and ``<name>.pem`` /
``<name>-key.pem`` (0600) per certificate.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

CA_FILE = "ca.pem"
RELAY_SERVER = "relay-server"
RELAY_CLIENT = "relay-client"
CLI_CLIENT = "cli-client"
LIFETIME = dt.timedelta(days=365)


def node_server_name(node: str, cluster: str) -> str:
    return f"{node}.{cluster}.hubble-grpc.cilium.io"


RELAY_SERVER_NAME = "relay.hubble-relay.cilium.io"
SHARED_NODE_SERVER = "server"


@dataclass(frozen=True)
class TlsFiles:
    """One party's certificate, key and the CA it trusts for its peers."""

    ca: Path
    cert: Path
    key: Path

    def exists(self) -> bool:
        return self.ca.exists() and self.cert.exists() and self.key.exists()

    def server_credentials(self):
        """gRPC server credentials that require a client certificate from the CA."""
        import grpc

        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=self.ca.read_bytes(), require_client_auth=True)

    def channel_credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                            private_key=self.key.read_bytes(),
                                            certificate_chain=self.cert.read_bytes())


def serve_tcp(server, address: str | None, tls, insecure: bool, what: str) -> int | None:
    """Binds ``address`` with mTLS when ``tls`` is given; plaintext only when asked (local use).

    Without either, TCP is not served: a plaintext flows API would be readable by any pod."""
    if not address:
        return None
    if tls is not None:
        return server.add_secure_port(address, tls.server_credentials())
    if insecure:
        log.warning("%s: PLAINTEXT on %s (insecure, for local use only)", what, address)
        return server.add_insecure_port(address)
    log.warning("%s: no TLS certificates, %s not served (Unix socket only)", what, address)
    return None


class HubbleCertificates:
    """The Hubble CA's directory: loads the CA, issues what is missing, hands out TlsFiles."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def files(self, name: str) -> TlsFiles:
        return TlsFiles(self.directory / CA_FILE, self.directory / f"{name}.pem",
                        self.directory / f"{name}-key.pem")

    def node(self, node: str) -> TlsFiles:
        """The agent's server certificate on ``node``: its own (local cluster), else the one
        every node shares on Kubernetes (``*.<cluster>.hubble-grpc.cilium.io``, as Cilium)."""
        own = self.files(f"server-{node}")
        return own if own.cert.exists() else self.files(SHARED_NODE_SERVER)

    def ensure(self, cluster: str, nodes: dict[str, str], relay_addresses: list[str],
               shared_node_certificate: bool = False) -> None:
        """Creates the CA once, then any certificate not there yet. ``nodes``: name -> IP;
        ``shared_node_certificate``: one wildcard server certificate for every node (Kubernetes,
        where nodes come and go; the relay dials each with its ``node_server_name``)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca_cert, ca_key = self._ca(cluster)
        wanted = {RELAY_SERVER: (["*.hubble-relay.cilium.io", RELAY_SERVER_NAME, "localhost", "127.0.0.1",
                                  "::1", *relay_addresses], True),
                  RELAY_CLIENT: ([f"relay-client.{cluster}.hubble-grpc.cilium.io"], False),
                  CLI_CLIENT: ([f"cli.{cluster}.hubble-grpc.cilium.io"], False)}
        for node, ip in nodes.items():
            wanted[f"server-{node}"] = ([node_server_name(node, cluster), ip], True)
        if shared_node_certificate:
            wanted[SHARED_NODE_SERVER] = ([f"*.{cluster}.hubble-grpc.cilium.io"], True)
        for name, (sans, server) in wanted.items():
            if not self.files(name).cert.exists():
                self._issue(name, sans, server, ca_cert, ca_key)

    def _ca(self, cluster: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        key_path = self.directory / "ca-key.pem"
        if not key_path.exists():
            from cryptography.hazmat.primitives.asymmetric import ec

            new_key = ec.generate_private_key(ec.SECP256R1())
            cert = _builder(f"shoal hubble CA {cluster}", new_key.public_key(), None, new_key, ca=True)
            _write(key_path, _key_pem(new_key))
            _write(self.directory / CA_FILE, cert.public_bytes(serialization.Encoding.PEM), private=False)
        cert = x509.load_pem_x509_certificate((self.directory / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key

    def _issue(self, name: str, sans: list[str], server: bool, ca_cert, ca_key) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        cert = _builder(sans[0], key.public_key(), ca_cert, ca_key, ca=False, sans=sans, server=server)
        files = self.files(name)
        _write(files.key, _key_pem(key))
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _builder(common_name: str, public_key, issuer, signing_key, *, ca: bool, sans: Sequence[str] = (),
             server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal hubble"),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer is not None else subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + LIFETIME)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        names: list[x509.GeneralName] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        builder = (builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = True) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m shoal.hubbletls --out DIR``: the Hubble CA and certificates for Kubernetes;
    then ``kubectl -n shoal-system create secret generic shoal-hubble-tls --from-file=DIR``
    (ca-key.pem stays out of the Secret: keep it offline to issue more)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shoal.hubbletls", description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cluster", default="shoal", help="SHOAL_CLUSTER of the agents (default shoal)")
    parser.add_argument("--relay-name", action="append", default=[],
                        help="extra DNS name or IP of the relay (e.g. its Service name)")
    args = parser.parse_args(argv)
    HubbleCertificates(args.out).ensure(args.cluster, {}, ["shoal-controller.shoal-system.svc", *args.relay_name],
                                        shared_node_certificate=True)
    print(f"Hubble CA and certificates in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

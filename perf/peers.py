"""The peers Shoal is measured against: stunnel4 and haproxy mTLS pairs.

Each pair has a TLS client end in the client pod (plaintext listeners on 127.0.0.1) and
a TLS server end in the server pod (TLS on the pod IP, forwarding to the local server on
127.0.0.1). Both ends present certificates from one test CA and verify the other side:
TLS 1.3, mutual authentication, the server's name checked by the client. Nagle is off on
every socket, as the Shoal proxy does, so small messages are not held back.
"""
from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.perf import procstat
from shoal.perf.scenario import Bed, Pod

SERVER_NAME = "perf-server"


@dataclass(frozen=True)
class Forward:
    """One tunnelled port: client pod 127.0.0.1:local -> server pod ip:tls -> 127.0.0.1:target."""

    name: str
    local: int
    tls: int
    target: int


def forwards(base: int, targets: Sequence[tuple[str, int]]) -> tuple[Forward, ...]:
    """One Forward per (name, target port): local base+1, TLS base+2, then base+3, base+4, ...

    Each path of a scenario takes its own ``base`` so that its two ends never share a port
    with another pair's.
    """
    return tuple(Forward(name, base + 2 * i + 1, base + 2 * i + 2, target)
                 for i, (name, target) in enumerate(targets))


@dataclass(frozen=True)
class CertPaths:
    ca: Path
    server_cert: Path
    server_key: Path
    server_pem: Path      # cert + key in one file (haproxy's crt)
    client_cert: Path
    client_key: Path
    client_pem: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def mint_certificates(directory: Path, server_ip: str) -> CertPaths:
    """A CA plus one server and one client certificate (P-256, valid one day)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("shoal-perf-ca")).issuer_name(_name("shoal-perf-ca"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def leaf(common: str, usage: x509.ObjectIdentifier, names: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    server_cert, server_key = leaf(SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address(server_ip)),
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/perf/sa/server")])
    client_cert, client_key = leaf("perf-client", ExtendedKeyUsageOID.CLIENT_AUTH, [
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/perf/sa/client")])
    paths = CertPaths(*(directory / n for n in ("ca.pem", "server.crt", "server.key", "server.pem",
                                                "client.crt", "client.key", "client.pem")))
    for path, data in ((paths.ca, ca_cert.public_bytes(serialization.Encoding.PEM)),
                       (paths.server_cert, server_cert), (paths.server_key, server_key),
                       (paths.server_pem, server_cert + server_key),
                       (paths.client_cert, client_cert), (paths.client_key, client_key),
                       (paths.client_pem, client_cert + client_key)):
        path.write_bytes(data)
        path.chmod(0o644)  # throwaway bench keys: the pods run as their own uids
    return paths


# -- stunnel4

def stunnel_client_config(certs: CertPaths, server_ip: str, forwards: Sequence[Forward]) -> str:
    lines = ["foreground = yes", "pid =", "debug = warning",
             "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1", ""]
    for f in forwards:
        lines += [f"[{f.name}]", "client = yes", f"accept = 127.0.0.1:{f.local}",
                  f"connect = {server_ip}:{f.tls}", f"cert = {certs.client_cert}",
                  f"key = {certs.client_key}", f"CAfile = {certs.ca}", "verifyChain = yes",
                  f"checkHost = {SERVER_NAME}", "sslVersionMin = TLSv1.3", ""]
    return "\n".join(lines)


def stunnel_server_config(certs: CertPaths, server_ip: str, forwards: Sequence[Forward]) -> str:
    lines = ["foreground = yes", "pid =", "debug = warning",
             "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1", ""]
    for f in forwards:
        lines += [f"[{f.name}]", f"accept = {server_ip}:{f.tls}", f"connect = 127.0.0.1:{f.target}",
                  f"cert = {certs.server_cert}", f"key = {certs.server_key}", f"CAfile = {certs.ca}",
                  "verifyChain = yes", "requireCert = yes", "sslVersionMin = TLSv1.3", ""]
    return "\n".join(lines)


# -- haproxy (tcp mode)

_HAPROXY_HEAD = """global
    log stderr format short local0 warning
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 2m
    timeout server 2m
"""


def haproxy_client_config(certs: CertPaths, server_ip: str, forwards: Sequence[Forward]) -> str:
    parts = [_HAPROXY_HEAD]
    for f in forwards:
        parts.append(f"listen {f.name}\n    bind 127.0.0.1:{f.local}\n"
                     f"    server {f.name} {server_ip}:{f.tls} ssl crt {certs.client_pem} "
                     f"ca-file {certs.ca} verify required verifyhost {SERVER_NAME}\n")
    return "\n".join(parts)


def haproxy_server_config(certs: CertPaths, server_ip: str, forwards: Sequence[Forward]) -> str:
    parts = [_HAPROXY_HEAD]
    for f in forwards:
        parts.append(f"listen {f.name}\n    bind {server_ip}:{f.tls} ssl crt {certs.server_pem} "
                     f"ca-file {certs.ca} verify required\n    server local 127.0.0.1:{f.target}\n")
    return "\n".join(parts)


ConfigWriter = Callable[[CertPaths, str, Sequence[Forward]], str]


@dataclass(frozen=True)
class PeerKind:
    name: str
    client_config: ConfigWriter
    server_config: ConfigWriter
    command: Callable[[Path], list[str]]
    process_name: str          # comm of the running tool, to sample its CPU and memory


STUNNEL = PeerKind("stunnel", stunnel_client_config, stunnel_server_config,
                   lambda c: ["stunnel4", str(c)], "stunnel4")
HAPROXY = PeerKind("haproxy", haproxy_client_config, haproxy_server_config,
                   lambda c: ["haproxy", "-db", "-f", str(c)], "haproxy")
PEERS = {p.name: p for p in (STUNNEL, HAPROXY)}


def listening(ss_output: str, address: str, port: int) -> bool:
    """Whether ``ss -Htln`` output shows a listener that accepts on address:port."""
    wanted = {f"{address}:{port}", f"*:{port}", f"[::]:{port}", f"0.0.0.0:{port}"}
    return any(field in wanted for line in ss_output.splitlines() for field in line.split()[3:4])


def wait_all_listening(pod: Pod, address: str, ports: Sequence[int], timeout: float = 10.0,
                       procs: Sequence["subprocess.Popen[bytes]"] = ()) -> None:
    """Poll ``ss`` inside the pod until something listens on every address:port.

    Stops early when one of ``procs`` (the servers being waited for) has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = pod.run(["ss", "-Htln"], timeout=10, check=False).stdout
        missing = [p for p in ports if not listening(out, address, p)]
        if not missing:
            return
        if any(proc.poll() is not None for proc in procs):
            raise TimeoutError(f"a server for {address}:{missing} exited in {pod.namespace}/{pod.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {address}:{missing} in {pod.namespace}/{pod.name}")
        time.sleep(0.1)


def wait_listening(pod: Pod, address: str, port: int, timeout: float = 10.0) -> None:
    wait_all_listening(pod, address, (port,), timeout)


@contextmanager
def pair(peer: PeerKind, bed: Bed, client: Pod, server: Pod, forwards: Sequence[Forward],
         workdir: Path) -> Iterator[Callable[[], list[int]]]:
    """Run the peer's two ends for the duration of the block.

    Yields a function returning the PIDs of both ends (for CPU and memory sampling).
    """
    directory = workdir / peer.name
    certs = mint_certificates(directory / "certs", server.ip)
    server_conf, client_conf = directory / "server.conf", directory / "client.conf"
    server_conf.write_text(peer.server_config(certs, server.ip, forwards))
    client_conf.write_text(peer.client_config(certs, server.ip, forwards))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(server.spawn(peer.command(server_conf), log=directory / "server.log"))
        procs.append(client.spawn(peer.command(client_conf), log=directory / "client.log"))
        try:
            wait_all_listening(server, server.ip, [f.tls for f in forwards], procs=procs)
            wait_all_listening(client, "127.0.0.1", [f.local for f in forwards], procs=procs)
        except TimeoutError:
            # A bad config makes the tool exit at once: its own log says why.
            for proc, end in zip(procs, ("server", "client")):
                if proc.poll() is not None:
                    log = (directory / f"{end}.log").read_text()[-500:]
                    raise RuntimeError(f"{peer.name} {end} end exited ({proc.returncode}): {log}") from None
            raise
        yield lambda: [pid for proc in procs for pid in procstat.pids_in_group(proc.pid, peer.process_name)]
    finally:
        for proc in procs:
            bed.stop(proc)

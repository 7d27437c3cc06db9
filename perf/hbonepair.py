"""A local HBONE pair on loopback: the node proxy's data path without a cluster.

    app -> TCP listener -> client HboneSession ==TLS 1.3, HTTP/2 CONNECT==> server HboneSession -> upstream

Both ends are the real drivers (``shoal.hbone.session``: ``HboneSession`` and
``StreamPeer``), over real sockets and real TLS, in one process. Each end can run the
fast path or the h2 path, so tests carry the same bytes through every combination, and
profiles (py-spy) and benchmarks see the data path alone:

    python -m shoal.perf.hbonepair --listen 5301 --upstream 127.0.0.1:5201 [--client-path h2] [--server-path h2]
    iperf3 -c 127.0.0.1 -p 5301

``--role server --tls-port P`` and ``--role client --tls-port P`` (with one ``--certs``
directory) run the two ends as two processes, as two node proxies are: each hop then
wakes another process, which a one-process pair never pays.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal.hbone import framing
from shoal.hbone.identity import DirectSSLObject
from shoal.hbone.session import HboneSession, StreamPeer

SERVER_NAME = "hbone-pair"


@dataclass
class PairRecord:
    """The drivers' transfer record (``session.TransferRecord``)."""
    bytes_in: int = 0
    bytes_out: int = 0
    failure: str = ""
    reset_reason: str = ""

    def failed(self, reason: str) -> None:
        self.failure = self.failure or reason

    def reset(self, reason: str) -> None:
        self.reset_reason = self.reset_reason or reason


def tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: one self-signed P-256 certificate both trust, TLS 1.3, h2.
    A certificate already in ``directory`` is used (the two ends of a split pair share it)."""
    cert_path, key_path = directory / "pair.crt", directory / "pair.key"
    if not key_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        _make_certificate(cert_path, key_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert_path, key_path)
    server.set_alpn_protocols(["h2"])
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_verify_locations(cert_path)
    client.set_alpn_protocols(["h2"])
    for context in (server, client):   # as the node proxy's (identity._context)
        context.sslobject_class = DirectSSLObject
    return server, client


def _make_certificate(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


@dataclass
class HbonePair:
    """One HBONE connection between two local ends; every accepted TCP connection on
    ``port`` becomes a stream to ``upstream``. ``records`` keep each stream's counts."""
    upstream: tuple[str, int]
    client_fast: bool = True
    server_fast: bool = True
    port: int = 0
    records: list[PairRecord] = field(default_factory=list)
    client: HboneSession | None = None
    server: HboneSession | None = None

    async def start(self, listen_port: int = 0, role: str = "both", tls_port: int = 0,
                    certs: Path | None = None) -> "HbonePair":
        """``role`` "both": the two ends here, joined over an ephemeral TLS port. "server":
        only the serving end, on ``tls_port``; "client": only the app-facing end, dialling
        ``tls_port`` (two processes, as two node proxies are). Split ends share ``certs``."""
        loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        self._tmp = tempfile.TemporaryDirectory(prefix="hbone-pair-")
        server_tls, client_tls = tls_contexts(certs or Path(self._tmp.name))
        accepted: asyncio.Future[HboneSession] = loop.create_future()
        self._tls_server: asyncio.Server | None = None
        self._listener: asyncio.Server | None = None

        def server_session() -> HboneSession:
            session = HboneSession(client_side=False, idle_timeout=0, on_request=self._serve,
                                   fast_path=self.server_fast)
            if not accepted.done():
                accepted.set_result(session)
            return session

        if role != "client":
            self._tls_server = await loop.create_server(server_session, "127.0.0.1", tls_port, ssl=server_tls)
            tls_port = self._tls_server.sockets[0].getsockname()[1]
        if role == "server":
            self.port = tls_port
            return self
        client = self.client = HboneSession(client_side=True, idle_timeout=0, fast_path=self.client_fast)
        for attempt in range(100):   # a serving end started beside us may still be importing
            try:
                await loop.create_connection(lambda: client, "127.0.0.1", tls_port, ssl=client_tls,
                                             server_hostname=SERVER_NAME)
                break
            except ConnectionRefusedError:
                if role == "both" or attempt == 99:
                    raise
                await asyncio.sleep(0.1)
        if role == "both":
            self.server = await accepted
        self._listener = await loop.create_server(self._accept, "127.0.0.1", listen_port, backlog=1024)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self

    def _accept(self) -> StreamPeer:
        if self.client is None:
            raise RuntimeError("the pair's client end accepts only after start()")
        record = PairRecord()
        self.records.append(record)
        peer = StreamPeer(record, on_finished=lambda r: None, tcp_is_client=True)
        response = peer.response = asyncio.get_running_loop().create_future()
        self.client.open_stream(peer, self.upstream[0], self.upstream[1], "127.0.0.1", framing.new_traceparent())
        self._spawn(self._established(peer, response))
        return peer

    async def _established(self, peer: StreamPeer, response: asyncio.Future) -> None:
        try:
            status = await response
        except ConnectionError:
            status = 0
        if status == framing.STATUS_OK:
            peer.established()
        elif peer.transport is not None:
            peer.transport.abort()

    def _serve(self, session: HboneSession, request: framing.TunnelRequested) -> asyncio.Task:
        return self._spawn(self._dial(session, request))

    def upstream_peer(self, request: framing.TunnelRequested) -> StreamPeer:
        """The serving end's stream peer for ``request`` (a bench may report it elsewhere)."""
        return StreamPeer(PairRecord(), on_finished=lambda r: None, tcp_is_client=False)

    def answered(self, peer: StreamPeer) -> None:
        """The serving end answered 200 and joined ``peer``'s upstream socket."""
        peer.established()

    async def _dial(self, session: HboneSession, request: framing.TunnelRequested) -> None:
        peer = self.upstream_peer(request)
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(lambda: peer, request.host, request.port)
        except OSError:
            session.refuse_stream(request.stream_id, framing.STATUS_UNAVAILABLE)
            return
        if not session.accept_stream(peer, request.stream_id):
            transport.abort()
            return
        self.answered(peer)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for server in (self._listener, self._tls_server):
            if server is not None:
                server.close()
        for session in (self.client, self.server):
            if session is not None:
                session.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        self._tmp.cleanup()


async def _serve_forever(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    pair = await HbonePair((host, int(port)), client_fast=args.client_path == "fast",
                           server_fast=args.server_path == "fast").start(
        args.listen, args.role, args.tls_port, Path(args.certs) if args.certs else None)
    print(f"hbone pair ({args.role}): 127.0.0.1:{pair.port} -> {args.upstream} "
          f"(client {args.client_path} path, server {args.server_path} path)", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, default=0, help="local port for the app side (0: any)")
    parser.add_argument("--upstream", required=True, help="host:port each stream is carried to")
    parser.add_argument("--role", choices=("both", "client", "server"), default="both",
                        help="both ends here, or one of them (the other in another process)")
    parser.add_argument("--tls-port", type=int, default=0, help="the HBONE port between split ends")
    parser.add_argument("--certs", help="directory with the certificate split ends share (made if missing)")
    for end in ("client", "server"):
        parser.add_argument(f"--{end}-path", choices=("fast", "h2"), default="fast",
                            help=f"the {end} end's DATA path (h2: every frame through h2, the reference)")
    args = parser.parse_args()
    import uvloop
    uvloop.run(_serve_forever(args))


if __name__ == "__main__":
    main()

"""``ConfigClient``: the node's end of the config stream and of the CA.

The thin asyncio/gRPC driver around ``DeltaReceiver``: connects, sends the resume hello,
applies every push to ``ConfigState`` and ACKs/NACKs it, and reconnects with backoff
forever. While the controller is away the state keeps its last config; the data path
keeps serving from it.
"""
from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import grpc

from shoal.api import config_pb2 as pb
from shoal.api import config_pb2_grpc as pb_grpc
from shoal.xds.delta import DeltaReceiver, Validator
from shoal.xds.state import ConfigState

log = logging.getLogger(__name__)

# A full config for 20k pods is several MB: lift gRPC's 4 MB default on both ends.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Every address of the target (a headless Service over the controller replicas, or
    # ``ipv4:a:p,b:p``) gets a connection, and calls take them in turn: a certificate
    # request a standby refuses is retried on the other replica.
    ("grpc.lb_policy_name", "round_robin"),
)
# Attempts of a certificate request answered UNAVAILABLE (a standby replica, or none up).
SIGN_ATTEMPTS = 3


def read_token(path: str | Path) -> str:
    """Reads a node credential / ServiceAccount token file (whitespace stripped)."""
    return Path(path).read_text().strip()


class ConfigClient:
    def __init__(self, address: str, node: str, token: str | Path, state: ConfigState,
                 component: str = "agent", validator: Validator | None = None,
                 min_backoff: float = 0.1, max_backoff: float = 2.0,
                 ca_bundle: str | Path | None = None, server_name: str | None = None) -> None:
        """``ca_bundle``: path of the controller's root certificate(s) (``SHOAL_CA_BUNDLE``);
        when set the stream uses TLS and verifies the controller against it (and against
        ``server_name`` instead of the address's host, if given). None: plaintext.

        ``token``: the node's credential (local cluster) or projected ServiceAccount token
        (Kubernetes); a Path is re-read for every call, as the kubelet rotates the token.
        The controller derives the node from it: the client declares nothing else."""
        self.address = address
        self.ca_bundle = Path(ca_bundle) if ca_bundle else None
        self.server_name = server_name
        self.node = node
        self.state = state
        self.receiver = DeltaReceiver(node=node, component=component, validator=validator)
        self._token = token
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._channel: grpc.aio.Channel | None = None
        self.connected = False
        self.synced = asyncio.Event()   # set once the first push of a connection is applied
        self.pushes_applied = 0
        self.nacks_sent = 0
        self.reconnects = 0

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = read_token(self._token) if isinstance(self._token, Path) else self._token
        return (("authorization", f"Bearer {token}"),)

    def _get_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self.ca_bundle is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self.ca_bundle.read_bytes())
                options: tuple[tuple[str, int | str], ...] = CHANNEL_OPTIONS
                if self.server_name:
                    options += (("grpc.ssl_target_name_override", self.server_name),)
                self._channel = grpc.aio.secure_channel(self.address, credentials,
                                                        options=options)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def run(self) -> None:
        """Streams config forever; reconnects with jittered exponential backoff."""
        backoff = self._min_backoff
        while True:
            try:
                got_push = await self._stream_once()
            except grpc.aio.AioRpcError as err:
                got_push = False
                log.warning("config stream to %s: %s %s", self.address, err.code().name,
                            err.details())
            except OSError as err:   # the CA bundle or the token is not there (yet)
                got_push = False
                log.warning("config stream to %s: cannot read CA bundle or token: %s",
                            self.address, err)
            finally:
                self.connected = False
            if got_push:
                backoff = self._min_backoff
            self.reconnects += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self._max_backoff)

    async def _stream_once(self) -> bool:
        stub = pb_grpc.ConfigDiscoveryStub(self._get_channel())
        # Explicit write()/read() rather than a request generator: nothing is left running
        # when the call is cancelled.
        call = stub.StreamConfig(metadata=self._metadata)
        got_push = False
        try:
            await call.write(self.receiver.hello())
            while True:
                push = await call.read()
                if push is grpc.aio.EOF:
                    break
                self.connected = True
                delta, reply = self.receiver.on_push(push)
                self.state.apply(delta)
                if reply.HasField("error_detail"):
                    self.nacks_sent += 1
                    log.warning("NACK push %s (version %s): %s", push.nonce,
                                push.system_version, reply.error_detail.message)
                await call.write(reply)
                self.pushes_applied += 1
                got_push = True
                self.synced.set()
        finally:
            call.cancel()
        return got_push

    async def sign_certificate(self, csr_pem: str | bytes, spiffe_id: str = "",
                               ttl_seconds: int = 0, timeout: float = 10.0) -> tuple[str, str]:
        """Asks the controller's CA to sign ``csr_pem``; returns (cert_chain_pem, roots_pem).

        ``spiffe_id`` defaults to the CSR's URI SAN. Raises grpc.aio.AioRpcError
        (PERMISSION_DENIED, INVALID_ARGUMENT...) when refused. UNAVAILABLE (a standby
        replica, which signs nothing) is retried: round-robin takes the next replica.
        """
        if isinstance(csr_pem, bytes):
            csr_pem = csr_pem.decode()
        request = pb.CertificateRequest(csr_pem=csr_pem, spiffe_id=spiffe_id, ttl_seconds=ttl_seconds)
        for attempt in range(1, SIGN_ATTEMPTS):
            try:
                return await self._sign_once(request, timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.info("certificate request: %s; retrying", err.details())
                await asyncio.sleep(0.05 * attempt)
        return await self._sign_once(request, timeout)

    async def _sign_once(self, request: pb.CertificateRequest, timeout: float) -> tuple[str, str]:
        stub = pb_grpc.CertificateAuthorityStub(self._get_channel())
        reply = await stub.SignCertificate(request, metadata=self._metadata, timeout=timeout)
        return reply.cert_chain_pem, reply.roots_pem

    async def trust_bundle(self, timeout: float = 10.0) -> str:
        stub = pb_grpc.CertificateAuthorityStub(self._get_channel())
        reply = await stub.TrustBundle(pb.TrustBundleRequest(), metadata=self._metadata,
                                       timeout=timeout)
        return reply.roots_pem

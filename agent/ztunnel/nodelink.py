"""The node proxy's link to the controller: the config stream and the certificates.

One per node proxy, in the process that talks to the controller: the single process
(``--workers 1``), or the supervisor of N workers, which hands what it gets to every
worker over ``feed.py``. So a node opens one config stream and asks for each SVID once,
however many workers it runs, and only this process imports ``grpc`` and
``cryptography`` (tests/agent/ztunnel/test_app.py keeps them out of the workers).

As in ztunnel, the config stream is the only writer of ``state``, and the identity
manager owns the certificates: it asks the CA only for identities of pods the agent
handed to this node proxy (and the controller signs nothing else for this node).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable

import grpc

from shoal.agent.ztunnel.config import ProxyConfig
from shoal.hbone.identity import IdentityError, Signer, SignerUnavailable, Svid
from shoal.hbone.issuer import IdentityManager
from shoal.xds.client import ConfigClient
from shoal.xds.state import ConfigState

log = logging.getLogger(__name__)

# The controller's CA answering these is down, restarting or busy: retried with backoff.
TRANSIENT_RPC_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                                 grpc.StatusCode.CANCELLED})


class NodeLink:
    """The config stream (writing ``state``) and the identity manager (signing through the
    controller's CA unless a ``signer`` is handed in: tests, benches)."""

    def __init__(self, config: ProxyConfig, state: ConfigState, *, signer: Signer | None = None,
                 config_client: ConfigClient | None = None, on_error: Callable[[str], None] | None = None,
                 on_issued: Callable[[Svid], None] | None = None, on_dropped: Callable[[str], None] | None = None):
        self.config = config
        self.state = state
        self._config_client = config_client
        self.identities = IdentityManager(signer or self._controller_signer(), config.trust_domain,
                                          on_error=on_error, on_issued=on_issued, on_dropped=on_dropped)

    @property
    def streams_config(self) -> bool:
        return bool(self.config.controller) or self._config_client is not None

    def _controller_signer(self) -> Signer:
        async def sign(csr_pem: bytes):
            try:
                chain, roots = await self.client().sign_certificate(csr_pem, ttl_seconds=self.config.cert_ttl_seconds)
            except grpc.aio.AioRpcError as exc:
                # Down or restarting (UNAVAILABLE, DEADLINE_EXCEEDED...) is retried with
                # backoff by the identity manager; a refusal is final.
                error = SignerUnavailable if exc.code() in TRANSIENT_RPC_CODES else IdentityError
                raise error(f"controller CA: {exc.code().name}: {exc.details()}") from None
            to_bytes = lambda v: v.encode() if isinstance(v, str) else v
            return to_bytes(chain), to_bytes(roots)
        return sign

    def client(self) -> ConfigClient:
        if self._config_client is None:
            token = Path(self.config.token_file) if self.config.token_file else ""
            self._config_client = ConfigClient(self.config.controller, self.config.node, token, self.state,
                                               component="proxy", ca_bundle=self.config.ca_bundle or None)
        return self._config_client

    def start(self, synced: asyncio.Event, on_rotated: Callable[[int], None]) -> list[asyncio.Task]:
        """The config stream (``synced`` is set once its first snapshot is applied; at once
        when there is no controller: the state was handed in) and the rotation loop."""
        tasks = [asyncio.ensure_future(self._rotate(on_rotated))]
        if self.streams_config:
            client = self.client()
            tasks.append(asyncio.ensure_future(client.run()))
            tasks.append(asyncio.ensure_future(self._mark_synced(client.synced, synced)))
        else:
            synced.set()
        return tasks

    @staticmethod
    async def _mark_synced(source: asyncio.Event, target: asyncio.Event) -> None:
        await source.wait()
        target.set()

    async def _rotate(self, on_rotated: Callable[[int], None]) -> None:
        while True:
            await asyncio.sleep(self.config.rotation_check_interval)
            rotated = await self.identities.rotate_due()
            if rotated:
                on_rotated(rotated)

    async def close(self) -> None:
        if self._config_client is not None:
            await self._config_client.close()

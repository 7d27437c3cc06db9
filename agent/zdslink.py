"""The agent's end of the pod handover to the node proxy (contract B), kept alive.

Connects to the proxy's ZDS socket, replays every enrolled pod with its namespace fd,
sends snapshot_sent, then serves live add/remove until the proxy goes away; then
reconnects with backoff and replays again (a restarted proxy learns every pod).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable

from shoal.agent.cgroupid import peer_cgroup_id
from shoal.agent.enrolment import EnrolledPod
from shoal.zds import PodInfo, ZdsClient, ZdsError

log = logging.getLogger(__name__)


class ProxyLinkError(RuntimeError):
    pass


class ZdsProxyLink:
    def __init__(self, path: Path | str, min_backoff: float = 0.1, max_backoff: float = 2.0,
                 on_proxy_cgroup: Callable[[int], None] | None = None):
        """on_proxy_cgroup(id): called with the proxy's cgroup id on each connection, before
        any pod is handed over (its sockets must be exempt from capture first)."""
        self.path = Path(path)
        self.on_proxy_cgroup = on_proxy_cgroup
        self._client: ZdsClient | None = None
        self._synced = False
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.connects = 0

    @property
    def connected(self) -> bool:
        """True once the current connection got its snapshot: live changes may flow."""
        return self._synced and self._client is not None and self._client.connected

    async def add(self, pod: EnrolledPod) -> None:
        if self._client is None or not self._client.connected:
            raise ProxyLinkError("node proxy not connected")
        fd = os.open(pod.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._client.add(PodInfo(pod.uid, pod.namespace, pod.name, pod.ip, pod.service_account,
                                                   pod.ips), fd)
        except ZdsError as err:
            raise ProxyLinkError(f"proxy refused {pod.namespace}/{pod.name}: {err}") from err
        finally:
            os.close(fd)

    async def remove(self, uid: str) -> None:
        if self._client is None or not self._client.connected:
            raise ProxyLinkError("node proxy not connected")
        try:
            await self._client.remove(uid)
        except ZdsError as err:
            raise ProxyLinkError(str(err)) from err

    @staticmethod
    def _proxy_cgroup(client: ZdsClient) -> int:
        with socket.socket(fileno=os.dup(client.fileno())) as sock:
            try:
                return peer_cgroup_id(sock)
            except OSError as err:
                log.error("cannot learn the node proxy's cgroup (%s): its own connections would be "
                          "captured, so no pod is handed to it", err)
                raise ProxyLinkError(f"proxy cgroup unknown: {err}") from err

    async def run(self, replay: Callable[["ZdsProxyLink"], Awaitable[None]],
                  on_synced: Callable[[], Awaitable[None]] | None = None) -> None:
        """Forever: connect, replay (under the enroller's lock), snapshot_sent, wait for loss."""
        backoff = self.min_backoff
        while True:
            client = ZdsClient(self.path)
            try:
                await client.connect()
                if self.on_proxy_cgroup is not None:
                    self.on_proxy_cgroup(self._proxy_cgroup(client))
                self._client = client
                await replay(self)
                await client.snapshot_sent()
                self._synced = True
                self.connects += 1
                backoff = self.min_backoff
                log.info("node proxy connected at %s (connection %d)", self.path, self.connects)
                if on_synced is not None:
                    await on_synced()
                await client.wait_closed()
                log.warning("node proxy went away; enrolled pods stay captured (fail closed)")
            except (ZdsError, ProxyLinkError, OSError) as err:
                log.debug("node proxy not reachable at %s: %s", self.path, err)
            finally:
                self._synced = False
                self._client = None
                await client.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

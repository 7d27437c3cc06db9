"""Helpers shared by the node proxy's tests and perf scenario: a stand-in for the agent's
original-destination map, an echo app inside a pod namespace, workload builders."""
from __future__ import annotations

import asyncio
import socket

from shoal.xds.model import Workload

CLIENT_IP, SERVER_IP, OTHER_IP = "10.250.0.1", "10.250.0.2", "10.250.0.3"


def workload(name, ip, sa, ns="demo", meshed=True, **kw) -> Workload:
    return Workload(uid=f"uid-{name}", name=name, namespace=ns, service_account=sa, node="node-1", ip=ip,
                    identity=hash(sa) & 0xffff, spiffe_id=f"spiffe://cluster.local/ns/{ns}/sa/{sa}",
                    meshed=meshed, canonical_service=name, **kw)


class FakeOrigdst:
    """Stands in for the agent's sockops map: client source port -> original destination."""

    def __init__(self):
        self.by_port: dict[int, tuple[str, int]] = {}

    def lookup(self, sock):
        port = sock.getpeername()[1]
        if port not in self.by_port:
            raise LookupError(port)
        return self.by_port.pop(port)


class EchoServer:
    """An app in a pod namespace: echoes, and remembers client addresses."""

    def __init__(self, greeting: bytes = b""):
        self.peers: list[tuple] = []
        self.server = None
        self.greeting = greeting  # server-first protocols speak before the client

    async def start(self, netns_path: str, ip: str, port: int):
        """Listen on all addresses of the pod (``ip`` names the pod, for readers)."""
        from shoal.agent.ztunnel.netns import NetnsHandle

        home = NetnsHandle.current()
        ns = NetnsHandle.from_path(netns_path, home)
        with ns.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))  # the proxy delivers over the pod's loopback
        sock.setblocking(False)
        ns.close()
        # asyncio listens again with its own backlog (100 by default): an app that cannot
        # queue a burst would reset connections the proxy already carried to it.
        self.server = await asyncio.start_server(self._serve, sock=sock, backlog=4096)
        return self

    async def _serve(self, reader, writer):
        self.peers.append(writer.get_extra_info("peername"))
        if self.greeting:
            writer.write(self.greeting)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self):
        self.server.close()

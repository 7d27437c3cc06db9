"""Helpers shared by the node proxy's tests and perf scenario: a stand-in for the agent's
original-destination map, an echo app inside a pod namespace, workload builders."""
from __future__ import annotations

import asyncio
import socket

from shoal.xds.model import Workload, canonical_ip
from tests.conftest import until  # noqa: F401  (the ztunnel tests import it from here)

CLIENT_IP, SERVER_IP, OTHER_IP = "10.250.0.1", "10.250.0.2", "10.250.0.3"
CLIENT_IP6, SERVER_IP6, OTHER_IP6 = "fd00:250::1", "fd00:250::2", "fd00:250::3"


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
        self.finished = 0        # connections the client side has closed
        self.server = None
        self.greeting = greeting  # server-first protocols speak before the client

    async def start(self, netns_path: str, ip: str, port: int, bind: str = "::"):
        """Listen in the pod on ``bind``: by default every address of both families (``ip``
        names the pod, for readers); an app bound to its pod IP or to loopback passes it."""
        from shoal.agent.ztunnel.netns import NetnsHandle

        home = NetnsHandle.current()
        ns = NetnsHandle.from_path(netns_path, home)
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        with ns.entered():
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind, port))
        sock.setblocking(False)
        ns.close()
        # asyncio listens again with its own backlog (100 by default): an app that cannot
        # queue a burst would reset connections the proxy already carried to it.
        self.server = await asyncio.start_server(self._serve, sock=sock, backlog=4096)
        return self

    async def _serve(self, reader, writer):
        peer = writer.get_extra_info("peername")
        self.peers.append((canonical_ip(peer[0]), *peer[1:]))
        if self.greeting:
            writer.write(self.greeting)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.finished += 1
            writer.close()

    def close(self):
        self.server.close()

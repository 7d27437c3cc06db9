"""Original destination of a captured outbound connection, for the node proxy.

The proxy accepts on 15001 inside the pod's namespace; the connect4 program
rewrote the app's destination, and sockops recorded the original one keyed by the
app socket's (netns cookie, ip, port), which is the accepted socket's peer.

    dests = OriginalDestinations(layout.bpf_pin_dir(node))
    ip, port = dests.lookup(accepted_sock)      # LookupError when not captured

Both families: the accepted socket's peer is 127.0.0.1 (or ::ffff:127.0.0.1 on a dual-stack
listener) for an IPv4 destination, ::1 for an IPv6 one; the answer is '10.0.0.5' or 'fd00::5'.

No bcc needed: one bpf(2) lookup on the pinned map per accepted connection.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from shoal.datapath import bpfsys
from shoal.datapath.structs import Addr, OrigDst, OrigDstKey, be16_to_port
from shoal.netns import socket_netns_cookie


class OriginalDestinations:
    def __init__(self, pin_dir: Path | str):
        self._fd = bpfsys.obj_get(Path(pin_dir) / "origdst")

    def lookup(self, sock: socket.socket) -> tuple[str, int]:
        """(ip, port) the app connected to; LookupError if the connection was not captured."""
        peer_ip, peer_port = sock.getpeername()[:2]
        return self.lookup_peer(socket_netns_cookie(sock), peer_ip, peer_port)

    def lookup_peer(self, netns_cookie: int, peer_ip: str, peer_port: int) -> tuple[str, int]:
        key = OrigDstKey(cookie=netns_cookie, ip=Addr.of(peer_ip), port=peer_port)
        value = OrigDst()
        if not bpfsys.map_lookup(self._fd, key, value):
            raise LookupError(f"no original destination for {peer_ip}:{peer_port} (netns {netns_cookie})")
        return value.ip.text(), be16_to_port(value.port)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "OriginalDestinations":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

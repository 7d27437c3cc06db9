"""The outbound HBONE dial against a peer that resets it (issue 18, the 10,000-connection
burst): a peer proxy shedding connections it queued too long resets them right after
accepting. That failed dial once freed a socket that still named a number libuv had
closed, and closed whichever connection had that number next (``FileExistsError: [Errno
17] File exists`` on a later connection, then a proxy dead without a log line)."""
from __future__ import annotations

import asyncio
import gc
import os
import select
import socket
import struct
from types import SimpleNamespace

import pytest

from shoal.agent.ztunnel.netns import NetnsHandle
from shoal.agent.ztunnel.outbound import dial
from shoal.hbone.handshakes import HandshakeLimits
from shoal.hbone.pool import PoolKey
from tests.shoal.hbone.test_handoff import client_context, sockets_until

pytestmark = pytest.mark.timeout(30)


class ResettingPeer:
    """A listener that resets each connection as soon as it is accepted, and says when the
    reset has reached the client (so the ClientHello meets it)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.reset: list[int] = []

    def reset_next(self) -> None:
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


class ResetBeforeHelloNetns:
    """The pod namespace of the test's own thread, whose sockets wait, once connected, for
    the peer's reset before the TLS layer gets them."""

    def __init__(self, peer: ResettingPeer):
        self.home = NetnsHandle.current()
        self.peer = peer
        self.made: list[tuple[socket.socket, int, int]] = []   # each socket, its number, what that opened

    def socket(self, family: int) -> socket.socket:
        sock = self.home.socket(family)
        self.made.append((sock, sock.fileno(), os.fstat(sock.fileno()).st_ino))
        return sock


def names_a_socket_not_its_own(sock: socket.socket, identity: int) -> bool:
    """Whether closing ``sock`` would close something else (or nothing it still has)."""
    if sock.fileno() == -1:
        return False
    try:
        return os.fstat(sock.fileno()).st_ino != identity
    except OSError:
        return True


async def test_a_dial_reset_before_its_client_hello_closes_no_other_connection(monkeypatch):
    peer = ResettingPeer()
    netns = ResetBeforeHelloNetns(peer)
    loop = asyncio.get_running_loop()
    real_connect = loop.sock_connect

    async def connect_then_get_reset(sock, address):
        await real_connect(sock, address)
        peer.reset_next()
        poller = select.poll()
        poller.register(sock, select.POLLERR | select.POLLHUP)
        assert poller.poll(2000), "the reset did not arrive"

    monkeypatch.setattr(loop, "sock_connect", connect_then_get_reset)
    svid = SimpleNamespace(client_context=client_context())

    async def identity(_spiffe_id):
        return svid

    ctx = SimpleNamespace(identities=SimpleNamespace(get=identity), tcp_reads=None,
                          config=SimpleNamespace(connect_timeout=2.0, pool_idle_timeout=60.0,
                                                 handshake_limits=HandshakeLimits(timeout=2.0)),
                          pool=SimpleNamespace(discard=lambda session: None))
    key = PoolKey("spiffe://cluster.local/ns/a/sa/a", "spiffe://cluster.local/ns/b/sa/b", "127.0.0.1", peer.port)
    try:
        with pytest.raises(ConnectionError):
            await dial(ctx, SimpleNamespace(netns=netns), key)
        await asyncio.sleep(0.01)   # the closes the loop queued have run
        [(sock, number, identity)] = netns.made
        assert not names_a_socket_not_its_own(sock, identity)
        others = sockets_until(number)   # one takes the failed dial's number
        try:
            [other] = [s for s in others if s.fileno() == number]
            identity_before = os.fstat(other.fileno()).st_ino
            netns.made.clear()
            del sock
            gc.collect()   # frees whatever the failed dial left behind
            assert os.fstat(other.fileno()).st_ino == identity_before, "the failed dial closed another socket"
        finally:
            for s in others:
                s.close()
    finally:
        peer.listener.close()
        netns.home.close()

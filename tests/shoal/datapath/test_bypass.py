"""The same-node bypass in the kernel: the real verdict program on the real pinned maps,
sockets in two pod namespaces (the client side in pod a's, the server side in pod b's,
each over its loopback, as the node proxy holds them)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import threading
import time

import pytest

from shoal.netns import in_netns
from tests.agent.agentbed import agent_bed, datapath  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _tcp_pair(netns_path: str) -> tuple[socket.socket, socket.socket]:
    """(dialling, accepted) TCP sockets over the namespace's loopback."""
    def make():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        dialled = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        listener.close()
        return dialled, accepted
    return in_netns(netns_path, make)


class Joined:
    """client app <-> proxy(client side) ~kernel~ proxy(server side) <-> server app."""

    def __init__(self, bed, bypass, early: tuple[bytes, bytes] = (b"", b"")):
        self.app_client, self.proxy_client = _tcp_pair(bed.a.netns_path)
        self.proxy_server, self.app_server = _tcp_pair(bed.b.netns_path)
        for sock in self.sockets:
            sock.settimeout(10)
        if early[0]:
            self.app_client.sendall(early[0])
        if early[1]:
            self.app_server.sendall(early[1])
        time.sleep(0.05)   # queued on the proxy's sockets before the join
        self.pair = bypass.join(self.proxy_client, self.proxy_server)

    @property
    def sockets(self):
        return (self.app_client, self.proxy_client, self.proxy_server, self.app_server)

    def close(self):
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def bypass(agent_bed, datapath):
    from shoal.datapath.bypass import KernelBypass
    handle = KernelBypass(agent_bed.pin_dir)
    yield handle
    handle.close()


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        data = sock.recv(min(1 << 20, size - got))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _read_until_quiet(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes; fewer if the socket's timeout passes with none (what arrived is
    what the failure reports)."""
    chunks, got = [], 0
    while got < size:
        try:
            data = sock.recv(min(1 << 20, size - got))
        except TimeoutError:
            break
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def test_bytes_queued_before_the_join_go_first_then_large_transfers_both_ways_are_identical(agent_bed, bypass):
    joined = Joined(agent_bed, bypass, early=(b"GET / early", b"220 banner"))
    try:
        assert _read_exactly(joined.app_server, 11) == b"GET / early"
        assert _read_exactly(joined.app_client, 10) == b"220 banner"
        size = 48 * 1024 * 1024
        up, down = os.urandom(size), os.urandom(size // 2)
        received = {}

        def pump(name, src, dst, data):
            sender = threading.Thread(target=src.sendall, args=(data,))
            sender.start()
            received[name] = hashlib.sha256(_read_exactly(dst, len(data))).hexdigest()
            sender.join()
        threads = [threading.Thread(target=pump, args=("up", joined.app_client, joined.app_server, up)),
                   threading.Thread(target=pump, args=("down", joined.app_server, joined.app_client, down))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert received == {"up": hashlib.sha256(up).hexdigest(), "down": hashlib.sha256(down).hexdigest()}
        counts = bypass.counts(joined.pair)
        assert (counts.client_to_server, counts.server_to_client, counts.unredirected) == \
            (size + 11, size // 2 + 10, 0)
        # nothing climbed to the proxy: its sockets hold no byte to read
        for sock in (joined.proxy_client, joined.proxy_server):
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        bypass.release(joined.pair)
        joined.close()


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_is_seen_by_the_proxy_and_forwarded_after_the_bytes(agent_bed, bypass, first):
    joined = Joined(agent_bed, bypass)
    try:
        closer, closer_proxy, other_proxy, other_app = (
            (joined.app_client, joined.proxy_client, joined.proxy_server, joined.app_server) if first == "client"
            else (joined.app_server, joined.proxy_server, joined.proxy_client, joined.app_client))
        payload = os.urandom(8 * 1024 * 1024)
        received = []
        reader = threading.Thread(target=lambda: received.append(_read_to_eof(other_app)))
        reader.start()
        closer.sendall(payload)
        closer.shutdown(socket.SHUT_WR)
        assert closer_proxy.recv(1) == b""          # the proxy learns EOF, holding no data
        deadline = time.monotonic() + 10
        while not bypass.drained(joined.pair, toward_server=first == "client"):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        other_proxy.shutdown(socket.SHUT_WR)       # what the proxy does once drained
        reader.join(10)
        assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
        # the other direction still flows after the half-close
        other_app.sendall(b"answer after half-close")
        assert _read_exactly(closer, 23) == b"answer after half-close"
    finally:
        bypass.release(joined.pair)
        joined.close()


def _in_sockhash(pin_dir, cookie: int) -> bool:
    from shoal.datapath import bpfsys
    fd = bpfsys.obj_get(pin_dir / "bypass_socks")
    try:
        return bpfsys.map_lookup(fd, ctypes.c_uint64(cookie), ctypes.c_uint64())
    finally:
        os.close(fd)


def test_closed_sockets_leave_the_map_and_their_cookies_never_come_back(agent_bed, bypass):
    """Attack: a socket of a closed pair cannot be reused, and a new socket never gets an
    old pair's cookie (the only key the verdict follows)."""
    from shoal.datapath.bypass import pair_entries, socket_cookie
    joined = Joined(agent_bed, bypass)
    cookies = (joined.pair.client_cookie, joined.pair.server_cookie)
    assert all(_in_sockhash(agent_bed.pin_dir, c) for c in cookies)
    joined.close()
    time.sleep(0.1)
    assert not any(_in_sockhash(agent_bed.pin_dir, c) for c in cookies)   # the kernel removed them
    bypass.release(joined.pair)
    assert pair_entries(agent_bed.pin_dir) == 0
    fresh = [s for pair in (_tcp_pair(agent_bed.a.netns_path), _tcp_pair(agent_bed.b.netns_path)) for s in pair]
    try:
        assert not {socket_cookie(s) for s in fresh} & set(cookies)
    finally:
        for sock in fresh:
            sock.close()


def test_a_third_connection_gets_nothing_from_a_pair_and_puts_nothing_into_it(agent_bed, bypass):
    """Attack: another pod's connection to the same server app (and a socket the proxy
    released) stays a plain TCP connection: its bytes reach only its own peer."""
    joined = Joined(agent_bed, bypass)
    third_client, third_proxy = _tcp_pair(agent_bed.a.netns_path)
    try:
        third_client.sendall(b"intruder")
        joined.app_client.sendall(b"legit")
        assert _read_exactly(joined.app_server, 5) == b"legit"
        third_proxy.settimeout(2)
        assert third_proxy.recv(100) == b"intruder"     # only its own peer (the proxy) has it
        joined.app_server.setblocking(False)
        with pytest.raises(BlockingIOError):
            joined.app_server.recv(100)
        # once released, the proxy's socket is an ordinary socket again: nothing is redirected
        bypass.release(joined.pair)
        joined.app_client.sendall(b"after release")
        joined.proxy_client.settimeout(2)
        assert _read_exactly(joined.proxy_client, 13) == b"after release"
        with pytest.raises(BlockingIOError):
            joined.app_server.recv(100)
    finally:
        third_client.close()
        third_proxy.close()
        joined.close()


def test_a_socket_the_map_refuses_leaves_both_sockets_untouched(agent_bed, bypass):
    """The fallback's precondition: a failed join changes nothing (the proxy relays)."""
    from shoal.datapath.bypass import BypassUnavailable, pair_entries
    app_client, proxy_client = _tcp_pair(agent_bed.a.netns_path)
    unconnected = in_netns(agent_bed.b.netns_path, socket.socket)
    try:
        app_client.sendall(b"kept for the relay")
        with pytest.raises(BypassUnavailable):
            bypass.join(proxy_client, unconnected)
        proxy_client.settimeout(2)
        assert _read_exactly(proxy_client, 18) == b"kept for the relay"
        assert pair_entries(agent_bed.pin_dir) == 0
    finally:
        for sock in (app_client, proxy_client, unconnected):
            sock.close()



def test_a_half_close_behind_bytes_still_queued_toward_the_closer_loses_none_of_them(agent_bed, bypass):
    """The client app half-closes while the server's answer still waits in the kernel for
    it (it has not read yet): its FIN (an empty skb) must not break the redirect queue it
    lands behind. What the server sends after that FIN must arrive too, and the proxy's
    socket must hold no error."""
    joined = Joined(agent_bed, bypass)
    try:
        answer, more = os.urandom(16 * 1024 * 1024), os.urandom(1024 * 1024)
        sender = threading.Thread(target=joined.app_server.sendall, args=(answer,))
        sender.start()
        deadline = time.monotonic() + 10
        while bypass.counts(joined.pair).server_to_client < len(answer):   # all past the verdict,
            assert time.monotonic() < deadline                              # most still queued
            time.sleep(0.01)
        sender.join()
        joined.app_client.shutdown(socket.SHUT_WR)
        assert joined.proxy_client.recv(1) == b""          # the proxy learns EOF
        joined.app_server.sendall(more)                     # the other direction still flows
        joined.app_client.settimeout(5)
        got = _read_until_quiet(joined.app_client, len(answer) + len(more))
        error = joined.proxy_client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert (len(got), error) == (len(answer) + len(more), 0), f"{len(got)} bytes arrived, error {error}"
        assert got == answer + more
    finally:
        bypass.release(joined.pair)
        joined.close()

"""The same-node bypass in the kernel: the real verdict program on the real pinned maps,
sockets in two pod namespaces (the client side in pod a's, the server side in pod b's,
each over its loopback, as the node proxy holds them)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import select
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


class HandBackRelay(threading.Thread):
    """What the node proxy does with bytes the verdict hands back on one of its sockets:
    wait until every byte carried before them is on the peer's socket, write them there,
    report them (the verdict then redirects again). ``eof`` once the socket's EOF is read."""

    def __init__(self, bypass, pair, source: socket.socket, dest: socket.socket, toward_server: bool):
        super().__init__(daemon=True)
        self.bypass, self.pair, self.source, self.dest = bypass, pair, source, dest
        self.toward_server = toward_server
        self.relayed = 0
        self.stop = threading.Event()
        self.eof = threading.Event()

    def run(self):
        while not self.stop.is_set():
            if not select.select([self.source], [], [], 0.05)[0]:
                continue
            try:
                data = self.source.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, OSError):
                continue
            if not data:
                self.eof.set()
                return
            while not self.bypass.drained(self.pair, self.toward_server):
                time.sleep(0.001)
            self.dest.sendall(data)
            self.relayed += len(data)
            self.bypass.relayed(self.pair, self.toward_server, len(data))


class Joined:
    """client app <-> proxy(client side) ~kernel~ proxy(server side) <-> server app; with
    ``relay``, the proxy's part for handed-back bytes is played by two HandBackRelay threads."""

    def __init__(self, bed, bypass, early: tuple[bytes, bytes] = (b"", b""), relay: bool = False,
                 client_buffers: int = 0):
        self.app_client, self.proxy_client = _tcp_pair(bed.a.netns_path)
        self.proxy_server, self.app_server = _tcp_pair(bed.b.netns_path)
        if client_buffers:   # what the client side holds beyond the kernel's redirect queue
            self.app_client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_buffers)
            self.proxy_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, client_buffers)
        for sock in self.sockets:
            sock.settimeout(10)
        if early[0]:
            self.app_client.sendall(early[0])
        if early[1]:
            self.app_server.sendall(early[1])
        time.sleep(0.05)   # queued on the proxy's sockets before the join
        self.pair = bypass.join(self.proxy_client, self.proxy_server)
        self.relays = ()
        if relay:
            self.relays = (HandBackRelay(bypass, self.pair, self.proxy_client, self.proxy_server, True),
                           HandBackRelay(bypass, self.pair, self.proxy_server, self.proxy_client, False))
            for thread in self.relays:
                thread.start()

    @property
    def sockets(self):
        return (self.app_client, self.proxy_client, self.proxy_server, self.app_server)

    def close(self):
        for thread in self.relays:
            thread.stop.set()
            thread.join(2)
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
    joined = Joined(agent_bed, bypass, early=(b"GET / early", b"220 banner"), relay=True)
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
        # nothing climbed to the proxy but what was handed back (a reader fell behind)
        assert [relay.relayed for relay in joined.relays] == \
            [counts.handed_back_to_server, counts.handed_back_to_client]
    finally:
        bypass.release(joined.pair)
        joined.close()


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_is_seen_by_the_proxy_and_forwarded_after_the_bytes(agent_bed, bypass, first):
    joined = Joined(agent_bed, bypass, relay=True)
    try:
        closer, closer_relay, other_proxy, other_app = (
            (joined.app_client, joined.relays[0], joined.proxy_server, joined.app_server) if first == "client"
            else (joined.app_server, joined.relays[1], joined.proxy_client, joined.app_client))
        payload = os.urandom(8 * 1024 * 1024)
        received = []
        reader = threading.Thread(target=lambda: received.append(_read_to_eof(other_app)))
        reader.start()
        closer.sendall(payload)
        closer.shutdown(socket.SHUT_WR)
        assert closer_relay.eof.wait(10)             # the proxy learns EOF
        closer_relay.join(10)                         # after relaying what it was handed
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
    socket must hold no error. (Small client-side buffers keep the redirect queue full,
    up to the high-water mark; the rest of the answer is handed back to the proxy.)"""
    joined = Joined(agent_bed, bypass, relay=True, client_buffers=128 * 1024)
    try:
        answer, more = os.urandom(16 * 1024 * 1024), os.urandom(1024 * 1024)
        sender = threading.Thread(target=joined.app_server.sendall, args=(answer,))
        sender.start()
        deadline = time.monotonic() + 10
        while bypass.counts(joined.pair).server_to_client < len(answer):   # all past the verdict,
            assert time.monotonic() < deadline                              # most still queued
            time.sleep(0.01)
        sender.join()
        assert not bypass.drained(joined.pair, toward_server=False)        # in the kernel's queue
        joined.app_client.shutdown(socket.SHUT_WR)
        assert joined.relays[0].eof.wait(10)                # the proxy learns EOF
        joined.app_server.sendall(more)                     # the other direction still flows
        joined.app_client.settimeout(5)
        got = _read_until_quiet(joined.app_client, len(answer) + len(more))
        error = joined.proxy_client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert (len(got), error) == (len(answer) + len(more), 0), f"{len(got)} bytes arrived, error {error}"
        assert got == answer + more
    finally:
        bypass.release(joined.pair)
        joined.close()


def _send_until_blocked(sock: socket.socket, quiet: float = 1.0, limit: int = 160 * 1024 * 1024) -> int:
    """Bytes a non-blocking sender gets accepted before the path stops taking any for
    ``quiet`` seconds (or ``limit``: the hole this guards against takes everything)."""
    sock.setblocking(False)
    chunk, sent, last_progress = b"\0" * (1 << 20), 0, time.monotonic()
    while sent < limit and time.monotonic() - last_progress < quiet:
        try:
            sent += sock.send(chunk)
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    return sent


def test_a_receiver_that_reads_nothing_pushes_back_on_the_sender_through_the_pair(agent_bed, bypass):
    """Attack: a client writing to a server app that never reads. Before the bound, every
    byte left the proxy's receive queue for the peer's psock queue (unbounded, charged to
    no socket): 256 MiB in half a second. Now the verdict hands bytes back to the proxy's
    own socket past the high-water mark, where TCP closes the window: the sender gets
    EAGAIN after the sockets' buffers and the mark, a few MiB."""
    from shoal.datapath.structs import BYPASS_HIGH_WATER
    joined = Joined(agent_bed, bypass)
    try:
        sent = _send_until_blocked(joined.app_client)
        counts = bypass.counts(joined.pair)
        # what the kernel holds for the pair beyond ordinary TCP buffers: redirected, not yet
        # on the server-side socket (whose own send buffer is bounded by TCP)
        queued_on_peer = queued_bytes_since_join(joined)
        in_flight = counts.redirected_to_server - queued_on_peer
        bufs = sum(s.getsockopt(socket.SOL_SOCKET, opt) for s in joined.sockets
                   for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF))
        print(f"sender wrote {sent >> 10} KiB, redirected {counts.redirected_to_server >> 10} KiB, "
              f"on the peer {queued_on_peer >> 10} KiB, handed back {counts.handed_back_to_server >> 10} KiB, "
              f"socket buffers {bufs >> 10} KiB")
        assert in_flight <= BYPASS_HIGH_WATER
        assert counts.handed_back_to_server > 0 and counts.handbacks == 1
        assert sent < BYPASS_HIGH_WATER + bufs, f"{sent} bytes accepted: nothing pushed back"
        assert counts.unredirected == 0
    finally:
        bypass.release(joined.pair)
        joined.close()


def queued_bytes_since_join(joined: Joined) -> int:
    from shoal.datapath.bypass import queued_bytes
    return queued_bytes(joined.proxy_server) - joined.pair.server_queued_before


def test_a_slow_reader_that_resumes_gets_every_byte_in_order_and_the_pair_is_joined_again(agent_bed, bypass):
    """The server app stalls (the mark is crossed, bytes are handed back to the proxy),
    then reads everything: the same bytes in the same order, the handed-back ones relayed
    by the proxy behind what the kernel carried before. Once the proxy has relayed all it
    was handed, the kernel carries the direction again: a second transfer is redirected."""
    joined = Joined(agent_bed, bypass)
    relay = HandBackRelay(bypass, joined.pair, joined.proxy_client, joined.proxy_server, toward_server=True)
    relay.start()
    try:
        first, second = os.urandom(48 * 1024 * 1024), os.urandom(16 * 1024 * 1024)
        sender = threading.Thread(target=joined.app_client.sendall, args=(first,))
        sender.start()
        deadline = time.monotonic() + 20
        while bypass.counts(joined.pair).handed_back_to_server == 0:   # the reader stalls
            assert time.monotonic() < deadline, "the mark was never crossed"
            time.sleep(0.01)
        time.sleep(0.5)
        stalled = bypass.counts(joined.pair)
        digest, got = hashlib.sha256(), 0
        while got < len(first):       # now it reads: slowly at first, then at full speed
            data = joined.app_server.recv(64 * 1024 if got < 8 * 1024 * 1024 else 1 << 20)
            assert data, f"EOF after {got} bytes"
            digest.update(data)
            got += len(data)
            if got < 8 * 1024 * 1024:
                time.sleep(0.001)
        sender.join(10)
        assert digest.hexdigest() == hashlib.sha256(first).hexdigest()
        caught_up = bypass.counts(joined.pair)
        assert relay.relayed == caught_up.handed_back_to_server
        sender = threading.Thread(target=joined.app_client.sendall, args=(second,))
        sender.start()
        assert hashlib.sha256(_read_exactly(joined.app_server, len(second))).digest() == \
            hashlib.sha256(second).digest()
        sender.join(10)
        counts = bypass.counts(joined.pair)
        print(f"stalled: handed back {stalled.handed_back_to_server >> 10} KiB; in all: redirected "
              f"{counts.redirected_to_server >> 10} KiB, handed back {counts.handed_back_to_server >> 10} KiB "
              f"in {counts.handbacks} times")
        assert counts.client_to_server == len(first) + len(second) and counts.unredirected == 0
        assert relay.relayed == counts.handed_back_to_server
        assert counts.redirected_to_server > caught_up.redirected_to_server   # joined again
    finally:
        relay.stop.set()
        relay.join(2)
        bypass.release(joined.pair)
        joined.close()


def test_bytes_handed_back_behind_a_stuck_reverse_queue_stay_bounded(agent_bed, bypass):
    """Attack on the hand-back: the client app reads nothing while the server streams to it
    (the redirect queue toward the client stays full), and the server app reads nothing
    either, while the client uploads. A handed-back skb then waits behind that queue,
    uncharged, and TCP keeps the window open. The verdict bounds what the proxy has not
    relayed (its socket's buffer plus a slack) and drops past it, counted as unredirected,
    so the proxy resets the pair: the client cannot make the kernel hold more."""
    from shoal.datapath.structs import BYPASS_HIGH_WATER
    joined = Joined(agent_bed, bypass, client_buffers=128 * 1024)
    try:
        joined.app_server.setblocking(False)
        streamed = _send_until_blocked(joined.app_server, quiet=0.5, limit=64 * 1024 * 1024)
        sent = _send_until_blocked(joined.app_client)
        counts = bypass.counts(joined.pair)
        rcvbuf = joined.proxy_client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        print(f"server streamed {streamed >> 10} KiB; client sent {sent >> 10} KiB, handed back "
              f"{counts.handed_back_to_server >> 10} KiB, unredirected {counts.unredirected}, rcvbuf {rcvbuf >> 10} KiB")
        # what the kernel holds for the proxy stays under the bound; the rest was dropped
        # (freed) and counted, which makes the proxy reset the pair
        assert 0 < counts.handed_back_to_server <= rcvbuf + 4 * BYPASS_HIGH_WATER
        assert counts.unredirected > 0 or sent < 160 * 1024 * 1024
    finally:
        bypass.release(joined.pair)
        joined.close()

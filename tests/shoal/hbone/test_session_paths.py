"""The fast path and the h2 path carry identical bytes, through a real local HBONE pair
(``shoal.perf.hbonepair``: the real drivers, real sockets, TLS 1.3, in a child process)
with real TCP apps on both sides: checksums over 1 GiB, half-close in both directions,
a reset mid-stream, a window that stays exhausted, and streams interleaving on one
connection. Mixed pairs (a fast-path end against an h2-path end) prove the two
implementations speak the same wire."""
from __future__ import annotations

import contextlib
import hashlib
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.timeout(120)

PATHS = [("fast", "fast"), ("fast", "h2"), ("h2", "fast"), ("h2", "h2")]
BLOCK = 1 << 20


def pattern(seed: int) -> bytes:
    """1 MiB of bytes that differ per seed (and per stream): a swapped or shifted chunk shows."""
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(BLOCK)


def send_pattern(sock: socket.socket, seed: int, total: int) -> str:
    block, digest, left = pattern(seed), hashlib.sha256(), total
    view = memoryview(block)
    while left:
        chunk = view[:min(left, BLOCK)]
        sock.sendall(chunk)
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def read_all(sock: socket.socket) -> tuple[int, str]:
    buffer, digest, total = bytearray(BLOCK), hashlib.sha256(), 0
    view = memoryview(buffer)
    while n := sock.recv_into(buffer):
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


class Upstream:
    """The app behind the server end: each connection runs ``behaviour(conn)`` in a thread;
    results go to ``results``."""

    def __init__(self, behaviour):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.results: queue.Queue = queue.Queue()
        self._behaviour = behaviour
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.results.put(self._behaviour(conn))
            except OSError as exc:
                self.results.put(exc)

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def hbone_pair(upstream_port: int, client_path: str, server_path: str):
    """The pair in a child process (its own core): yields (port, pid)."""
    proc = subprocess.Popen([sys.executable, "-m", "shoal.perf.hbonepair", "--upstream", f"127.0.0.1:{upstream_port}",
                             "--client-path", client_path, "--server-path", server_path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+) ->", line)
        assert match, f"the pair did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
        yield int(match.group(1)), proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_one_gib_both_ways_at_once_with_checksums_fast_path():
    """512 MiB up and 512 MiB down at once on one stream, fast path at both ends."""
    half = 512 * BLOCK

    def upstream(conn):
        sent = {}
        writer = threading.Thread(target=lambda: sent.update(digest=send_pattern(conn, 2, half)))
        writer.start()
        got = read_all(conn)
        writer.join()
        return got, sent["digest"]

    app = Upstream(upstream)
    try:
        with hbone_pair(app.port, "fast", "fast") as (port, _):
            sock = connect(port)
            with sock:
                sent = {}
                writer = threading.Thread(target=lambda: (sent.update(digest=send_pattern(sock, 1, half)),
                                                          sock.shutdown(socket.SHUT_WR)))
                writer.start()
                down = read_all(sock)
                writer.join()
            (up, upstream_sent) = app.results.get(timeout=60)
        assert up == (half, sent["digest"])
        assert down == (half, upstream_sent)
    finally:
        app.close()


@pytest.mark.parametrize("client_path, server_path", PATHS)
def test_same_bytes_on_every_path_pair_with_half_close_both_ways(client_path, server_path):
    """Client-first close: the client sends, half-closes, then still receives everything.
    Server-first close: the app sends, half-closes, then still receives everything."""
    size = 8 * BLOCK + 12_345  # not a multiple of any frame or buffer size

    def upstream(conn):
        first = conn.recv(1)
        if first == b"c":   # the client closes its direction first
            got = read_all(conn)
            return got, send_pattern(conn, 4, size)
        digest = send_pattern(conn, 4, size)  # the app closes its direction first
        conn.shutdown(socket.SHUT_WR)
        return read_all(conn), digest

    app = Upstream(upstream)
    try:
        with hbone_pair(app.port, client_path, server_path) as (port, _):
            with connect(port) as sock:
                sock.sendall(b"c")
                sent = send_pattern(sock, 3, size)
                sock.shutdown(socket.SHUT_WR)
                down = read_all(sock)
            got, upstream_sent = app.results.get(timeout=60)
            assert got == (size, sent) and down == (size, upstream_sent)

            with connect(port) as sock:
                sock.sendall(b"s")
                down = read_all(sock)           # EOF first: the app's direction is over
                sent = send_pattern(sock, 3, size)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(1) == b""
            got, upstream_sent = app.results.get(timeout=60)
            assert got == (size, sent) and down == (size, upstream_sent)
    finally:
        app.close()


@pytest.mark.parametrize("client_path, server_path", [("fast", "fast"), ("fast", "h2")])
def test_streams_interleave_on_one_connection(client_path, server_path):
    """Eight streams at once, each its own pattern both ways, on the one HBONE connection."""
    size = 2 * BLOCK + 777

    def upstream(conn):
        seed = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))[0]
        writer = threading.Thread(target=send_pattern, args=(conn, seed + 100, size))
        writer.start()
        got = read_all(conn)
        writer.join()
        return seed, got

    app = Upstream(upstream)
    results: dict[int, tuple] = {}

    def client(port: int, seed: int) -> None:
        with connect(port) as sock:
            sock.sendall(struct.pack("!I", seed))
            sent = {}
            writer = threading.Thread(target=lambda: (sent.update(digest=send_pattern(sock, seed, size)),
                                                      sock.shutdown(socket.SHUT_WR)))
            writer.start()
            down = read_all(sock)
            writer.join()
            results[seed] = (sent["digest"], down)

    try:
        with hbone_pair(app.port, client_path, server_path) as (port, _):
            clients = [threading.Thread(target=client, args=(port, seed)) for seed in range(10, 18)]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join(90)
            upstream_results = dict(app.results.get(timeout=30) for _ in clients)
        expected_down = {}
        for seed in range(10, 18):
            digest = hashlib.sha256()
            left = size
            while left:
                digest.update(pattern(seed + 100)[:min(left, BLOCK)])
                left -= min(left, BLOCK)
            expected_down[seed] = (size, digest.hexdigest())
        assert sorted(results) == list(range(10, 18))
        for seed, (sent, down) in results.items():
            assert upstream_results[seed] == (size, sent)
            assert down == expected_down[seed]
    finally:
        app.close()


@pytest.mark.parametrize("client_path, server_path", [("fast", "fast"), ("h2", "h2")])
def test_a_reset_mid_stream_reaches_the_app_and_the_connection_carries_on(client_path, server_path):
    def upstream(conn):
        received = 0
        try:
            while data := conn.recv(65536):
                received += len(data)
        except ConnectionResetError:
            return "reset", received
        return "eof", received

    app = Upstream(upstream)
    try:
        with hbone_pair(app.port, client_path, server_path) as (port, _):
            sock = connect(port)
            sock.sendall(pattern(5)[:300_000])
            time.sleep(0.3)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST, mid-stream
            outcome, received = app.results.get(timeout=30)
            assert outcome == "reset" and 0 < received <= 300_000
            # The HBONE connection lives on: the next stream on it works end to end.
            app._behaviour = lambda conn: (conn.sendall(conn.recv(5, socket.MSG_WAITALL)), "echoed")[1]
            with connect(port) as sock:
                sock.sendall(b"again")
                assert sock.recv(5, socket.MSG_WAITALL) == b"again"
            assert app.results.get(timeout=30) == "echoed"
    finally:
        app.close()


@pytest.mark.parametrize("client_path, server_path", [("fast", "fast"), ("h2", "fast")])
def test_a_window_that_stays_exhausted_bounds_buffering_and_blocks_no_other_stream(client_path, server_path):
    """The app stops reading: the sender is held back by flow control (the pair's memory
    grows by no more than its windows and socket buffers), another stream on the same
    connection still works, and once the app reads, every byte arrives intact."""
    go = threading.Event()

    def upstream(conn):
        if conn.recv(1, socket.MSG_PEEK) == b"e":
            conn.sendall(conn.recv(4, socket.MSG_WAITALL))
            return "echoed"
        go.wait(60)
        return read_all(conn)

    app = Upstream(upstream)
    try:
        with hbone_pair(app.port, client_path, server_path) as (port, pid):
            before = rss_kib(pid)
            stalled = connect(port)
            stalled.setblocking(False)
            block, pushed, sent = pattern(6), 0, hashlib.sha256()
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # push as hard as the proxy accepts, for 3 s
                try:
                    n = stalled.send(block)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                sent.update(block[:n])
                pushed += n
                block = block[n:] + block[:n]
            grown_mib = (rss_kib(pid) - before) / 1024
            # 4 MiB stream window + socket buffers (a few MiB each) + the proxy's TCP write
            # watermark: far below what a proxy buffering without bound would hold.
            assert pushed < 64 * BLOCK, f"{pushed} bytes accepted while the app read nothing"
            assert grown_mib < 48, f"the pair grew by {grown_mib:.0f} MiB"
            with connect(port) as other:
                other.sendall(b"echo")
                assert other.recv(4, socket.MSG_WAITALL) == b"echo"
            assert app.results.get(timeout=30) == "echoed"
            go.set()
            stalled.setblocking(True)
            stalled.shutdown(socket.SHUT_WR)
            assert app.results.get(timeout=60) == (pushed, sent.hexdigest())
            stalled.close()
    finally:
        go.set()
        app.close()

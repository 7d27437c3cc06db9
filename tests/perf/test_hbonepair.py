"""The local HBONE pair split over two processes (``--role server`` and ``--role client``,
one certificate directory): bytes cross both, both ways, whole."""
from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import threading

import pytest

from shoal.perf.beds import procs as bed_procs

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(role: str, *args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "shoal.perf.hbonepair", "--role", role, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)   # its own group: the bed's stop takes it whole
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"127\.0\.0\.1:(\d+) ->", line)
    assert match, f"the {role} end did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
    return proc, int(match.group(1))


def test_the_two_ends_in_two_processes_carry_bytes_both_ways(tmp_path):
    echo = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    common = ["--upstream", f"127.0.0.1:{echo.getsockname()[1]}", "--tls-port", str(_free_port()),
              "--certs", str(tmp_path / "certs")]   # made by the first end
    procs = []
    try:
        server, _ = _start("server", *common)   # it makes the certificate the client then trusts
        procs.append(server)
        client, port = _start("client", *common)
        procs.append(client)
        assert (tmp_path / "certs" / "pair.key").stat().st_mode & 0o077 == 0, "the key is the owner's only"
        payload = hashlib.sha256(b"split").digest() * 40_000   # 1.28 MB
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            writer = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            writer.start()
            got = b""
            while len(got) < len(payload) and (data := sock.recv(65536)):
                got += data
            writer.join()
        assert got == payload
    finally:
        for proc in procs:
            bed_procs.stop(proc, grace=10)
        echo.close()

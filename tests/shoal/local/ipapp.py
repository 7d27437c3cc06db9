"""A pod app for the dual-stack tests.

    ipapp.py serve ADDR:PORT...   listen on each address; tell every client the address it
                                  is seen from ("from <ip>"), then close. ADDR is loopback4,
                                  loopback6, pod4 or pod6 (from POD_IPS), or "any" (both
                                  families, every address).
    ipapp.py connect HOST PORT    print what the server says, or "error: <reason>".
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading


def address(word: str) -> str:
    pod = {ipaddress.ip_address(a).version: a for a in os.environ.get("POD_IPS", "").split(",") if a}
    return {"loopback4": "127.0.0.1", "loopback6": "::1", "pod4": pod.get(4, ""), "pod6": pod.get(6, ""),
            "any": "::"}[word]


def serve(spec: str) -> None:
    word, _, port = spec.rpartition(":")
    host = address(word)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, int(port)))
    sock.listen(64)
    print(f"listening on {host}:{port}", flush=True)
    while True:
        conn, peer = sock.accept()
        seen = peer[0].removeprefix("::ffff:") if "." in peer[0] else peer[0]
        print(f"{spec}: connection from {seen}", flush=True)
        conn.sendall(f"from {seen}\n".encode())
        conn.close()


def connect(host: str, port: str) -> None:
    try:
        with socket.create_connection((host, int(port)), timeout=4) as sock:
            print(sock.recv(200).decode().strip() or "error: closed without an answer")
    except OSError as exc:
        print(f"error: {exc}")


if __name__ == "__main__":
    if sys.argv[1] == "connect":
        connect(sys.argv[2], sys.argv[3])
    else:
        threads = [threading.Thread(target=serve, args=(spec,), daemon=True) for spec in sys.argv[2:]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

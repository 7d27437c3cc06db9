"""The demo's workloads: an HTTP server, a client that calls it forever, and a TCP service.

    python -m shoal.local.demo.apps web --port 8080
    python -m shoal.local.demo.apps client --url http://web.demo:8080/ --interval 1
    python -m shoal.local.demo.apps db --port 7000
"""
from __future__ import annotations

import argparse
import os
import socket
import socketserver
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def identity() -> str:
    return f"{os.environ.get('POD_NAME', socket.gethostname())} on {os.environ.get('NODE_NAME', '?')}"


class WebHandler(BaseHTTPRequestHandler):
    """Answers every method and path with who served it and who asked."""

    protocol_version = "HTTP/1.1"
    server_version = "shoal-demo-web"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (f"hello from {identity()} ({os.environ.get('POD_IP', '?')}): "
                f"{self.command} {self.path} from {client_address(self.client_address[0])}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", os.environ.get("POD_NAME", "web"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, fmt: str, *args) -> None:
        sys.stdout.write(f"{self.address_string()} {fmt % args}\n")


def client_address(address: str) -> str:
    """The client's address as it was sent: an IPv4 client of a dual-stack socket shows
    as ``::ffff:a.b.c.d``."""
    return address.removeprefix("::ffff:") if "." in address else address


class DualStack:
    """Server mixin: one IPv6 socket with V6ONLY off listens on every address of both
    families (an IPv4 client shows as ``::ffff:a.b.c.d``)."""

    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256   # socketserver's default (5) overflows under a burst of clients

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class DualStackHTTPServer(DualStack, ThreadingHTTPServer):
    pass


class DualStackTCPServer(DualStack, socketserver.ThreadingTCPServer):
    pass


def run_web(port: int) -> None:
    DualStackHTTPServer(("::", port), WebHandler).serve_forever()


def run_client(url: str, interval: float) -> None:
    while True:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                line = f"{resp.status} {resp.read().decode(errors='replace').strip()}"
        except (urllib.error.URLError, OSError) as e:
            line = f"error: {getattr(e, 'reason', e)}"
        print(f"{time.strftime('%H:%M:%S')} {url} {line} ({(time.monotonic() - started) * 1000:.1f} ms)", flush=True)
        time.sleep(interval)


class DbHandler(socketserver.StreamRequestHandler):
    """A line protocol: a greeting, then `ok <line>` for each line, until the client leaves."""

    def handle(self) -> None:
        self.wfile.write(f"db {identity()} ready\n".encode())
        for line in self.rfile:
            self.wfile.write(b"ok " + line)


def run_db(port: int) -> None:
    DualStackTCPServer(("::", port), DbHandler).serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.local.demo.apps")
    sub = parser.add_subparsers(dest="app", required=True)
    web = sub.add_parser("web")
    web.add_argument("--port", type=int, default=8080)
    client = sub.add_parser("client")
    client.add_argument("--url", required=True)
    client.add_argument("--interval", type=float, default=1.0)
    db = sub.add_parser("db")
    db.add_argument("--port", type=int, default=7000)
    args = parser.parse_args(argv)
    if args.app == "web":
        run_web(args.port)
    elif args.app == "client":
        run_client(args.url, args.interval)
    else:
        run_db(args.port)


if __name__ == "__main__":
    main()

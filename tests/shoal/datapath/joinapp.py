"""A pod's app for the app-join tests, run inside a pod (netns + cgroup, so the node's
sockops sees its sockets): blocking TCP, sends and reads at once, reports SHA-256s as JSON.

usage: joinapp.py client HOST PORT | server HOST PORT   [--send N] [--chunk C] [--greet G]
       [--wait-greeting G] [--pause S] [--nonblocking] [--reset-after N] [--stop-reading-after N]

--greet G: send G bytes first (before --pause); --wait-greeting G: read G bytes before
sending; --pause S: sleep S seconds before the bulk send (the proxy's path drains);
--reset-after N: after N bytes sent, close with RST; --stop-reading-after N: read N bytes,
then nothing more for --hold seconds. The write side is shut after sending; reads go to EOF.
"""
import argparse
import hashlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("role", choices=("client", "server"))
parser.add_argument("host")
parser.add_argument("port", type=int)
parser.add_argument("--send", type=int, default=0)
parser.add_argument("--chunk", type=int, default=256 * 1024)
parser.add_argument("--greet", type=int, default=0)
parser.add_argument("--wait-greeting", type=int, default=0)
parser.add_argument("--pause", type=float, default=0.0)
parser.add_argument("--nonblocking", action="store_true")
parser.add_argument("--nonblocking-connect", action="store_true", help="connect() already non-blocking")
parser.add_argument("--reset-after", type=int, default=-1)
parser.add_argument("--stop-reading-after", type=int, default=-1)
parser.add_argument("--hold", type=float, default=0.0)
parser.add_argument("--fast", action="store_true", help="one buffer of zeros, no hashing (benchmarks)")
args = parser.parse_args()

family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
if args.role == "server":
    listener = socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    listener.close()
elif args.nonblocking_connect:
    conn = socket.socket(family)
    conn.setblocking(False)
    conn.connect_ex((args.host, args.port))
    select.select([], [conn], [], 10)
    args.nonblocking = True
else:   # a blocking connect (a timeout would make Python's socket non-blocking meanwhile)
    conn = socket.socket(family)
    conn.connect((args.host, args.port))
if args.nonblocking:   # O_NONBLOCK on the file; the reader then waits in select too
    conn.setblocking(False)
else:
    conn.settimeout(None)
result = {"sent": 0, "received": 0, "error": ""}
sent_hash, received_hash = hashlib.sha256(), hashlib.sha256()


def send_all(data: bytes) -> None:
    if not args.nonblocking:
        conn.sendall(data)
        return
    view = memoryview(data)
    while view:
        select.select([], [conn], [])
        try:
            view = view[conn.send(view):]
        except BlockingIOError:
            result["eagain"] = result.get("eagain", 0) + 1


def sender() -> None:
    try:
        if args.greet:
            data = os.urandom(args.greet)
            send_all(data)
            sent_hash.update(data)
            result["sent"] += len(data)
        if args.pause:
            time.sleep(args.pause)
        left = args.send
        zeros = bytes(args.chunk)
        while left > 0:
            data = zeros[:min(args.chunk, left)] if args.fast else os.urandom(min(args.chunk, left))
            if 0 <= args.reset_after <= result["sent"]:
                # RST at close; the reader (blocked in recv, which holds the file) is woken
                # by the read-side shutdown and closes the socket
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                result["reset"] = True
                conn.shutdown(socket.SHUT_RD)
                return
            send_all(data)
            if not args.fast:
                sent_hash.update(data)
            result["sent"] += len(data)
            left -= len(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        result["error"] = f"send: {exc}"


if args.wait_greeting:
    got = b""
    while len(got) < args.wait_greeting:
        data = conn.recv(args.wait_greeting - len(got))
        if not data:
            break
        got += data
    received_hash.update(got)
    result["received"] += len(got)

thread = threading.Thread(target=sender)
thread.start()
try:
    while not result.get("reset"):
        if 0 <= args.stop_reading_after <= result["received"]:
            time.sleep(args.hold)
            args.stop_reading_after = -1
        try:
            if args.nonblocking:
                select.select([conn], [], [])
            data = conn.recv(1 << 20)
        except BlockingIOError:
            # a blocking socket in a sockmap: tcp_bpf_recvmsg answers EAGAIN when its wait
            # is woken without data (a write-space wakeup): counted, and read again
            result["recv_eagain"] = result.get("recv_eagain", 0) + 1
            continue
        if not data:
            break
        if not args.fast:
            received_hash.update(data)
        result["received"] += len(data)
except OSError as exc:
    result["error"] = result["error"] or f"recv: {exc}"
thread.join()
if result.get("reset"):
    conn.close()
result["sent_sha"], result["received_sha"] = sent_hash.hexdigest(), received_hash.hexdigest()
print(json.dumps(result), flush=True)
sys.exit(0)

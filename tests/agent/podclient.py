"""Run inside a pod (netns + cgroup) by the tests: one TCP connect, reported as JSON.

usage: podclient.py HOST PORT [--sport N] [--mark M] [--timeout S] [--hold S]
"""
import argparse
import json
import socket
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("host")
parser.add_argument("port", type=int)
parser.add_argument("--sport", type=int, default=0)
parser.add_argument("--mark", type=int, default=0)
parser.add_argument("--timeout", type=float, default=2.0)
parser.add_argument("--hold", type=float, default=0.0)
parser.add_argument("--again", action="store_true", help="after --hold, one more ping on the same connection")
args = parser.parse_args()

sock = socket.socket()
sock.settimeout(args.timeout)
if args.mark:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, args.mark)
if args.sport:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.sport))
started = time.monotonic()
try:
    sock.connect((args.host, args.port))
except OSError as err:
    print(json.dumps({"ok": False, "errno": err.errno or 0, "error": str(err),
                      "elapsed": time.monotonic() - started}))
    sys.exit(0)
local = sock.getsockname()
peer = sock.getpeername()
sock.sendall(b"ping")
try:
    reply = sock.recv(64).decode()
except OSError as err:
    reply = f"error: {err}"
time.sleep(args.hold)
again = None
if args.again:
    try:
        sock.sendall(b"ping2")
        again = sock.recv(64).decode()
    except OSError as err:
        again = f"error: {err}"
print(json.dumps({"ok": True, "again": again, "local": list(local), "peer": list(peer), "reply": reply,
                  "elapsed": time.monotonic() - started}))

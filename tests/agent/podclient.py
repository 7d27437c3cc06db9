"""Run inside a pod (netns + cgroup) by the tests: one TCP connect (or one UDP exchange), as JSON.

usage: podclient.py HOST PORT [--family 4|6] [--sport N] [--mark M] [--timeout S] [--hold S]
                              [--udp connect|sendto]

--family 6 uses an AF_INET6 socket (default settings: not V6ONLY), so HOST may be
::ffff:a.b.c.d, as gRPC's C core, the JVM and Node.js dial IPv4.
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
parser.add_argument("--family", type=int, choices=(4, 6), default=0, help="default: from HOST")
parser.add_argument("--udp", choices=("connect", "sendto"), default=None,
                    help="one datagram 'ping', wait for the reply (connected socket or sendto/recvfrom)")
args = parser.parse_args()
family = {4: socket.AF_INET, 6: socket.AF_INET6}.get(args.family) or (
    socket.AF_INET6 if ":" in args.host else socket.AF_INET)


def report(**fields):
    print(json.dumps(fields))
    sys.exit(0)


if args.udp:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    if args.mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, args.mark)
    started = time.monotonic()
    try:
        if args.udp == "connect":
            sock.connect((args.host, args.port))
            peer = sock.getpeername()
            sock.send(b"ping")
            data, source = sock.recvfrom(64)
        else:
            peer = None
            sock.sendto(b"ping", (args.host, args.port))
            data, source = sock.recvfrom(64)
    except OSError as err:
        report(ok=False, errno=err.errno or 0, error=str(err), elapsed=time.monotonic() - started)
    report(ok=True, reply=data.decode(), source=list(source[:2]), peer=list(peer[:2]) if peer else None,
           elapsed=time.monotonic() - started)

sock = socket.socket(family)
sock.settimeout(args.timeout)
if args.mark:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, args.mark)
if args.sport:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", args.sport))
started = time.monotonic()
try:
    sock.connect((args.host, args.port))
except OSError as err:
    print(json.dumps({"ok": False, "errno": err.errno or 0, "error": str(err),
                      "elapsed": time.monotonic() - started}))
    sys.exit(0)
local = sock.getsockname()[:2]
peer = sock.getpeername()[:2]
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

"""Run inside a cluster pod by the agent's cluster tests (stdlib only), prints one JSON line.

    podprobe.py connect HOST PORT [--timeout S]          # a connect(): errno, elapsed, peer
    podprobe.py session HOST PORT --hold S               # a db line-protocol session held S seconds
"""
import argparse
import json
import socket
import time

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=("connect", "session"))
parser.add_argument("host")
parser.add_argument("port", type=int)
parser.add_argument("--timeout", type=float, default=3.0)
parser.add_argument("--hold", type=float, default=0.0)
args = parser.parse_args()

sock = socket.socket()
sock.settimeout(args.timeout)
started = time.monotonic()
try:
    sock.connect((args.host, args.port))
except OSError as err:
    print(json.dumps({"ok": False, "errno": err.errno or 0, "error": str(err),
                      "elapsed": time.monotonic() - started}))
    raise SystemExit(0) from None
result = {"ok": True, "peer": list(sock.getpeername()), "elapsed": time.monotonic() - started}
if args.mode == "session":
    sock.settimeout(max(args.timeout, args.hold + 10))
    reader = sock.makefile("rb")
    result["greeting"] = reader.readline().decode().strip()
    replies = []
    for index, word in enumerate(("one", "two")):
        if index:
            time.sleep(args.hold)
        try:
            sock.sendall(word.encode() + b"\n")
            replies.append(reader.readline().decode().strip())
        except OSError as err:
            replies.append(f"error: {err}")
    result["replies"] = replies
print(json.dumps(result))

"""Runs inside a pod: one HTTP request on a fresh connection every INTERVAL seconds for
DURATION seconds (as a user's curl loop would); prints one JSON summary line.

    python3 podsample.py HOST PORT DURATION [--interval S] [--timeout S]
"""
import argparse
import http.client
import json
import time

parser = argparse.ArgumentParser()
parser.add_argument("host")
parser.add_argument("port", type=int)
parser.add_argument("duration", type=float)
parser.add_argument("--interval", type=float, default=0.2)
parser.add_argument("--timeout", type=float, default=15.0)
args = parser.parse_args()

started = time.monotonic()
sent, failures, slowest = 0, [], 0.0
while time.monotonic() - started < args.duration:
    begin = time.monotonic()
    conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        outcome = None if resp.status == 200 else f"HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as err:
        outcome = f"{type(err).__name__}: {err}"
    finally:
        conn.close()
    took = time.monotonic() - begin
    sent += 1
    slowest = max(slowest, took)
    if outcome is not None:
        failures.append({"at": round(begin - started, 2), "error": outcome, "seconds": round(took, 3)})
    time.sleep(max(0.0, args.interval - took))
print(json.dumps({"sent": sent, "failed": len(failures), "failures": failures[:20], "slowest_s": round(slowest, 3)}))

"""Runs inside a pod: N HTTP requests on keep-alive connections; prints one JSON summary line.

    python3 podload.py HOST PORT N [--method M] [--path P] [--connections C]
"""
import argparse
import collections
import http.client
import json
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("host")
parser.add_argument("port", type=int)
parser.add_argument("count", type=int)
parser.add_argument("--method", default="GET")
parser.add_argument("--path", default="/")
parser.add_argument("--connections", type=int, default=1)
args = parser.parse_args()

statuses, backends, times = collections.Counter(), collections.Counter(), []
lock = threading.Lock()


def worker(n: int) -> None:
    conn = http.client.HTTPConnection(args.host, args.port, timeout=10)
    for _ in range(n):
        start = time.monotonic()
        try:
            conn.request(args.method, args.path)
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            status = str(resp.status)
        except (OSError, http.client.HTTPException) as err:
            status, body = type(err).__name__, ""
            conn.close()
            conn = http.client.HTTPConnection(args.host, args.port, timeout=10)
        elapsed = (time.monotonic() - start) * 1000
        with lock:
            statuses[status] += 1
            times.append(elapsed)
            if status == "200" and " from " in body:   # the demo web app: "hello from <pod> on <node>"
                backends[body.split(" from ", 1)[1].split(" ", 1)[0]] += 1


share = [args.count // args.connections + (1 if i < args.count % args.connections else 0) for i in range(args.connections)]
threads = [threading.Thread(target=worker, args=(n,)) for n in share]
for t in threads:
    t.start()
for t in threads:
    t.join()
times.sort()
print(json.dumps({"statuses": dict(statuses), "backends": dict(backends),
                  "p50_ms": times[len(times) // 2] if times else 0, "max_ms": times[-1] if times else 0}))

"""Scripts run inside pods (``python -c SCRIPT args``) to load a node proxy with many
concurrent connections: the ``load`` scenario and the node proxy's cluster tests share
them, so the test and the benchmark measure the same thing."""
from __future__ import annotations

# An echo app: asyncio, a backlog that takes a burst (the demo's db answers
# from a 5-deep ThreadingTCPServer queue, which would measure the app, not the proxies).
# Args: port.
ECHO_APP = """
import asyncio, sys
async def serve(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

# Opens COUNT connections at once, holds every one open until all have exchanged a line,
# then (for SECONDS, 0 for none) pings each every half second, then prints a JSON summary
# (ok, n_failed, failures by reason, lost, pings, open_seconds). Args: host port count seconds.
HOLD_CLIENT = """
import asyncio, json, resource, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
async def exchange(reader, writer, line):
    writer.write(line)
    return await asyncio.wait_for(reader.readexactly(len(line)), 30) == line
async def one(i, held):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 60)
        if not await exchange(reader, writer, b"hello %d\\n" % i):
            return f"{i}: bad echo", "bad echo"
        held.append((i, reader, writer))
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        return f"{i}: {exc!r}", type(exc).__name__ + (f"[errno {exc.errno}]" if getattr(exc, "errno", None) else "")
async def main():
    held, started = [], time.monotonic()
    failed = [r for r in await asyncio.gather(*(one(i, held) for i in range(count))) if r]
    reasons = {}
    for _, why in failed:
        reasons[why] = reasons.get(why, 0) + 1
    opened = time.monotonic() - started
    lost, pings = set(), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        async def ping(i, reader, writer):
            try:
                return await exchange(reader, writer, b"ping %d\\n" % i)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                return False
        results = await asyncio.gather(*(ping(*h) for h in held if h[0] not in lost))
        pings += len(results)
        lost |= {h[0] for h, ok in zip([h for h in held if h[0] not in lost], results) if not ok}
        await asyncio.sleep(0.5)
    for _, _, writer in held:
        writer.close()
    print(json.dumps({"ok": len(held), "failed": [f for f, _ in failed[:20]], "n_failed": len(failed),
                      "reasons": reasons, "lost": sorted(lost),
                      "pings": pings, "open_seconds": round(opened, 2)}))
asyncio.run(main())
"""

# Opens RATE connections a second for SECONDS, each echoing a line (connect and echo within
# 10 s each), and holds no finished task (an hour at 200/s is 720,000 of them). Prints a
# JSON progress line every PROGRESS seconds and a JSON summary last: ok, failed, the
# failures by reason (exception type and errno), the first few errors, and the p50/p99
# seconds of connect + echo. Args: host port rate seconds.
SOAK_CLIENT = """
import asyncio, collections, json, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
PROGRESS = 60.0
ok, reasons, errors, latencies = 0, collections.Counter(), [], []
def reason(exc):
    errno = getattr(exc, "errno", None)
    return type(exc).__name__ + (f"[errno {errno}]" if errno else "")
async def one(i):
    global ok
    line = b"soak %d\\n" % i
    began = time.monotonic()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        try:
            w.write(line)
            if await asyncio.wait_for(r.readexactly(len(line)), 10) != line:
                raise ValueError("bad echo")
        finally:
            w.close()
        ok += 1
        latencies.append(time.monotonic() - began)
    except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        reasons[reason(exc)] += 1
        if len(errors) < 10:
            errors.append(f"{i}: {exc!r}")
def percentile(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None
async def main():
    pending, start = set(), time.monotonic()
    next_report = start + PROGRESS
    for i in range(int(rate * seconds)):
        task = asyncio.ensure_future(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
        now = time.monotonic()
        if now >= next_report:
            next_report += PROGRESS
            print(json.dumps({"t": round(now - start), "ok": ok, "failed": sum(reasons.values()),
                              "pending": len(pending)}), flush=True)
        await asyncio.sleep(max(0, start + (i + 1) / rate - now))
    if pending:
        await asyncio.wait(pending)
    print(json.dumps({"ok": ok, "failed": sum(reasons.values()), "reasons": dict(reasons), "errors": errors,
                      "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)}), flush=True)
asyncio.run(main())
"""

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
# (ok, n_failed, lost, pings, open_seconds). Args: host port count seconds.
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
            return f"{i}: bad echo"
        held.append((i, reader, writer))
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        return f"{i}: {exc!r}"
async def main():
    held, started = [], time.monotonic()
    failed = [r for r in await asyncio.gather(*(one(i, held) for i in range(count))) if r]
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
    print(json.dumps({"ok": len(held), "failed": failed[:20], "n_failed": len(failed), "lost": sorted(lost),
                      "pings": pings, "open_seconds": round(opened, 2)}))
asyncio.run(main())
"""
